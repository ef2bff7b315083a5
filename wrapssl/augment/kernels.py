"""Fused batched kernels behind the augmentation ops: torchvision's arithmetic with a parameter per sample."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def on_subset(x: torch.Tensor, idx: torch.Tensor | None,
              fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """``fn(x[idx], idx)`` written back over the samples ``idx``; the rest unchanged, ``x`` untouched.

    ``idx=None`` means every sample. Working on the chosen samples only keeps a p=0.1 op at a
    tenth of the cost (kornia's base class would transform the whole batch and blend).
    """
    if idx is None:
        return fn(x, None)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x[idx], idx))


def take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The rows ``idx`` of a per-sample parameter (all of them for None)."""
    return t if idx is None else t[idx]


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) → (B,1,H,W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of (B,3,H,W) images by ``shift`` turns per sample (torchvision's adjust_hue).

    Saturation and value stay as they are, so RGB→HSV→RGB collapses to: find the
    hue sector from the max channel, shift it, and rebuild each channel as
    ``max − chroma·clamp(2 − |k − 2|, 0, 1)`` with ``k = (hue·6 + 5, 3, 1) mod 6``
    (the closed form of HSV→RGB).
    """
    r, g, b = x.unbind(1)
    hi = torch.maximum(torch.maximum(r, g), b)  # aminmax over dim 1 is several times slower on CPU
    chroma = hi - torch.minimum(torch.minimum(r, g), b)
    c = chroma.masked_fill(chroma == 0, 1.0)  # grey pixels: any hue gives back hi
    h6 = torch.where(hi == r, (g - b) / c, torch.where(hi == g, (b - r) / c + 2, (r - g) / c + 4))
    h6 = h6.add_(6 * shift.view(-1, 1, 1)).unsqueeze(1)
    k = torch.remainder(h6 + x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1), 6.0)
    ramp = k.sub_(2).abs_().neg_().add_(2).clamp_(0.0, 1.0)  # clamp(min(k, 4 - k), 0, 1)
    return torch.addcmul(hi.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1.0)


def jitter(y: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """torchvision's brightness, contrast, saturation and hue adjustments, each sample in its own order.

    ``factors`` (B,4) holds each sample's brightness, contrast and saturation factors and its
    hue shift in turns; ``order`` (B,4) its permutation of the four steps. Brightness, contrast
    and saturation are all a clamped blend ``f·y + (1−f)·ref`` (ref = 0, the mean luma, the
    luma image), so each step is one blend over the batch with each sample's own op and factor,
    plus the hue rotation of the samples whose step it is. 1-channel images get brightness and
    contrast only, as in torchvision (the luma of a grey image is the image itself).
    """
    shape, rgb = (-1, 1, 1, 1), y.shape[1] == 3
    for step in range(4):
        op = order[:, step]
        is_hue = op == 3
        f = torch.where(is_hue, 1.0, factors.gather(1, op[:, None]).squeeze(1)).view(shape)
        luma = gray(y) if rgb else y  # grey images: saturation blends y with itself, a no-op
        # the blend target of each sample's op: 0 (brightness), mean luma (contrast), luma (saturation)
        ref = torch.addcmul(luma.mean(dim=(2, 3), keepdim=True) * (op == 1).view(shape), luma, (op == 2).view(shape))
        y = torch.lerp(ref, y, f).clamp_(0.0, 1.0)  # f·y + (1−f)·ref; f = 1 leaves hue samples as they are
        if rgb and hue:
            sel = is_hue.nonzero().squeeze(1)
            if sel.numel():
                y[sel] = shift_hue(y[sel], factors[sel, 3])
    return y


def _axis_positions(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """Normalised sample positions (B, out) that resize [start, start+length) to ``out`` pixels.

    Half-pixel centres clamped to the crop, i.e. exactly ``F.interpolate`` of the crop (bilinear).
    """
    i = torch.arange(out, device=start.device, dtype=start.dtype)
    src = ((i + 0.5) * (length / out)[:, None] - 0.5).clamp(min=0.0)
    src = torch.minimum(src, (length - 1)[:, None]) + start[:, None]
    return (2 * src + 1) / size - 1


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: torch.Tensor,
                 width: torch.Tensor, flip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each sample's box resized to ``size`` (and mirrored where ``flip``) in one bilinear resampling.

    Half-pixel bilinear interpolation of the crop without antialiasing; the flip mirrors
    the sampling grid, so it costs nothing.
    """
    n, (H, W), (oh, ow) = x.shape[0], x.shape[-2:], size
    dtype, dev = x.dtype, x.device
    gy = _axis_positions(top.to(dev, dtype), height.to(dev, dtype), oh, H)
    gx = _axis_positions(left.to(dev, dtype), width.to(dev, dtype), ow, W)
    gx = torch.where(flip.to(dev)[:, None], gx.flip(1), gx)
    grid = torch.stack((gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(y: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """A Gaussian blur of side ``kernel_size`` with each sample's σ, on every channel.

    Separable (a row pass and a column pass, one grouped conv each) with reflected
    borders, as torchvision's gaussian_blur.
    """
    n, c, H, W = y.shape
    k, pad = kernel_size, kernel_size // 2
    if pad >= min(H, W):
        raise ValueError(f"blur kernel {k} is too large for {H}x{W} images; use a smaller kernel_size")
    t = torch.arange(k, device=y.device, dtype=y.dtype) - pad
    w = torch.softmax(-(t / sigma[:, None].to(y.device, y.dtype)).square() / 2, dim=1)
    w = w.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    z = F.pad(y.reshape(1, n * c, H, W), (pad, pad, 0, 0), mode="reflect")
    z = F.conv2d(z, w.view(n * c, 1, 1, k), groups=n * c)
    z = F.pad(z, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(z, w.view(n * c, 1, k, 1), groups=n * c).view(n, c, H, W)


def solarize(y: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels at or above ``threshold`` inverted (x → 1 − x), on every channel."""
    return torch.where(y >= threshold, 1 - y, y)
