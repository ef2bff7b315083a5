"""The default hidden layer: a net's own pre-logits, the input of its final classifier."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .encoder import ClassifierInput, LayerSpec
from .nnutil import meta_probe, size_hint, with_context

# A classifier is a Linear, or a 1x1 convolution over feature maps (SqueezeNet's).
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_RESHAPES = (nn.Flatten, nn.Identity)  # may sit between a dropout and the classifier


@dataclass(frozen=True)
class TimmPreLogits:
    """timm's own pre-logit features: ``forward_head(forward_features(x), pre_logits=True)``, as ``f(net, x)``."""

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.forward_head(net.forward_features(x), pre_logits=True)

    def __str__(self) -> str:
        return "pre-logits (timm's forward_head(..., pre_logits=True))"


def is_timm_like(net: nn.Module) -> bool:
    """True if ``net`` follows timm's convention: ``forward_features`` and ``forward_head(x, pre_logits=...)``."""
    head, features = getattr(net, "forward_head", None), getattr(net, "forward_features", None)
    if not (callable(head) and callable(features)):
        return False
    try:
        return "pre_logits" in inspect.signature(head).parameters
    except (TypeError, ValueError):
        return False


def _is_classifier(m: nn.Module) -> bool:
    """A Linear, or a 1x1 convolution (a feature extractor's last 3x3 convolution is not a classifier)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)


def _finish_order(net: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module call of one forward of ``net``, in the order the calls finished."""
    names = {m: n for n, m in net.named_modules()}
    order: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, args, out: order.append((names[mod], mod))) for m in names]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return order


def _classifier_in(order: list[tuple[str, nn.Module]]) -> ClassifierInput | None:
    """The final classifier among the calls, if only parameter-free modules (pooling, activations) follow it."""
    index = next((i for i in range(len(order) - 1, -1, -1) if _is_classifier(order[i][1])), None)
    if index is None or order[index][0] == "":
        return None
    name = order[index][0]
    for later, m in order[index + 1:]:
        enclosing = later == "" or name.startswith(later + ".")
        if not enclosing and (any(True for _ in m.parameters()) or any(True for _ in m.buffers())):
            return None  # e.g. a norm after the last Linear: that Linear is inside the body, not the head
    dropouts = []
    for earlier, m in reversed(order[:index]):
        if isinstance(m, _DROPOUTS):
            dropouts.append(earlier)
        elif not isinstance(m, _RESHAPES):
            break
    return ClassifierInput(name, tuple(reversed(dropouts)))


def find_pre_logits(net: nn.Module, channels: int, image_size: int) -> LayerSpec:
    """The hidden layer that gives ``net``'s own pre-logit features on (channels, image_size) images.

    timm-style nets: ``TimmPreLogits()``. Others: the input of the final classifier (the
    last Linear or 1x1 convolution that only pooling, flattening or activations follow),
    found from one forward on the meta device (or on a copy when meta tensors cannot run
    the net). A net without such a classifier: -1, its own output.
    """
    if is_timm_like(net):
        return TimmPreLogits()
    shape = (2, channels, image_size, image_size)
    try:
        order = meta_probe(net, _finish_order, shape)
    except Exception as e:
        raise with_context(e, f"could not run {type(net).__name__} on images of shape {shape} to find its "
                              f"classifier: {e}\nCheck image_size and channels{size_hint(net, image_size)}")
    found = _classifier_in(order)
    return found if found is not None else -1


def classifier_prefix(net: nn.Module, channels: int, image_size: int) -> str | None:
    """The state-dict prefix (e.g. ``"fc."``) of the final classifier that ``net``'s pre-logits never run, so that
    weights saved for another number of classes can skip it; None when the net has no such classifier."""
    layer = find_pre_logits(net, channels, image_size)
    name = None
    if isinstance(layer, ClassifierInput):
        name = layer.classifier
    elif isinstance(layer, TimmPreLogits):
        head = net.get_classifier()
        name = next((n for n, m in net.named_modules() if m is head and n), None)
    return f"{name}." if name else None
