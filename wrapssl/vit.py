"""Token-level access to a user's vision transformer (torchvision's VisionTransformer; timm's VisionTransformer,
DeiT and their variants): its own patch embedding, position embedding, prefix tokens, blocks and final norm,
for methods that drop or mask patch tokens."""
from __future__ import annotations

import sys

import torch
from einops import rearrange
from torch import nn
from torchvision.models import VisionTransformer

SUPPORTED = ("torchvision's VisionTransformer (vit_b_16, vit_l_16, ...) and timm's VisionTransformer "
             "and DeiT (timm.create_model('vit_small_patch16_224'), 'deit_tiny_patch16_224', ...)")


class ViTTokens:
    """A user's ViT seen token by token. It keeps references to the net's own modules and changes nothing in it,
    so what trains through it is the user's patch embedding, position embedding, prefix tokens and blocks.

    ``embed(images)`` gives (B, P + N, D) tokens: the ``num_prefix`` tokens (class, distillation,
    registers) then the N = grid[0]·grid[1] patch tokens in row-major order, position embeddings
    added. ``encode(tokens)`` runs any subset of those tokens through the blocks and the final norm.
    """

    def __init__(self, net: nn.Module, patch_size: int, grid: tuple[int, int], dim: int, channels: int,
                 num_prefix: int):
        self.net, self.patch_size, self.grid = net, patch_size, grid
        self.dim, self.channels, self.num_prefix = dim, channels, num_prefix

    @property
    def num_patches(self) -> int:
        """Patch tokens per image."""
        return self.grid[0] * self.grid[1]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P + N, D): prefix tokens then patch tokens, position embeddings added."""
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, D) through the transformer blocks and the final norm."""
        raise NotImplementedError


class TorchvisionViT(ViTTokens):
    """``torchvision.models.VisionTransformer``: conv_proj, class_token, encoder.pos_embedding, encoder.layers, ln."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        patches = rearrange(net.conv_proj(images), "b d h w -> b (h w) d")
        cls = net.class_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + net.encoder.pos_embedding

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        encoder = self.net.encoder
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))


class TimmViT(ViTTokens):
    """timm's ``VisionTransformer`` (and subclasses such as DeiT's distilled one): patch_embed, then timm's own
    ``_pos_embed`` (prefix tokens, positions resampled for dynamic image sizes), norm_pre, blocks, norm."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.net._pos_embed(self.net.patch_embed(images))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net.norm(net.blocks(net.norm_pre(tokens)))


def _timm_vit_class() -> type | None:
    """timm's VisionTransformer class when timm is loaded (a timm net means it is), else None."""
    module = sys.modules.get("timm.models.vision_transformer")
    return getattr(module, "VisionTransformer", None)


def _grid(image_size: int, patch: int, net: nn.Module) -> tuple[int, int]:
    """The patch grid of ``image_size`` images; a ValueError when the patches do not tile them."""
    if image_size % patch:
        raise ValueError(f"{type(net).__name__} cuts images into {patch}x{patch} patches; image_size {image_size} "
                         f"must be a multiple of {patch} (e.g. {max(patch, image_size // patch * patch)})")
    return image_size // patch, image_size // patch


def vit_tokens(net: nn.Module, image_size: int, method: str) -> ViTTokens:
    """Token-level access to ``net`` at ``image_size``; a TypeError naming ``method`` unless it is a supported ViT."""
    if isinstance(net, VisionTransformer):
        patch = net.patch_size
        return TorchvisionViT(net, patch, _grid(image_size, patch, net), net.hidden_dim,
                              net.conv_proj.in_channels, 1)
    timm_vit = _timm_vit_class()
    if timm_vit is not None and isinstance(net, timm_vit):
        ph, pw = net.patch_embed.patch_size
        if ph != pw:
            raise ValueError(f"method {method!r} needs square patches; this ViT's are {ph}x{pw}")
        return TimmViT(net, ph, _grid(image_size, ph, net), net.embed_dim, net.patch_embed.proj.in_channels,
                       net.num_prefix_tokens)
    raise TypeError(f"method {method!r} needs a vision transformer: {SUPPORTED}; got {type(net).__name__}. "
                    "Other nets train with a joint-embedding method such as method='byol' or method='dino'")
