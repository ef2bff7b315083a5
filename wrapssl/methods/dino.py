"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., 2021, arXiv:2104.14294)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import Views, multicrop_views
from ..heads import mlp
from ..losses import DINOLoss, KoLeoLoss
from .base import Method, register_method


class DINOHead(nn.Module):
    """MLP (GELU, no BN) to a bottleneck, L2-normalisation, then a weight-normalised linear layer with g = 1."""

    def __init__(self, in_dim: int, out_dim: int, hidden_size: int = 2048, bottleneck_size: int = 256,
                 layers: int = 3):
        super().__init__()
        self.mlp = mlp([in_dim, *[hidden_size] * (layers - 1), bottleneck_size], batchnorm=False, act="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Only the direction of each output row is learned: its norm is fixed to 1
        # (DINO's norm_last_layer), which the paper finds stabilises training.
        self.last_layer = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck_size), std=0.02))
        self.freeze_last_layer = False  # set by DINO.begin_step from the step count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_layer
        if self.freeze_last_layer and torch.is_grad_enabled():
            # same values, zero gradient; the parameter stays in the graph so DDP's static graph still
            # all-reduces it, and its rows are normalised below, so weight decay (a uniform scale)
            # cannot move the output
            w = w.detach() + 0 * w
        return F.linear(x, F.normalize(w, dim=1))


@register_method("dino")
class DINO(Method):
    """Self-distillation: a student matches an EMA teacher's centred, sharpened softmax across crops.

    The Learner's EMA target is the teacher; ``projector`` is the whole DINO head
    (MLP, L2-norm, weight-normalised last layer), so the EMA covers all of it.
    Views: 2 global crops (teacher and student) + ``n_local`` (6) local crops of
    ``local_size`` (default 96/224 of ``image_size``) for the student only. The
    net must accept the local size: ResNets and other convolutional nets do;
    torchvision ViTs do not (use ``n_local=0`` or a net that interpolates its
    position embeddings).

    Knobs: ``out_dim`` (65536; smaller, e.g. 4096-16384, works for small data),
    ``hidden_size`` (2048), ``bottleneck_size`` (256); ``student_temp`` (0.1);
    the teacher temperature rises linearly from ``warmup_teacher_temp`` (0.04) to
    ``teacher_temp`` (0.07) over ``warmup_teacher_temp_steps`` optimiser steps
    (default 37530 = the paper's 30 epochs of ImageNet at batch 1024; set it to
    30 epochs of your data); above 0.07 training is unstable, and if the loss
    does not fall early keep the teacher at 0.04. ``center_momentum`` (0.9)
    smooths the center (a buffer, updated with the global batch mean of the
    teacher outputs after each loss) that keeps the teacher from collapsing to
    one dimension. Expect the loss to rise towards log(out_dim) in the first
    steps, while the center catches up, and to fall after that; a learning rate
    well above the paper's (e.g. Adam 1e-3 at batch 64) can leave the head at a
    uniform output. Teacher momentum 0.996 → 1 (cosine). ``freeze_last_layer_steps``
    (0) keeps the head's last layer fixed (zero gradient) for that many optimiser
    steps; the paper freezes it for the first epoch (set it to your steps per
    epoch), which helps the start of training. Paper: AdamW lr 5e-4·B/256 with
    warm-up, wd 0.04 → 0.4, gradient clipping 3.0, batch 1024.

    ``koleo_weight`` (0: off, as in DINO; DINOv2 uses 0.1) adds DINOv2's KoLeo regulariser:
    that weight times the sum over the global views of ``koleo_loss`` of the student's
    representation (the pooled encoder output, before the head), which spreads the features
    of a batch evenly. It is computed per process, on the local batch, as in DINOv2.
    """

    uses_target = True
    momentum = 0.996

    def __init__(self, out_dim: int = 65536, hidden_size: int = 2048, bottleneck_size: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_steps: int = 37530, center_momentum: float = 0.9, n_local: int = 6,
                 local_size: int | None = None, freeze_last_layer_steps: int = 0, koleo_weight: float = 0.0):
        super().__init__()
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError("DINO's temperatures must be positive (student 0.1, teacher 0.04-0.07)")
        if not 0 <= center_momentum <= 1:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum}")
        if min(warmup_teacher_temp_steps, n_local, freeze_last_layer_steps, koleo_weight) < 0:
            raise ValueError("warmup_teacher_temp_steps, n_local, freeze_last_layer_steps and koleo_weight must be "
                             "non-negative")
        self.out_dim, self.hidden_size, self.bottleneck_size = out_dim, hidden_size, bottleneck_size
        self.student_temp, self.teacher_temp = float(student_temp), float(teacher_temp)
        self.warmup_teacher_temp, self.warmup_teacher_temp_steps = float(warmup_teacher_temp), warmup_teacher_temp_steps
        self.center_momentum, self.n_local, self.local_size = float(center_momentum), n_local, local_size
        self.freeze_last_layer_steps = int(freeze_last_layer_steps)
        self.koleo_weight = float(koleo_weight)
        self.criterion = DINOLoss(out_dim, self.student_temp, self.center_momentum)  # owns the center buffer
        self.koleo = KoLeoLoss()
        self.register_load_state_dict_pre_hook(_center_moved)

    @property
    def center(self) -> torch.Tensor:
        """The teacher's center (1, out_dim), a buffer of ``criterion``."""
        return self.criterion.center

    def build(self, dim: int) -> None:
        self.projector = DINOHead(dim, self.out_dim, self.hidden_size, self.bottleneck_size)

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return multicrop_views(image_size, n_local=self.n_local, local_size=self.local_size, channels=channels)

    def begin_step(self, step: int) -> None:
        self.projector.freeze_last_layer = step < self.freeze_last_layer_steps

    def teacher_temperature(self, step: int) -> float:
        """The teacher's softmax temperature at optimiser step ``step``."""
        if step >= self.warmup_teacher_temp_steps:
            return self.teacher_temp
        progress = step / self.warmup_teacher_temp_steps
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * progress

    def online(self, encode, views):
        if not self.koleo_weight:
            return super().online(encode, views)
        representation = encode(views)
        return self.projector(representation), representation

    def loss(self, online, target, step=0):
        if target is None:
            raise ValueError("DINO needs the teacher's outputs; keep uses_target=True")
        representations = None
        if isinstance(online[0], tuple):  # (projection, representation) per view: online() with KoLeo on
            online, representations = [o for o, _ in online], [r for _, r in online]
        loss = self.criterion(online, target, self.teacher_temperature(step))  # moves the center in training
        if representations is not None and self.koleo_weight:
            loss = loss + self.koleo_weight * sum(self.koleo(r) for r in representations[:len(target)])
        return loss


def _center_moved(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the loss owned the center keep loading: ``center`` → ``criterion.center``."""
    if prefix + "center" in state_dict and prefix + "criterion.center" not in state_dict:
        state_dict[prefix + "criterion.center"] = state_dict.pop(prefix + "center")
