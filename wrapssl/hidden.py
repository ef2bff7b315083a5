"""Find a hidden layer by name, index or callable, hook it, stop the net there, pool it."""
from __future__ import annotations

import difflib
from typing import Callable, Union

import torch
from torch import nn

LayerSpec = Union[str, int, Callable[[nn.Module, torch.Tensor], torch.Tensor]]
POOLINGS = ("mean", "cls", "none")


class _EarlyExit(Exception):
    """Raised by the hook to skip the rest of the net once the layer has fired."""


def find_layer(net: nn.Module, layer: str | int) -> nn.Module | None:
    """The submodule named by a dotted name or a child index; None for index -1 (the net's output)."""
    if isinstance(layer, bool):
        raise TypeError("hidden_layer must be a layer name, an int index or a callable, not a bool")
    if isinstance(layer, int):
        if layer == -1:
            return None
        children = list(net.children())
        if not -len(children) <= layer < len(children):
            raise ValueError(f"hidden_layer index {layer} is out of range: {type(net).__name__} has "
                             f"{len(children)} children (valid: {-len(children)}..{len(children) - 1}, "
                             "-1 = the net's own output)")
        return children[layer]
    if isinstance(layer, str):
        modules = dict(net.named_modules())
        if layer in modules and layer != "":
            return modules[layer]
        names = [n for n in modules if n]
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"hidden_layer {layer!r} not found in {type(net).__name__}{hint} "
                         f"(names come from net.named_modules(), e.g. {names[:5]})")
    raise TypeError(f"hidden_layer must be a layer name, an int index or a callable f(net, x), "
                    f"got {type(layer).__name__}")


def _first_tensor(out) -> torch.Tensor:
    """The first tensor of a module output that may be a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, (torch.Tensor, tuple, list, dict)):
                return _first_tensor(o)
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, (torch.Tensor, tuple, list, dict)):
                return _first_tensor(o)
    if hasattr(out, "last_hidden_state"):  # Hugging Face model outputs
        return out.last_hidden_state
    raise TypeError(f"the hidden layer produced {type(out).__name__}, which holds no tensor; "
                    "pick another hidden_layer or pass a callable f(net, x) -> features")


def pool(h: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B,C,H,W) → mean over space; (B,N,D) tokens → mean over tokens or the first (cls) token."""
    if pooling == "none" or h.ndim == 2:
        return h.flatten(1)
    if h.ndim == 4:
        if pooling == "cls":
            raise ValueError("pooling='cls' needs token outputs (B,N,D), but the hidden layer gave "
                             f"feature maps of shape {tuple(h.shape)}; use pooling='mean'")
        return h.mean(dim=(2, 3))
    if h.ndim == 3:
        return h[:, 0] if pooling == "cls" else h.mean(dim=1)
    return h.flatten(1)


class Encoder(nn.Module):
    """The user's net up to its hidden layer, pooled to (B, D); the rest of the net is skipped."""

    def __init__(self, net: nn.Module, layer: LayerSpec = -1, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.net = net
        self.pooling = pooling
        self.fn = layer if callable(layer) and not isinstance(layer, nn.Module) else None
        self.layer_name = None if self.fn else layer
        self.module = None if self.fn else find_layer(net, layer)
        self._captured: torch.Tensor | None = None
        self._armed = False
        self._handle = None
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output) -> None:
        if not self._armed:  # only our own forward is intercepted; the user's net(x) runs as usual
            return
        self._captured = _first_tensor(output)
        self._armed = False
        raise _EarlyExit

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The raw hidden-layer output for images x (no pooling)."""
        if self.fn is not None:
            return _first_tensor(self.fn(self.net, x))
        if self.module is None:
            return _first_tensor(self.net(x))
        if self._handle is None:
            raise RuntimeError("this encoder was closed; create a new Learner to train again")
        self._captured, self._armed = None, True
        try:
            self.net(x)
        except _EarlyExit:
            pass
        finally:
            self._armed = False
        h, self._captured = self._captured, None  # keep no activation past the call
        if h is None:
            raise RuntimeError(f"hidden_layer {self.layer_name!r} never ran during the forward pass "
                               f"of {type(self.net).__name__}; choose a layer that the forward uses "
                               "(see print(net)) or pass a callable f(net, x)")
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.hidden(x), self.pooling)

    def close(self) -> None:
        """Remove the hook; the net behaves exactly as before wrapping."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = None


def input_channels(net: nn.Module) -> int:
    """The channel count the net takes: its first Conv2d's, if 1 or 3; else 3."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels if m.in_channels in (1, 3) else 3
    return 3
