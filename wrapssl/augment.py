"""Augmentation recipes on the batch's device (random parameters per sample, torchvision semantics) and input checks."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Checked float (B,C,H,W) in [0,1] with ``channels`` channels from uint8 or float images."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B,C,H,W), got {type(images).__name__}; "
                        "convert PIL images with torchvision.transforms.functional.pil_to_tensor")
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape (B,C,H,W), got {tuple(images.shape)}{hint}")
    c = images.shape[1]
    if c not in (1, channels):
        raise ValueError(f"images have {c} channels but the net takes {channels}; pass 1-channel or "
                         f"{channels}-channel images (drop an alpha channel with images[:, :3]), or set "
                         f"Learner(channels={c}) if the net was built for {c}")
    if images.dtype == torch.uint8:
        x = images.float().div_(255)
    elif images.is_floating_point():
        x = images.float()
        # one host sync for both checks; uint8 input (the Trainer's path) never pays it
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError("images contain NaN or inf; check the data loader and any preprocessing")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0,1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "remove Normalize from your loader (wrapssl normalises itself) or pass uint8")
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if c == 1 and channels != 1:
        x = x.expand(-1, channels, -1, -1)
    return x


class Normalize(nn.Module):
    """Per-channel (x - mean) / std; an identity when mean is None."""

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD):
        super().__init__()
        self.enabled = mean is not None
        m = torch.tensor(mean if mean is not None else [0.0]).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else [1.0]).view(1, -1, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"normalisation has {self.mean.shape[1]} channels, images have {x.shape[1]}")
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation (for showing views)."""
        return x * self.std + self.mean if self.enabled else x


def blur_kernel(size: int) -> int:
    """An odd Gaussian kernel about 10% of the image side (23 at 224, as in SimCLR/BYOL)."""
    k = int(0.1 * size)
    return max(3, k + 1 - k % 2)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, p: float,
               fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """``fn(x[idx], idx)`` written back over the samples in ``mask``; the rest unchanged, ``x`` untouched.

    Working on the chosen samples only keeps a p=0.1 op at a tenth of the cost.
    """
    if p >= 1:
        return fn(x, None)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x[idx], idx))


