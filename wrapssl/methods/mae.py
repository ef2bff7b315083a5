"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2022, arXiv:2111.06377), for any ViT."""
from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from ..augment import Views
from ..losses import MAELoss
from ..losses.mae import patchify, unpatchify
from .base import EncoderSpec, Method, crop_and_flip, register_method


def random_masking(batch: int, n: int, keep: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random set of ``keep`` of ``n`` tokens per sample: (kept indices (B, keep), mask (B, n) True where
    masked, restore (B, n): the index that puts [kept tokens, masked tokens] back in grid order)."""
    shuffle = torch.rand(batch, n, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    # position i of the shuffled order is kept when i < keep; restore maps that back onto the grid
    mask = restore >= keep
    return shuffle[:, :keep], mask, restore


def take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens[b, index[b]] for every sample b: (B, T, D) with (B, K) → (B, K, D)."""
    return tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], index]


def sincos_positions(dim: int, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (num_prefix + h·w, dim), as in MAE: half the channels encode
    the row, half the column, each as sines and cosines of geometric frequencies; prefix tokens get zeros."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    angles = [pos.reshape(-1, 1) * freq for pos in (rows, cols)]
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), emb]).float()


class MAEDecoder(nn.Module):
    """MAE's light decoder: the encoder's tokens to its own width, a learned mask token at every masked place,
    fixed sine-cosine positions, pre-norm transformer blocks, and a linear layer to each patch's pixels."""

    def __init__(self, in_dim: int, grid: tuple[int, int], num_prefix: int, patch_pixels: int, dim: int = 512,
                 depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_prefix = num_prefix
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("positions", sincos_positions(dim, grid, num_prefix)[None], persistent=False)
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, round(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: Xavier-uniform projections, zero biases, mask token N(0, 0.02²)."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (B, N, patch_pixels) for every patch, from the encoder's (B, P + kept, D) tokens."""
        x = self.embed(tokens)
        prefix, kept = x[:, :self.num_prefix], x[:, self.num_prefix:]
        masked = self.mask_token.to(x.dtype).expand(x.shape[0], restore.shape[1] - kept.shape[1], -1)
        patches = take(torch.cat([kept, masked], dim=1), restore)  # back in grid order
        x = torch.cat([prefix, patches], dim=1) + self.positions.to(x.dtype)
        return self.pred(self.norm(self.blocks(x)))[:, self.num_prefix:]


@register_method("mae")
class MAE(Method):
    """Masked autoencoder for vision transformers: the user's ViT encodes only a random 25% of the patches; a
    light decoder reconstructs the pixels of the rest.

    The net must be a ViT (torchvision's ``VisionTransformer``, timm's ViT/DeiT): its own
    patch embedding, position embedding, class token and blocks are the encoder, so they are
    what learns (``wrapssl.vit``). ``learner.embed`` gives the usual representation (by
    default the net's pre-logits, its class token) of the whole image.

    Knobs: ``mask_ratio`` (0.75) is the share of patches masked per image, at random per
    sample; ``norm_pix_loss`` (True) regresses each masked patch's pixels standardised by its
    own mean and variance (the paper's better variant). The decoder (``decoder_dim`` 512,
    ``decoder_depth`` 8, ``decoder_heads`` 16) is the paper's; for small ViTs and small data
    a narrower, shallower one (e.g. 128 wide, 2 deep) trains as well for far less compute.
    Views: one random resized crop (20-100% of the area) with a horizontal flip, no colour
    augmentation. Paper: AdamW lr 1.5e-4·B/256, betas (0.9, 0.95), wd 0.05, batch 4096,
    800-1600 epochs with 40 of warm-up; MAE needs long runs.
    """

    needs = frozenset({"tokens"})  # the Learner serves token-level access to the user's ViT in setup

    def __init__(self, mask_ratio: float = 0.75, norm_pix_loss: bool = True, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16):
        super().__init__()
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1 (the share of patches masked; MAE "
                             f"uses 0.75), got {mask_ratio}")
        if min(decoder_dim, decoder_depth, decoder_heads) < 1 or decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(f"decoder_dim ({decoder_dim}) must be a multiple of 4 and of decoder_heads "
                             f"({decoder_heads}), and decoder_depth ({decoder_depth}) positive, e.g. 512, 8, 16")
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.criterion = MAELoss(self.norm_pix_loss, reduction="none")  # per image: one row per view image

    def setup(self, spec: EncoderSpec) -> None:
        self.vit = spec.tokens  # served by the Learner: references to the user's modules, not registered here
        n = self.vit.num_patches
        self.keep = min(n - 1, max(1, round(n * (1 - self.mask_ratio))))
        self.decoder = MAEDecoder(self.vit.dim, self.vit.grid, self.vit.num_prefix,
                                  self.vit.patch_size ** 2 * self.vit.channels, self.decoder_dim,
                                  self.decoder_depth, self.decoder_heads)
        self.projector = nn.Identity()  # no projection head: learner(x, return_embedding=True) gives (emb, emb)

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return crop_and_flip(image_size, scale=(0.2, 1.0))

    def predict(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each image at random and predict every patch: (predictions (B, N, p·p·C), mask (B, N))."""
        keep, mask, restore = random_masking(views.shape[0], self.vit.num_patches, self.keep, views.device)
        tokens = self.vit.embed(views)
        p = self.vit.num_prefix
        visible = torch.cat([tokens[:, :p], take(tokens[:, p:], keep)], dim=1)  # the encoder sees only these
        return self.decoder(self.vit.encode(visible), restore), mask

    def online(self, encode, views):
        pred, mask = self.predict(views)
        return self.criterion(pred, patchify(views, self.vit.patch_size), mask)

    def loss(self, online, target, step=0):
        return torch.cat(online).mean()

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For normalised images: (mask (B, 1, H, W), True on masked pixels; the images with their masked patches
        replaced by the reconstruction, in the same normalised space). With ``norm_pix_loss`` each predicted
        patch is mapped back with the true patch's mean and variance, as the paper's figures do."""
        pred, mask = self.predict(views)
        patch = self.vit.patch_size
        target = patchify(views, patch)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        patches = torch.where(mask[..., None], pred.to(target.dtype), target)
        pixels = repeat(mask, "b (h w) -> b 1 (h p) (w q)", h=self.vit.grid[0], p=patch, q=patch)
        return pixels, unpatchify(patches, patch, self.vit.grid)

