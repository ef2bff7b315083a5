"""Backbones by name: a small CPU-friendly ResNet, any torchvision model, timm models; with their hidden layer."""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock

from .hidden import LayerSpec

__all__ = ["SmallResNet", "build_arch", "available_archs", "default_hidden_layer", "adapt_input_channels"]

# Hidden layers of torchvision families whose pooled output is not a top-level "avgpool" module.
_FAMILY_LAYERS = {
    "vit_": "encoder",          # tokens (B, 1+N, D) after the final LayerNorm; mean- or cls-pooled
    "densenet": "features",     # feature maps before the functional ReLU + pooling
    "mobilenet_v2": "features",
    "squeezenet": "features",
    "mnasnet": "layers",
    "shufflenet": "conv5",
    "maxvit": "blocks",
}
# Inception-style nets: their auxiliary heads only cost compute and unused parameters when pretraining.
_NO_AUX = ("googlenet", "inception_v3")


class SmallResNet(nn.Module):
    """A narrow ResNet for 28-64 px images on CPU: 3x3 stem, no max-pool, BasicBlocks, global pool.

    ``widths`` are the channels of the stages (the first keeps resolution, each
    later one halves it); ``blocks`` the BasicBlocks per stage. The default
    (16, 32, 64, 128) x 1 has 0.3 M parameters and a 128-d ``avgpool`` output;
    a pretraining step on 256 Fashion-MNIST images takes about half a second on
    two CPU cores.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {tuple(widths)} and blocks {tuple(blocks)} must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], widths[0]
        for i, (out, n) in enumerate(zip(widths, blocks)):
            stages.append(self._stage(width, out, n, stride=1 if i == 0 else 2))
            width = out
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(width: int, out: int, n: int, stride: int) -> nn.Sequential:
        """``n`` BasicBlocks from ``width`` to ``out`` channels, the first one striding."""
        down = None
        if stride != 1 or width != out:
            down = nn.Sequential(nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        return nn.Sequential(BasicBlock(width, out, stride, down), *(BasicBlock(out, out) for _ in range(n - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def available_archs() -> list[str]:
    """Names ``build_arch`` accepts without timm: "small_resnet" and torchvision's classification models."""
    return ["small_resnet", *models.list_models(module=models)]


def default_hidden_layer(name: str, net: nn.Module) -> LayerSpec:
    """The representation layer of a torchvision-style net: its global pool, or the family's feature block."""
    for prefix, layer in _FAMILY_LAYERS.items():
        if name.startswith(prefix):
            return layer
    top = dict(net.named_children())
    if "avgpool" in top:
        return "avgpool"
    return -2  # the child before the classifier, the usual layout


def adapt_input_channels(net: nn.Module, channels: int) -> nn.Module:
    """Make the first 3-channel Conv2d of ``net`` take ``channels`` inputs (in place; returns ``net``).

    For 1 channel the new kernel is the old one summed over its colour inputs,
    so the adapted net on a grey image equals the original on that image
    repeated to RGB (same initial function, one third of the stem's work).
    """
    if channels == 3:
        return net
    if channels != 1:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            if conv.groups != 1:
                break
            new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode,
                            device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
            return net
    raise ValueError(f"{type(net).__name__} has no plain 3-channel Conv2d to adapt to {channels} channel(s); "
                     "pass channels=3 (grey images are repeated to RGB) or adapt the stem yourself")


def _timm_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's un-pooled features (the Learner pools them): maps (B,C,H,W) or tokens (B,N,D)."""
    return net.forward_features(x)


def _build_timm(name: str, channels: int, num_classes: int, image_size: int | None) -> tuple[nn.Module, LayerSpec]:
    """A randomly initialised timm model and its features callable."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(f"architecture {name!r} needs timm: pip install timm "
                          f"(or pick a torchvision model, e.g. 'resnet18', or 'small_resnet')") from e
    kwargs = {"img_size": image_size} if image_size is not None and "vit" in name else {}
    try:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"timm does not know the model {name!r}: {e}; see timm.list_models()") from e
    return net, _timm_features


def _is_timm_model(name: str) -> bool:
    """True if timm is installed and knows ``name``."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models()


def build_arch(name: str = "small_resnet", channels: int = 3, num_classes: int = 10,
               image_size: int | None = None) -> tuple[nn.Module, LayerSpec]:
    """A randomly initialised network and its default hidden layer for ``Learner``.

    ``name``: "small_resnet" (the default, for 28-64 px images on CPU), any
    ``torchvision.models.list_models()`` name, or a timm name ("timm:resnet18";
    unprefixed names that torchvision lacks also go to timm when it is installed).
    ``channels`` 1 adapts the stem to grey images; ``image_size`` is passed to
    models that fix it at construction (ViT). Weights are never downloaded.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"arch name must be a non-empty string, got {name!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    key = name.strip()
    if key.lower().startswith("timm:"):
        return _build_timm(key[5:], channels, num_classes, image_size)
    key = key.lower().replace("-", "_")
    if key == "small_resnet":
        return SmallResNet(channels, num_classes), "avgpool"
    if key in models.list_models(module=models):
        return _build_torchvision(key, channels, num_classes, image_size)
    if _is_timm_model(name):
        return _build_timm(name, channels, num_classes, image_size)
    close = difflib.get_close_matches(key, available_archs(), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown architecture {name!r}{hint} Choose 'small_resnet', a torchvision model name "
                     "(torchvision.models.list_models()), or 'timm:<name>' with timm installed")


def _build_torchvision(name: str, channels: int, num_classes: int,
                       image_size: int | None) -> tuple[nn.Module, LayerSpec]:
    """A torchvision classification model without weights, adapted to ``channels``."""
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_") and image_size is not None:
        patch = int(name.rsplit("_", 1)[-1])
        if image_size % patch:
            raise ValueError(f"{name} cuts images into {patch}x{patch} patches; image_size {image_size} must be a "
                             f"multiple of {patch} (e.g. {max(patch, image_size // patch * patch)})")
        kwargs["image_size"] = image_size
    if name in _NO_AUX:
        kwargs.update(aux_logits=False, init_weights=False)
    net = models.get_model(name, **kwargs)
    return adapt_input_channels(net, channels), default_hidden_layer(name, net)