def _take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t[idx]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) → (B,1,H,W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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


def _axis_positions(start: torch.Tensor, length: torch.Tensor, out: int, size: int) -> torch.Tensor:
    """Normalised sample positions (B, out) that resize [start, start+length) to ``out`` pixels.

    Half-pixel centres clamped to the crop, i.e. exactly ``F.interpolate`` of the crop (bilinear).
    """
    i = torch.arange(out, device=start.device, dtype=start.dtype)
    src = ((i + 0.5) * (length / out)[:, None] - 0.5).clamp(min=0.0)
    src = torch.minimum(src, (length - 1)[:, None]) + start[:, None]
    return (2 * src + 1) / size - 1


class RandomOp(nn.Module):
    """A random op on (B,C,H,W) float images whose parameters are drawn per sample on the batch's device.

    ``sample(x)`` draws the parameters, ``apply(x, params)`` uses them; ``forward`` does both.
    Ops take 1- and 3-channel images, and draw the same parameters for both: the Learner
    augments grey images at one channel before repeating them for a 3-channel net.
    """

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.sample(x))

    def _mask(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(x.shape[0], device=x.device) < p


class RandomResizedCrop(RandomOp):
    """torchvision's RandomResizedCrop (and an optional horizontal flip) per sample, as one bilinear resampling.

    Boxes follow torchvision's rule (ten tries of area ∈ scale, log-uniform aspect
    ratio, else a centred fallback); the crop is resized with half-pixel bilinear
    interpolation, without antialiasing, so crops larger than ``size`` alias:
    feed images about ``size`` large (the Trainer's loaders do). The flip mirrors
    the sampling grid, so it costs nothing.
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.0):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (min, max) area fractions with 0 < min <= max, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (min, max) aspect ratios with 0 < min <= max, got {ratio}")
        self.scale, self.ratio, self.flip_p = tuple(scale), tuple(ratio), float(flip_p)

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, (H, W), dev = x.shape[0], x.shape[-2:], x.device
        tries = 10
        area = H * W * torch.empty(n, tries, device=dev).uniform_(*self.scale)
        aspect = torch.empty(n, tries, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).exp_()
        w, h = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = fits.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision's loop
        w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)
        # torchvision's fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred
        if W / H < self.ratio[0]:
            fw, fh = W, round(W / self.ratio[0])
        elif W / H > self.ratio[1]:
            fw, fh = round(H * self.ratio[1]), H
        else:
            fw, fh = W, H
        w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
        top = torch.where(found, (torch.rand(n, device=dev) * (H - h + 1)).floor_(), float((H - fh) // 2))
        left = torch.where(found, (torch.rand(n, device=dev) * (W - w + 1)).floor_(), float((W - fw) // 2))
        return {"top": top, "left": left, "height": h, "width": w, "flip": self._mask(x, self.flip_p)}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        n, (H, W), (oh, ow) = x.shape[0], x.shape[-2:], self.size
        dtype = x.dtype if x.is_floating_point() else torch.float32
        gy = _axis_positions(params["top"].to(dtype), params["height"].to(dtype), oh, H)
        gx = _axis_positions(params["left"].to(dtype), params["width"].to(dtype), ow, W)
        gx = torch.where(params["flip"][:, None], gx.flip(1), gx)
        grid = torch.stack((gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ColorJitter(RandomOp):
    """torchvision's ColorJitter per sample: brightness, contrast, saturation, hue in a random per-sample order.

    With probability ``p`` a sample gets factors b, c, s ∈ [1−v, 1+v] and a hue
    shift ∈ [−hue, hue]. Brightness, contrast and saturation are all a clamped
    blend ``f·x + (1−f)·ref`` (ref = 0, the mean luma, the luma image), so each
    of the four steps of the order is one blend over the batch, with each sample's
    own op and factor, plus the hue rotation for the samples whose step it is.
    Takes 1- or 3-channel images; on grey images saturation and hue do nothing,
    as in torchvision (the luma of a grey image is the image itself).
    """

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, p: float = 1.0):
        super().__init__()
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] (a fraction of the colour wheel), got {hue}")
        if min(brightness, contrast, saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be >= 0, got "
                             f"{(brightness, contrast, saturation)}")
        self.strength = (float(brightness), float(contrast), float(saturation), float(hue))
        self.p = float(p)

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, dev = x.shape[0], x.device
        lo = torch.tensor([max(0.0, 1 - v) for v in self.strength[:3]] + [-self.strength[3]], device=dev)
        hi = torch.tensor([1 + v for v in self.strength[:3]] + [self.strength[3]], device=dev)
        factors = lo + (hi - lo) * torch.rand(n, 4, device=dev)
        order = torch.rand(n, 4, device=dev).argsort(dim=1)  # a uniform random permutation per sample
        return {"mask": self._mask(x, self.p), "factors": factors, "order": order}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"ColorJitter takes 1-channel (grey) or 3-channel (RGB) images, got {x.shape[1]} "
                             "channels; drop an alpha channel with images[:, :3]")
        return _on_subset(x, params["mask"], self.p,
                          lambda y, idx: self._jitter(y, _take(params["factors"], idx), _take(params["order"], idx)))

    def _jitter(self, y: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        shape, rgb = (-1, 1, 1, 1), y.shape[1] == 3
        for step in range(4):
            op = order[:, step]
            is_hue = op == 3
            f = torch.where(is_hue, 1.0, factors.gather(1, op[:, None]).squeeze(1)).view(shape)
            gray = _gray(y) if rgb else y  # grey images: saturation blends y with itself, a no-op
            # the blend target of each sample's op: 0 (brightness), mean luma (contrast), luma (saturation)
            ref = torch.addcmul(gray.mean(dim=(2, 3), keepdim=True) * (op == 1).view(shape), gray, (op == 2).view(shape))
            y = torch.lerp(ref, y, f).clamp_(0.0, 1.0)  # f·y + (1−f)·ref; f = 1 leaves hue samples as they are
            if rgb and self.strength[3] > 0:  # hue leaves grey images alone
                sel = is_hue.nonzero().squeeze(1)
                if sel.numel():
                    y[sel] = _shift_hue(y[sel], factors[sel, 3])
        return y


class RandomGrayscale(RandomOp):
    """With probability ``p`` a sample becomes its luma, repeated over the three channels (grey images pass)."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = float(p)

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": self._mask(x, self.p)}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if x.shape[1] == 1:  # already grey (torchvision returns it as it is too)
            return x
        return _on_subset(x, params["mask"], self.p, lambda y, idx: _gray(y).expand_as(y))


class RandomGaussianBlur(RandomOp):
    """With probability ``p`` a Gaussian blur of side ``kernel_size`` and σ ∈ ``sigma`` drawn per sample.

    Separable (a row pass and a column pass, one grouped conv each) with
    reflected borders, as torchvision's gaussian_blur.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 1.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be (min, max) with 0 < min <= max, got {sigma}")
        self.kernel_size, self.sigma, self.p = int(kernel_size), tuple(sigma), float(p)

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        sigma = torch.empty(x.shape[0], device=x.device).uniform_(*self.sigma)
        return {"mask": self._mask(x, self.p), "sigma": sigma}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return _on_subset(x, params["mask"], self.p, lambda y, idx: self._blur(y, _take(params["sigma"], idx)))

    def _blur(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, c, H, W = y.shape
        k, pad = self.kernel_size, self.kernel_size // 2
        if pad >= min(H, W):
            raise ValueError(f"blur kernel {k} is too large for {H}x{W} images; use a smaller kernel_size")
        t = torch.arange(k, device=y.device, dtype=y.dtype) - pad
        w = torch.softmax(-(t / sigma[:, None].to(y.dtype)).square() / 2, dim=1)
        w = w.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
        z = F.pad(y.reshape(1, n * c, H, W), (pad, pad, 0, 0), mode="reflect")
        z = F.conv2d(z, w.view(n * c, 1, 1, k), groups=n * c)
        z = F.pad(z, (0, 0, pad, pad), mode="reflect")
        return F.conv2d(z, w.view(n * c, 1, k, 1), groups=n * c).view(n, c, H, W)


class RandomSolarize(RandomOp):
    """With probability ``p`` pixels at or above ``threshold`` are inverted (x → 1 − x)."""

    def __init__(self, threshold: float = 0.5, p: float = 0.2):
        super().__init__()
        self.threshold, self.p = float(threshold), float(p)

    def sample(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": self._mask(x, self.p)}

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return _on_subset(x, params["mask"], self.p, lambda y, idx: torch.where(y >= self.threshold, 1 - y, y))


def view_transform(size: int, scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5,
                   jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8,
                   gray_p: float = 0.2, blur_p: float = 1.0, sigma: tuple[float, float] = (0.1, 2.0),
                   solarize_p: float = 0.0, channels: int = 3) -> nn.Sequential:
    """One view's random transform; every random parameter is drawn per sample (torchvision semantics).

    The first op is the random resized crop (with the horizontal flip folded in). For
    ``channels=1`` the colour jitter acts through brightness and contrast only and
    there is no random grayscale (both as torchvision on grey images).
    """
    ops: list[nn.Module] = [RandomResizedCrop(size, scale=scale, flip_p=flip_p)]
    if jitter_p > 0:
        ops.append(ColorJitter(*jitter, p=jitter_p))
    if channels == 3 and gray_p > 0:
        ops.append(RandomGrayscale(p=gray_p))
    if blur_p > 0:
        ops.append(RandomGaussianBlur(blur_kernel(size), sigma, p=blur_p))
    if solarize_p > 0:  # fixed threshold 0.5, as in BYOL
        ops.append(RandomSolarize(0.5, p=solarize_p))
    return nn.Sequential(*ops)


class Views(nn.Module):
    """A list of view transforms; the first ``n_global`` views are global (they also feed the target)."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]], n_global: int | None = None):
        super().__init__()
        if len(transforms) < 2:
            raise ValueError("a self-supervised recipe needs at least two views")
        self.transforms = nn.ModuleList(t if isinstance(t, nn.Module) else _Fn(t) for t in transforms)
        self.n_global = len(transforms) if n_global is None else n_global
        if not 1 <= self.n_global <= len(transforms):
            raise ValueError(f"n_global must be in 1..{len(transforms)}, got {n_global}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [t(x) for t in self.transforms]


class _Fn(nn.Module):
    """Wraps a plain callable so it can sit in a ModuleList."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def byol_views(image_size: int, channels: int = 3, scale: tuple[float, float] = (0.08, 1.0)) -> Views:
    """BYOL's asymmetric pair: blur p=1.0 / 0.1, solarize p=0 / 0.2 (Grill et al. 2020, table 6).

    ``scale`` is the area range of the random resized crops (raise the minimum for small images).
    """
    return Views([view_transform(image_size, scale=scale, blur_p=1.0, solarize_p=0.0, channels=channels),
                  view_transform(image_size, scale=scale, blur_p=0.1, solarize_p=0.2, channels=channels)])


def simclr_views(image_size: int, strength: float = 1.0, channels: int = 3,
                 scale: tuple[float, float] = (0.08, 1.0)) -> Views:
    """SimCLR's symmetric pair: colour jitter 0.8s/0.8s/0.8s/0.2s at p=0.8, blur p=0.5 (Chen et al. 2020).

    ``scale`` is the area range of the random resized crops (raise the minimum for small images).
    """
    s = strength
    one = dict(scale=scale, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur_p=0.5, channels=channels)
    return Views([view_transform(image_size, **one), view_transform(image_size, **one)])


def multicrop_views(image_size: int, n_local: int = 6, local_size: int | None = None,
                    global_scale: tuple[float, float] = (0.4, 1.0),
                    local_scale: tuple[float, float] = (0.05, 0.4), channels: int = 3) -> Views:
    """Two BYOL-style global crops plus ``n_local`` small crops (Caron et al. 2021, DINO)."""
    local_size = local_size or max(8, round(image_size * 96 / 224))
    g = [view_transform(image_size, scale=global_scale, blur_p=1.0, solarize_p=0.0, channels=channels),
         view_transform(image_size, scale=global_scale, blur_p=0.1, solarize_p=0.2, channels=channels)]
    loc = [view_transform(local_size, scale=local_scale, blur_p=0.5, channels=channels) for _ in range(n_local)]
    return Views(g + loc, n_global=2)


def set_crop_scale(views: Views, scale: tuple[float, float], global_only: bool = True) -> None:
    """Set the area range of the random resized crops of ``views`` (of the global views only by default).

    Local crops of multi-crop recipes keep their own, smaller range unless ``global_only=False``.
    """
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise TypeError(f"crop scale must be a pair (min, max) of area fractions such as (0.25, 1.0), "
                        f"got {scale!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must be (min, max) area fractions with 0 < min <= max <= 1, such as "
                         f"(0.25, 1.0) (torchvision's default is (0.08, 1.0)), got {tuple(scale)}")
    chosen = list(views.transforms)[:views.n_global] if global_only else list(views.transforms)
    crops = [op for view in chosen for op in view.modules() if isinstance(op, RandomResizedCrop)]
    if not crops:
        raise ValueError("these views have no wrapssl RandomResizedCrop to set the crop scale of; "
                         "set the scale inside your own augmentation instead")
    for op in crops:
        op.scale = (lo, hi)


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize (B,C,H,W) to image_size × image_size unless it already is."""
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
