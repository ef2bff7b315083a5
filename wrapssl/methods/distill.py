"""Distillation from a frozen teacher, after SimReg (Navaneet et al., 2022, arXiv:2201.05131)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ..archs import build_arch
from ..augment import IMAGENET_MEAN, IMAGENET_STD, Views, normalization, resize
from ..heads import mlp
from ..hidden import POOLINGS, Encoder, LayerSpec, eval_mode, input_channels
from ..prelogits import find_pre_logits
from .base import EncoderSpec, Method, crop_and_flip, register_method
from .byol import regression_loss


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the L2-normalised student predictions and teacher features (= 2 − 2·cos)."""
    return regression_loss(student.float(), teacher.float()).mean()


def _classifier_keys(net: nn.Module, layer: LayerSpec) -> list[str]:
    """State-dict prefixes of the classifier that a pre-logits teacher never runs (its file may have any
    number of classes)."""
    name = getattr(layer, "classifier", None)
    if name is None and callable(getattr(net, "get_classifier", None)):  # timm
        head = net.get_classifier()
        name = next((n for n, m in net.named_modules() if m is head and n), None)
    return [f"{name}."] if name else []


@register_method("distill")
class Distill(Method):
    """The user's net (the student) learns to predict a frozen teacher's features of the same image.

    Recipe (SimReg): an MLP head on the student's representation regresses the teacher's
    L2-normalised features, loss = squared distance of the unit vectors (2 − 2·cos); both
    see the same weakly augmented view (a random resized crop of 20-100% of the area and a
    flip), which the paper found to aid distillation. The head is dropped afterwards:
    ``learner.embed`` and the user's net give the student's own representation. SimReg
    found deeper heads better (``head_layers``).

    ``teacher``: a trained ``nn.Module``, or a path to its weights (a state dict file, a
    wrapssl ``backbone.pt`` or run folder, a Trainer checkpoint) with ``teacher_arch`` naming
    the architecture (``build_arch``: "resnet50", "timm:vit_small_patch14_dinov2", ...; its
    classifier's weights are not needed). The teacher is frozen: run in eval mode without
    gradients, never in ``learner.parameters()`` or the Learner's ``state_dict`` (checkpoints
    stay small; pass the teacher again to resume). It is moved to the device of the images.
    ``teacher_layer``: its representation layer, as ``Learner(hidden_layer=...)`` (default:
    its pre-logits), pooled with ``teacher_pooling``. The teacher may take its own input:
    ``teacher_image_size`` (default: the student's; the view is resized to it) and
    ``teacher_normalize`` ((mean, std), default ImageNet's; None for none); grey views are
    repeated for an RGB teacher and RGB views averaged for a grey one.

    Head: ``head_layers`` (2) Linear layers, BN and ReLU between them, ``hidden_size`` (2048)
    wide, to the teacher's width. Any optimiser that trains the student works; SimReg used
    SGD lr 0.05, batch 256, 130 epochs on ImageNet.
    """

    def __init__(self, teacher: nn.Module | str | os.PathLike | None = None, teacher_arch: str | None = None,
                 teacher_layer: LayerSpec | None = None, teacher_image_size: int | None = None,
                 teacher_normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
                 teacher_pooling: str = "mean", hidden_size: int = 2048, head_layers: int = 2):
        super().__init__()
        if teacher is None:
            raise ValueError("method 'distill' needs a teacher: teacher=<a trained nn.Module>, or teacher="
                             "'path/to/weights.pt' with teacher_arch='resnet18' (its architecture)")
        if not isinstance(teacher, (nn.Module, str, os.PathLike)):
            raise TypeError(f"teacher must be an nn.Module or a path to its weights, got {type(teacher).__name__}")
        if not isinstance(teacher, nn.Module) and teacher_arch is None:
            raise ValueError(f"teacher={os.fspath(teacher)!r} is a weights file: name its architecture with "
                             "teacher_arch= (a name build_arch knows, e.g. 'resnet18' or 'timm:vit_small_patch16_224')")
        if teacher_image_size is not None and (isinstance(teacher_image_size, bool) or teacher_image_size < 1):
            raise ValueError(f"teacher_image_size must be a positive int, got {teacher_image_size!r}")
        if teacher_pooling not in POOLINGS:
            raise ValueError(f"teacher_pooling must be one of {POOLINGS}, got {teacher_pooling!r}")
        if head_layers < 1 or hidden_size < 1:
            raise ValueError(f"head_layers and hidden_size must be positive, got {head_layers} and {hidden_size}")
        # plain attributes, not submodules: the teacher stays out of parameters(), state_dict() and .to()
        self.__dict__["teacher_source"] = teacher
        self.teacher_arch, self.teacher_layer = teacher_arch, teacher_layer
        self.teacher_image_size, self.teacher_normalize = teacher_image_size, teacher_normalize
        self.teacher_pooling, self.hidden_size, self.head_layers = teacher_pooling, hidden_size, head_layers
        self.__dict__["teacher_encoder"] = None

    def _build_teacher(self, spec: EncoderSpec, size: int) -> tuple[nn.Module, LayerSpec]:
        """The teacher net and its representation layer: the module given, or one built from its weights file."""
        if isinstance(self.teacher_source, nn.Module):
            net = self.teacher_source
            return net, find_pre_logits(net, input_channels(net), size) if self.teacher_layer is None \
                else self.teacher_layer
        # built once to learn the classifier's name, then again with the weights, the classifier's left out
        net, layer = build_arch(self.teacher_arch, channels=spec.channels, image_size=size)
        ignore = _classifier_keys(net, layer) if self.teacher_layer is None else []
        net, _ = build_arch(self.teacher_arch, channels=spec.channels, image_size=size, weights=self.teacher_source,
                            ignore=ignore)
        return net.eval().requires_grad_(False), layer if self.teacher_layer is None else self.teacher_layer

    def setup(self, spec: EncoderSpec) -> None:
        size = self.teacher_image_size or spec.image_size
        net, layer = self._build_teacher(spec, size)
        if net is spec.net:
            raise ValueError("the teacher must be another, trained net than the student; to learn from the "
                             "student's own EMA copy use a self-distillation method such as method='dino' or 'byol'")
        channels = input_channels(net)
        if channels != spec.channels and 1 not in (channels, spec.channels):
            raise ValueError(f"the teacher takes {channels}-channel images and the student {spec.channels}; "
                             "only grey and multi-channel views are converted (repeat or average)")
        self.__dict__["teacher_encoder"] = Encoder(net, layer, self.teacher_pooling)
        self.teacher_size, self.teacher_channels, self.teacher_device = size, channels, None
        width = self.teacher_encoder.probe_width(channels, size)
        self.teacher_norm = normalization(channels, self.teacher_normalize)
        self.projector = mlp([spec.dim, *[self.hidden_size] * (self.head_layers - 1), width])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return crop_and_flip(image_size, scale=(0.2, 1.0))

    def teacher_input(self, views: torch.Tensor) -> torch.Tensor:
        """Views in [0, 1] as the teacher takes them: its channel count, image size and normalisation."""
        c = views.shape[1]
        if c != self.teacher_channels:
            views = views.mean(dim=1, keepdim=True) if self.teacher_channels == 1 else \
                views.expand(-1, self.teacher_channels, -1, -1)
        return self.teacher_norm(resize(views, self.teacher_size))

    def targets(self, views):
        encoder = self.teacher_encoder
        if self.teacher_device != views[0].device:  # moved once, to where the images are
            encoder.net.to(views[0].device)
            self.teacher_device = views[0].device
        with eval_mode(encoder.net):
            return [encoder(encoder.input_format(self.teacher_input(v))).float() for v in views]

    def loss(self, online, target, step=0):
        if target is None or len(target) != len(online):
            raise ValueError("distillation needs one teacher output per view")
        return sum(distill_loss(s, t) for s, t in zip(online, target)) / len(online)

    def close(self) -> None:
        if self.teacher_encoder is not None:
            self.teacher_encoder.close()
