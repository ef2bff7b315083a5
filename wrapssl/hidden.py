"""Temporary re-export; removed at integration (the encoder is in encoder.py, the torch helpers in nnutil.py)."""
from .encoder import LAYOUTS, POOLINGS, ClassifierInput, Encoder, LayerSpec, feature_layout, find_layer, first_tensor, pool
from .nnutil import copy_module, eval_mode, input_channels, size_hint, with_context

__all__ = ["LAYOUTS", "POOLINGS", "ClassifierInput", "Encoder", "LayerSpec", "feature_layout", "find_layer",
           "first_tensor", "pool", "copy_module", "eval_mode", "input_channels", "size_hint", "with_context"]
