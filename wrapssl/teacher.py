"""A frozen teacher for distillation: built from a net or a weights file, fed its own input, never trained."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .augment import resize
from .backbone import Embedder
from .encoder import POOLINGS, LayerSpec
from .nnutil import eval_mode, input_channels
from .methods.base import TeacherRequest

__all__ = ["Teacher", "build_teacher", "teacher_from_file"]


class Teacher(Embedder):
    """A trained net up to its representation layer, frozen: eval mode, no gradients, its own input.

    ``teacher(views)`` takes float views in [0, 1] as the student sees them (before
    normalisation), converts their channels to the teacher's (grey repeated, RGB averaged),
    resizes them to ``image_size`` and normalises them with ``normalize``; it returns float32
    features (B, D). The net moves to the views' device on first use; its own train/eval flags
    are restored after every call. Held outside any module: never in ``parameters()`` or
    ``state_dict()``.
    """

    def __init__(self, net: nn.Module, layer: LayerSpec | None, image_size: int,
                 normalize: tuple[Sequence[float], Sequence[float]] | None, pooling: str = "mean"):
        super().__init__(net, layer, normalize, input_channels(net), image_size, pooling=pooling, channels_last=None)
        try:
            self.width = self.encoder.probe_width(self.channels, image_size)
        except BaseException:
            self.close()  # the net is left unhooked
            raise
        self._device: torch.device | None = None

    def input(self, views: torch.Tensor) -> torch.Tensor:
        """Views in [0, 1] with the teacher's channel count and image size (not yet normalised)."""
        if views.shape[1] != self.channels:
            views = views.mean(dim=1, keepdim=True) if self.channels == 1 else \
                views.expand(-1, self.channels, -1, -1)
        return resize(views, self.image_size)

    @torch.no_grad()
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if self._device != views.device:  # moved once, to where the images are
            self.net.to(views.device)
            self._device = views.device
        with eval_mode(self.net):
            return self.encode(self.input(views)).float()


def teacher_from_file(path, arch: str, channels: int, image_size: int,
                      layer: LayerSpec | None = None) -> tuple[nn.Module, LayerSpec]:
    """The net of ``arch`` with the weights at ``path`` (its classifier's weights left out when the representation
    is its pre-logits, so a file with any number of classes loads), frozen; and its representation layer."""
    from .archs import build_arch
    from .prelogits import classifier_prefix

    net, default = build_arch(arch, channels=channels, image_size=image_size)
    prefix = classifier_prefix(net, channels, image_size) if layer is None else None
    ignore = [prefix] if prefix else []
    net, _ = build_arch(arch, channels=channels, image_size=image_size, weights=path, ignore=ignore)
    return net.eval().requires_grad_(False), default if layer is None else layer


def build_teacher(request: TeacherRequest, channels: int, image_size: int, student: nn.Module) -> Teacher:
    """The frozen, hooked teacher that ``request`` describes, for a student taking ``channels``-channel images of
    side ``image_size``; a ValueError with the fix for a teacher that cannot serve."""
    if request.pooling not in POOLINGS:
        raise ValueError(f"teacher_pooling must be one of {POOLINGS}, got {request.pooling!r}")
    size = request.image_size or image_size
    if isinstance(request.source, nn.Module):
        net, layer = request.source, request.layer
    else:
        net, layer = teacher_from_file(request.source, request.arch, channels, size, request.layer)
    if net is student:
        raise ValueError("the teacher must be another, trained net than the student; to learn from the "
                         "student's own EMA copy use a self-distillation method such as method='dino' or 'byol'")
    theirs = input_channels(net)
    if theirs != channels and 1 not in (theirs, channels):
        raise ValueError(f"the teacher takes {theirs}-channel images and the student {channels}; "
                         "only grey and multi-channel views are converted (repeat or average)")
    return Teacher(net, layer, size, request.normalize, request.pooling)
