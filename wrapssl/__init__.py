"""wrapssl: self-supervised pretraining of any PyTorch vision network in three lines."""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .version import __version__  # noqa: F401 (written once, in version.py)

# Each public name and the module that defines it. They are imported on first use (PEP 562), so that
# `import wrapssl` loads nothing heavy and changes nothing in the user's process, and `wrapssl --help`
# answers without loading torch.
_EXPORTS = {
    "Learner": "learner", "BYOL": "compat", "BYOLTrainer": "compat", "MockDataset": "compat",
    "Trainer": "trainer", "RunConflictError": "trainer", "TrainingInterrupted": "trainer",
    "NonFiniteLossError": "trainer", "build_arch": "archs", "load_weights": "archs", "Method": "methods",
    "available_methods": "methods", "get_method": "methods", "register_method": "methods", "Views": "augment",
    "view_transform": "augment", "byol_views": "augment", "simclr_views": "augment",
    "multicrop_views": "augment", "set_crop_scale": "augment", "Embeddings": "evaluate",
    "embed_dataset": "evaluate", "knn_accuracy": "evaluate", "linear_probe": "evaluate",
    "load_backbone": "backbone", "Embedder": "backbone", "load_classifier": "finetune_runs",
    "FinetuneSettings": "finetune", "label_budgets": "evaluate.budgets",
    "TrainConfig": "config", "Callback": "callbacks", "StepInfo": "callbacks",
}
# fine-tuning itself: ``from wrapssl.finetune import finetune`` (the module shares the name)

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name (imported from its module on first use) or a submodule such as ``wrapssl.data``."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names beside what is loaded already."""
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static checkers and IDEs see
    from .archs import build_arch, load_weights
    from .backbone import Embedder, load_backbone
    from .callbacks import Callback, StepInfo
    from .config import TrainConfig
    from .evaluate.budgets import label_budgets
    from .finetune import FinetuneSettings
    from .finetune_runs import load_classifier
    from .augment import Views, byol_views, multicrop_views, set_crop_scale, simclr_views, view_transform
    from .compat import BYOL, BYOLTrainer, MockDataset
    from .evaluate import Embeddings, embed_dataset, knn_accuracy, linear_probe
    from .learner import Learner
    from .methods import Method, available_methods, get_method, register_method
    from .trainer import NonFiniteLossError, RunConflictError, Trainer, TrainingInterrupted
