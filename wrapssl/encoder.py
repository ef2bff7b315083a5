"""The encoder: the user's net up to its hidden layer, taken by a hook with an early exit and pooled to (B, D).

The layer is found by name, child index, callable or as the classifier's input (``ClassifierInput``);
the encoder also probes its width without touching the net and picks the input memory format.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from .nnutil import eval_mode, meta_probe, size_hint, with_context

__all__ = ["ClassifierInput", "LayerSpec", "POOLINGS", "LAYOUTS", "Encoder", "find_layer", "first_tensor",
           "feature_layout", "pool"]


@dataclass(frozen=True)
class ClassifierInput:
    """The input of the net's final classifier (its pre-logits), taken by a hook; the classifier never runs.

    ``classifier`` and ``dropouts`` are names from ``net.named_modules()``, so the same
    spec finds the same layers in a copy of the net. The ``dropouts`` (those right
    before the classifier) are passed through unchanged: they regularise a classifier
    that self-supervised training does not train, and would only add noise to the
    representation. In eval mode they are identities anyway.
    """

    classifier: str
    dropouts: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"pre-logits (the input of {self.classifier!r})"


LayerSpec = Union[str, int, ClassifierInput, Callable[[nn.Module, torch.Tensor], torch.Tensor]]
POOLINGS = ("mean", "cls", "none")
LAYOUTS = ("NCHW", "NHWC")


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


def first_tensor(out: object) -> torch.Tensor:
    """The first tensor of a module output that may be a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, (torch.Tensor, tuple, list, dict)):
                return first_tensor(o)
    if isinstance(out, dict):
        for o in out.values():
            if isinstance(o, (torch.Tensor, tuple, list, dict)):
                return first_tensor(o)
    if hasattr(out, "last_hidden_state"):  # Hugging Face model outputs
        return out.last_hidden_state
    raise TypeError(f"the hidden layer produced {type(out).__name__}, which holds no tensor; "
                    "pick another hidden_layer or pass a callable f(net, x) -> features")


def feature_layout(shape: tuple[int, ...], fmt: str | None = None) -> str:
    """"NCHW" or "NHWC" for a 4-D feature map of ``shape`` from square images; ValueError when it cannot tell.

    The two equal spatial sides give the layout away: (B, C, H, H) or (B, H, H, C). Only
    when all three sides are equal does ``fmt``, what the net declares (timm's
    ``output_fmt``), decide: it describes the net's final features, not every layer's.
    """
    a, h, w = shape[1:]
    if h == w and a != h:
        return "NCHW"
    if a == h and w != h:
        return "NHWC"
    if fmt in LAYOUTS:
        return fmt
    raise ValueError(f"cannot tell whether the hidden layer's output of shape {tuple(shape)} is (B,C,H,W) or "
                     "(B,H,W,C); pass feature_layout='NCHW' or feature_layout='NHWC' so that the mean is "
                     "taken over its spatial axes")


def pool(h: torch.Tensor, pooling: str = "mean", layout: str = "NCHW") -> torch.Tensor:
    """Feature maps → mean over their spatial axes (``layout`` says which); (B,N,D) tokens → mean or first token."""
    if pooling == "none" or h.ndim == 2:
        return h.flatten(1)
    if h.ndim == 4:
        if pooling == "cls":
            raise ValueError("pooling='cls' needs token outputs (B,N,D), but the hidden layer gave "
                             f"feature maps of shape {tuple(h.shape)}; use pooling='mean'")
        return h.mean(dim=(1, 2) if layout == "NHWC" else (2, 3))
    if h.ndim == 3:
        return h[:, 0] if pooling == "cls" else h.mean(dim=1)
    return h.flatten(1)

