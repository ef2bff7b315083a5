from setuptools import find_packages, setup

setup(
    name="wrapssl",
    version="0.1.0",
    description="Self-supervised pretraining of any PyTorch vision network in three lines",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["wrapssl", "wrapssl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "kornia>=0.7",
        "accelerate>=0.26",
        "einops>=0.7",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "plots": ["matplotlib>=3.5"],
        "eval": ["scikit-learn>=1.2"],
        "logging": ["tensorboard"],
        "test": ["pytest", "matplotlib>=3.5", "scikit-learn>=1.2", "tensorboard"],
        "bench": ["byol-pytorch==0.9.1", "lightly==1.6.0", "psutil"],
    },
    entry_points={"console_scripts": ["wrapssl=wrapssl.cli:main"]},
)
