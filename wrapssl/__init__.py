"""wrapssl: self-supervised pretraining of any PyTorch vision network in three lines."""
import os

# Idle OpenMP threads spin-wait by default; on a shared CPU they starve the threads doing the work and a
# step can take 10-50x longer. Sleeping costs next to nothing on an idle machine. It must be set before
# torch loads OpenMP, so it lives here, ahead of every entry point (`wrapssl`, `python -m wrapssl.train`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .archs import build_arch, load_weights  # noqa: E402
from .augment import Views, byol_views, multicrop_views, set_crop_scale, simclr_views, view_transform  # noqa: E402
from .compat import BYOL, BYOLTrainer, MockDataset  # noqa: E402
from .evaluate import Embeddings, embed_dataset, knn_accuracy, linear_probe  # noqa: E402
from .learner import Learner  # noqa: E402
from .methods import Method, available_methods, get_method, register_method  # noqa: E402
from .trainer import NonFiniteLossError, RunConflictError, Trainer, TrainingInterrupted  # noqa: E402

__version__ = "0.1.0"  # the one place the version is written (setup.py reads it from here)

__all__ = [
    "Learner", "BYOL", "BYOLTrainer", "MockDataset", "Trainer", "RunConflictError", "TrainingInterrupted",
    "NonFiniteLossError", "build_arch", "load_weights", "Method", "available_methods", "get_method", "register_method",
    "Views", "view_transform", "byol_views", "simclr_views", "multicrop_views", "set_crop_scale",
    "Embeddings", "embed_dataset", "knn_accuracy", "linear_probe",
]
