"""Distillation from a frozen teacher, after SimReg (Navaneet et al., 2022, arXiv:2201.05131)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from ..augment import IMAGENET_MEAN, IMAGENET_STD, Views
from ..checks import positive_int
from ..heads import mlp
from ..losses import RegressionLoss
from .base import EncoderSpec, Method, TeacherRequest, crop_and_flip, register_method


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the L2-normalised student predictions and teacher features (= 2 − 2·cos)."""
    return RegressionLoss()(student.float(), teacher.float())


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
    classifier's weights are not needed). The method only asks for it (``needs``, a
    ``TeacherRequest``); the Learner builds it (``wrapssl.teacher``). It is frozen: run in eval mode without
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

    needs = frozenset({"teacher"})

    def __init__(self, teacher: nn.Module | str | os.PathLike | None = None, teacher_arch: str | None = None,
                 teacher_layer: Any = None, teacher_image_size: int | None = None,
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
        positive_int(teacher_image_size, "teacher_image_size", allow_none=True)
        positive_int(head_layers, "head_layers")
        positive_int(hidden_size, "hidden_size")
        # what the Learner builds and serves in setup (the teacher itself stays out of parameters() and state_dict())
        self.teacher_request = TeacherRequest(teacher, teacher_arch, teacher_layer, teacher_image_size,
                                              teacher_normalize, teacher_pooling)
        self.hidden_size, self.head_layers = hidden_size, head_layers
        self.criterion = RegressionLoss()
        self.__dict__["teacher"] = None

    def setup(self, spec: EncoderSpec) -> None:
        if spec.teacher is None:
            raise ValueError("method 'distill' got no teacher from the Learner; build it with Learner(net, "
                             "method='distill', teacher=...)")
        self.__dict__["teacher"] = spec.teacher  # a plain attribute, not a submodule
        self.projector = mlp([spec.dim, *[self.hidden_size] * (self.head_layers - 1), spec.teacher.width])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return crop_and_flip(image_size, scale=(0.2, 1.0))

    def targets(self, views):
        return [self.teacher(v) for v in views]

    def loss(self, online, target, step=0):
        if target is None or len(target) != len(online):
            raise ValueError("distillation needs one teacher output per view")
        return sum(self.criterion(s.float(), t.float()) for s, t in zip(online, target)) / len(online)