class Encoder(nn.Module):
    """The user's net up to its hidden layer, pooled to (B, D); the rest of the net is skipped.

    ``layer``: a dotted name or child index (its output), a ``ClassifierInput`` (the
    input of that classifier) or a callable ``f(net, x)``. ``feature_layout`` says how
    4-D outputs are laid out ("NCHW" or "NHWC"; None: found at the first 4-D output).
    ``channels_last`` is the input memory format policy (see ``input_format``).
    """

    def __init__(self, net: nn.Module, layer: LayerSpec = -1, pooling: str = "mean",
                 feature_layout: str | None = None, channels_last: bool | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if feature_layout is not None and feature_layout not in LAYOUTS:
            raise ValueError(f"feature_layout must be one of {LAYOUTS} or None (detected), got {feature_layout!r}")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be None (automatic), True or False, got {channels_last!r}")
        self.net = net
        self.pooling, self.layout, self.channels_last = pooling, feature_layout, channels_last
        self.spec = layer
        self.fn = layer if callable(layer) and not isinstance(layer, nn.Module) else None
        self._captured: torch.Tensor | None = None
        self._armed = False
        self._handles: list = []
        self.module: nn.Module | None = None
        if isinstance(layer, ClassifierInput):
            self.module = net.get_submodule(layer.classifier)
            self._handles.append(self.module.register_forward_pre_hook(self._input_hook))
            for name in layer.dropouts:
                self._handles.append(net.get_submodule(name).register_forward_hook(self._pass_through))
        elif self.fn is None:
            self.module = find_layer(net, layer)
            if self.module is not None:
                self._handles.append(self.module.register_forward_hook(self._output_hook))
        self._open = True
        # automatic channels_last is for convolutional nets only, and only once the net is seen to accept it
        self._convolutional = any(isinstance(m, nn.Conv2d) for m in net.modules())
        self._accepts_channels_last: bool | None = None

    def _capture(self, h: object) -> None:
        self._captured = first_tensor(h)
        self._armed = False
        raise _EarlyExit

    def _output_hook(self, module: nn.Module, inputs, output) -> None:
        if self._armed:  # only our own forward is intercepted; the user's net(x) runs as usual
            self._capture(output)

    def _input_hook(self, module: nn.Module, inputs) -> None:
        if self._armed:
            self._capture(inputs)

    def _pass_through(self, module: nn.Module, inputs, output):
        return inputs[0] if self._armed else None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The raw hidden-layer output for images x (no pooling)."""
        if self.fn is not None:
            return first_tensor(self.fn(self.net, x))
        if not self._open:
            raise RuntimeError("this encoder was closed; create a new Learner to train again")
        if self.module is None:
            return first_tensor(self.net(x))
        self._captured, self._armed = None, True
        try:
            self.net(x)
        except _EarlyExit:
            pass
        finally:
            self._armed = False
        h, self._captured = self._captured, None  # keep no activation past the call
        if h is None:
            raise RuntimeError(f"hidden_layer {self.spec!r} never ran during the forward pass "
                               f"of {type(self.net).__name__}; choose a layer that the forward uses "
                               "(see print(net)) or pass a callable f(net, x)")
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if h.ndim == 4 and self.pooling != "none" and self.layout is None:
            self.layout = self._layout_of(tuple(h.shape), tuple(x.shape))
        return pool(h, self.pooling, self.layout or "NCHW")

    def run(self, batch: torch.Tensor, channels: int, what: str = "images", settings: str = "") -> torch.Tensor:
        """``self(batch)``; an error of the net is raised again, of its own type, with what it got (``what``: the
        batch's name, e.g. "views") and what to check (``settings``: where the channels and size were set)."""
        try:
            return self(batch)
        except Exception as e:
            hint = ("; a net that reshapes feature maps with .view() needs contiguous images: pass "
                    "channels_last=False" if not batch.is_contiguous() else "")
            if "DTensor" in str(e):  # the net's weights are FSDP shards: a call outside the Learner's forward
                hint += ("; the net is sharded (FSDP): call it inside `with wrapssl.fsdp.gathered(learner, "
                         "learner.encoder):`, entered by every process")
            size = batch.shape[-1]
            raise with_context(e, f"{type(self.net).__name__} failed on {what} of shape {tuple(batch.shape)}: {e}\n"
                                  f"Check that the net takes {channels}-channel images of size {size}"
                                  f"{settings}{hint}{size_hint(self.net, size)}")

    def _hidden_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the raw hidden output for images of ``shape``, found without touching the net (``meta_probe``:
        on the meta device, or on a throw-away copy for nets that meta tensors cannot run through)."""
        def run(net: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
            probe = Encoder(net, self.spec)  # hooks of its own, on whichever net meta_probe runs
            try:
                return tuple(probe.hidden(x).shape)
            finally:
                probe.close()
        return meta_probe(self.net, run, shape)

    def _layout_of(self, hidden: tuple[int, ...], images: tuple[int, ...]) -> str:
        """The layout of a 4-D hidden output of shape ``hidden`` for images of shape ``images``.

        When its shape cannot tell, the net runs (on the meta device) on images twice as
        large: the axes that grow are the spatial ones.
        """
        try:
            return feature_layout(hidden, getattr(self.net, "output_fmt", None))
        except ValueError as e:
            try:
                larger = self._hidden_shape((*images[:2], 2 * images[2], 2 * images[3]))
            except Exception:
                raise e from None
            grew = tuple(a != b for a, b in zip(hidden[1:], larger[1:]))
            if grew == (False, True, True):
                return "NCHW"
            if grew == (True, True, False):
                return "NHWC"
            raise

    def probe_width(self, channels: int, image_size: int) -> int:
        """Width of the pooled hidden layer for (channels, image_size) images; fixes the feature layout."""
        images = (2, channels, image_size, image_size)
        try:
            hidden = self._hidden_shape(images)
        except Exception as e:
            raise with_context(e, f"could not run {type(self.net).__name__} on images of shape {images} to find "
                                  f"the width of its hidden layer: {e}\nCheck image_size, channels and "
                                  f"hidden_layer{size_hint(self.net, image_size)}")
        if len(hidden) == 4 and self.pooling != "none" and self.layout is None:
            self.layout = self._layout_of(hidden, images)
        return pool(torch.empty(hidden, device="meta"), self.pooling, self.layout or "NCHW").shape[-1]

    def input_format(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` in the memory format the net gets: ``torch.channels_last`` when it helps and works.

        ``channels_last=None`` (automatic): for nets with ``Conv2d`` layers, on the CPU and under
        CUDA autocast, unless a first 2-image probe shows the net cannot take it. True: always.
        """
        if batch.ndim != 4 or not self.feeds_channels_last(batch.device.type, torch.is_autocast_enabled("cuda")):
            return batch
        if self.channels_last is None:
            if self._accepts_channels_last is None:
                self._accepts_channels_last = self._runs_channels_last(batch)
            if not self._accepts_channels_last:
                return batch
        return batch.contiguous(memory_format=torch.channels_last)

    def feeds_channels_last(self, device: str, autocast: bool) -> bool:
        """Whether ``input_format`` lays batches out channels_last on ``device`` ("cpu", "cuda"), by the policy
        alone (a net that fails the first probe gets contiguous batches after all)."""
        if self.channels_last is not None:
            return self.channels_last
        return self._convolutional and (device == "cpu" or (device == "cuda" and autocast))

    def _runs_channels_last(self, batch: torch.Tensor) -> bool:
        """Whether the encoder runs on channels_last images: one uncompiled no-grad pass over 2 images
        in eval mode (no batch-norm statistics move). False also when it fails for another reason:
        the real pass then reports that error."""
        probe = batch[:2].contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad(), eval_mode(self):
                self.forward(probe)  # not through __call__: a compiled encoder stays uncompiled
        except Exception:
            return False
        return True

    def close(self) -> None:
        """Remove the hooks; the net behaves exactly as before wrapping."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open = False
        self._captured = None
