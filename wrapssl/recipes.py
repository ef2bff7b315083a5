"""The training app's recipes in one table: the default run, each data set's and each method's settings.

No torch here: the app's parser reads these (and the names it offers) to answer `wrapssl train --help` fast.
The names below copy the registries (methods, optimisers, built-in data sets) without importing them;
tests/test_train_script.py checks that they agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# The default run is chosen to finish, evaluations included, within 10 minutes on 2 idle CPU cores (7:48 measured)
# and to beat raw pixels and the randomly initialised net; what we measured is in benchmarks/RESULTS.md, section 6.
# Where the app's flags differ from TrainConfig's defaults, and the data and net it runs without flags:
DEFAULT_RUN = dict(data="fashion-mnist", arch="small_resnet", method="simclr", batch_size=256, num_train_steps=1000,
                   checkpoint_every=100)
FOLDER_IMAGE_SIZE = 64  # side of the views for a folder of images or tar shards

# Copies of the registries, for a parser that loads no torch (checked against them by the tests)
METHODS = ("barlow_twins", "byol", "dino", "distill", "mae", "moco", "nnclr", "simclr", "simsiam", "swav", "vicreg")
OPTIMIZERS = ("adamw", "sgd", "lars")  # wrapssl.optim.OPTIMIZERS
DATASETS = ("fashion-mnist", "digits", "cifar10", "stl10")  # wrapssl.data.DATASETS
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # wrapssl.data.FASHION_MNIST_DIR
MAX_PIXELS = 2 * 89_478_485  # wrapssl.data.MAX_PIXELS: PIL's decompression-bomb limit


@dataclass(frozen=True)
class DataRecipe:
    """How the app runs on a built-in data set: its view size, its smallest global crop, its pretraining split."""

    image_size: int
    # at 28 px an 8% crop is an 8x8 patch with no garment left in it: the small built-in sets crop at least 25%
    min_crop: float | None = None
    pretrain_split: str = "train"  # kNN memory is always the "train" split, queries the "test" split


DATA = {
    "fashion-mnist": DataRecipe(28, min_crop=0.25),
    "digits": DataRecipe(16, min_crop=0.25),
    "cifar10": DataRecipe(32),
    "stl10": DataRecipe(96, pretrain_split="unlabeled"),  # its 100k unlabeled images
}


def _share(part: int, whole: int) -> Callable[[int], int]:
    """A setting that is part/whole of the run's steps (at least 1)."""
    return lambda steps: max(1, steps * part // whole)


@dataclass(frozen=True)
class MethodRecipe:
    """The app's settings of one method for short runs at batch 256: AdamW's learning rate at batch 256, and the
    method's keywords (a callable value is worked out from the run's planned steps)."""

    learning_rate: float
    kwargs: dict[str, Any] = field(default_factory=dict)


# Smaller heads than the ImageNet papers (CPU runs, small data), the EMA momentum 0.99 of lightly's CIFAR-10
# benchmarks, DINO's teacher-temperature warm-up over the first 30% of the steps and SwAV's prototypes frozen for
# the first 5%; the method table in benchmarks/RESULTS.md used exactly these.
_EMA = {"moving_average_decay": 0.99}
_HEADS = {"projection_hidden_size": 1024}
METHOD = {
    "simclr": MethodRecipe(8e-3, {"temperature": 0.2}),
    "moco": MethodRecipe(8e-3, {"temperature": 0.2, **_HEADS, "prediction_hidden_size": 1024, **_EMA}),
    "nnclr": MethodRecipe(8e-3, {"temperature": 0.2, "queue_size": 4096, **_HEADS, "prediction_hidden_size": 1024}),
    "byol": MethodRecipe(2e-3, {**_HEADS, **_EMA}),
    "simsiam": MethodRecipe(2e-3, {"projection_size": 1024, "prediction_hidden_size": 256}),
    "barlow_twins": MethodRecipe(2e-3, {"projector_dims": (1024, 1024, 1024)}),
    "vicreg": MethodRecipe(2e-3, {"projector_dims": (1024, 1024, 1024)}),
    "dino": MethodRecipe(2e-3, {"out_dim": 2048, "hidden_size": 1024, "n_local": 4,
                                "warmup_teacher_temp_steps": _share(3, 10), **_EMA}),
    "swav": MethodRecipe(2e-3, {"n_prototypes": 512, **_HEADS, "n_local": 4, "freeze_prototypes_steps": _share(1, 20)}),
    "mae": MethodRecipe(1e-3),
    "distill": MethodRecipe(2e-3),
}
OTHER_METHOD = MethodRecipe(2e-3)  # a method registered by the user


def method_defaults(method: str, steps: int | None = None) -> tuple[float, dict[str, Any]]:
    """(learning rate at batch 256, method keywords) of ``method`` for a run of ``steps`` (default: the default
    run's), used unless --learning-rate and --method-arg override them."""
    recipe = METHOD.get(method, OTHER_METHOD)
    steps = steps or DEFAULT_RUN["num_train_steps"]
    return recipe.learning_rate, {k: v(steps) if callable(v) else v for k, v in recipe.kwargs.items()}


def image_size(data_name: str) -> int:
    """The side of the views for the data named ``data_name`` (a built-in set's, else a folder's)."""
    return DATA[data_name].image_size if data_name in DATA else FOLDER_IMAGE_SIZE


def min_crop(data_name: str) -> float | None:
    """The smallest area fraction of the global crops for that data (None: the method's own)."""
    return DATA[data_name].min_crop if data_name in DATA else None


def pretrain_split(data_name: str) -> str:
    """The split a built-in data set pretrains on."""
    return DATA[data_name].pretrain_split if data_name in DATA else "train"
