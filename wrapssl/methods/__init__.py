"""Self-supervised methods, one per file; importing this package registers them all."""
from .base import Method, available_methods, get_method, register_method
from .byol import BYOL as BYOLMethod
from .simsiam import SimSiam

__all__ = ["Method", "available_methods", "get_method", "register_method", "BYOLMethod", "SimSiam"]
