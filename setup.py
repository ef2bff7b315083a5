"""Packaging: wrapssl, its core dependencies and the optional extras (plots, eval, timm, arrays, test, bench)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# the version is written once, in wrapssl/version.py
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "wrapssl" / "version.py").read_text(), re.M).group(1)

setup(
    name="wrapssl",
    version=VERSION,
    description="Self-supervised pretraining of any PyTorch vision network in three lines",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["wrapssl", "wrapssl.*"]),
    package_data={"wrapssl": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "kornia>=0.9,<0.10",    # augment/ops.py overrides kornia internals: tested on 0.9.0; 0.7.0-0.8.2 fail its tests
        "accelerate>=0.29",     # GradientAccumulationPlugin(sync_each_batch=...)
        "einops>=0.7",          # patch layouts of the masked-image method (issue 14)
        "safetensors>=0.4",     # backbone.safetensors with its metadata (also accelerate's dependency)
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "plots": ["matplotlib>=3.5"],
        "eval": ["scikit-learn>=1.2"],
        "logging": ["tensorboard"],
        "timm": ["timm"],
        "arrays": ["tifffile"],  # multispectral .tif stacks in image folders
        "test": ["pytest", "pytest-xdist", "matplotlib>=3.5", "scikit-learn>=1.2", "tensorboard", "timm", "tifffile"],
        "bench": ["byol-pytorch==0.9.1", "lightly==1.6.0", "psutil"],
    },
    entry_points={"console_scripts": ["wrapssl=wrapssl.cli:main"]},
)
