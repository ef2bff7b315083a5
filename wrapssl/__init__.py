"""wrapssl: self-supervised pretraining of any PyTorch vision network in three lines."""
from .augment import Views, byol_views, multicrop_views, set_crop_scale, simclr_views, view_transform
from .compat import BYOL
from .evaluate import Embeddings, embed_dataset, knn_accuracy, linear_probe
from .learner import Learner
from .methods import Method, available_methods, get_method, register_method
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Learner", "BYOL", "Trainer", "Method", "available_methods", "get_method", "register_method",
    "Views", "view_transform", "byol_views", "simclr_views", "multicrop_views", "set_crop_scale",
    "Embeddings", "embed_dataset", "knn_accuracy", "linear_probe",
]
