"""MAE's reconstruction loss: mean squared error on the masked patches, per-patch normalised targets."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) images → (B, N, p·p·C) patches in row-major grid order, each patch's pixels row by row."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``patchify``: (B, N, p·p·C) → (B, C, H, W)."""
    return rearrange(patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch's pixels standardised by its own mean and (unbiased) variance: MAE's ``norm_pix_loss`` target."""
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Per-sample mean squared error over the masked patches only: pred, target (B, N, p·p·C), mask (B, N)."""
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


class MAELoss(nn.Module):
    """MAE's loss (He et al., 2022, arXiv:2111.06377, section 3): the mean squared error between predicted and
    true pixels of the masked patches only, averaged per image and then over the batch.

    Inputs: ``pred`` (B, N, p·p·C) pixel predictions for every patch, ``target`` (B, N, p·p·C)
    the true patches (``patchify(images, p)``), ``mask`` (B, N) bool, True where a patch was
    masked (each image needs at least one). With ``norm_pix`` (True, the paper's better variant)
    each target patch is first standardised by its own mean and variance. Output: a scalar, or one
    error per image (B,) with ``reduction="none"``.

    >>> loss = MAELoss()(pred, patchify(images, 16), mask)
    """

    def __init__(self, norm_pix: bool = True, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.norm_pix, self.reduction = bool(norm_pix), reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or mask.shape != pred.shape[:2]:
            raise ValueError(f"MAE needs pred and target of one shape (B, N, p*p*C) and a (B, N) mask, got "
                             f"{tuple(pred.shape)}, {tuple(target.shape)} and {tuple(mask.shape)}")
        per_image = mae_loss(pred, target, mask, self.norm_pix)
        return per_image.mean() if self.reduction == "mean" else per_image
