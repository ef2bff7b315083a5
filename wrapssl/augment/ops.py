"""The recipes' random ops as kornia augmentations, each with a fused kernel as its transform.

Each op is a subclass of kornia's augmentation base classes: it draws its parameters in
``generate_parameters`` (one set per sample, the same whatever the channel count), keeps the
last draw in ``_params``, replays ``op(x, params=op._params)`` exactly, and composes with
any kornia op in ``kornia.augmentation.AugmentationSequential``. The crop is geometric and
exposes its ``transform_matrix``; the others are intensity ops. Parameters are drawn on the
op's device (move it with ``.to(device)``), as kornia's are.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from kornia import augmentation as K
from kornia.geometry.transform import warp_affine

from . import kernels

Params = dict[str, torch.Tensor]


def _probability(p: float, name: str = "p") -> float:
    """``p`` as a float in [0, 1], or a ValueError that says so."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def _range(pair: tuple[float, float], name: str, meaning: str) -> tuple[float, float]:
    """A checked (min, max) with 0 < min <= max."""
    lo, hi = (float(v) for v in pair)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (min, max) {meaning} with 0 < min <= max, got {tuple(pair)}")
    return lo, hi


class RandomOp:
    """What wrapssl's kornia augmentations share: per-sample draws, and kernels run on the chosen samples only.

    A mixin listed before the kornia base class. kornia's own ``transform_inputs`` runs the
    transform on the whole batch and blends the skipped samples back; ours hands the kernel
    only the samples the ``p`` gate chose (a p=0.1 blur costs a tenth). Every op takes any
    channel count and draws the same parameters for all counts: the Learner may run a recipe
    made only of these ops on grey images at one channel and repeat the result.
    """

    hparams: tuple[str, ...] = ()  # the constructor arguments shown by repr

    def _draws(self, batch_shape: torch.Size) -> tuple[int, int]:
        """(batch size, rows to draw): one row shared by the batch under ``same_on_batch``."""
        n = int(batch_shape[0])
        return n, 1 if self.same_on_batch else n

    def _chosen(self, params: Params, x: torch.Tensor) -> torch.Tensor | None:
        """Indices of the samples the ``p`` gate chose; None for all (static p = 1, as kornia)."""
        if self.p == 1.0 and self.p_batch == 1.0:
            return None
        return (params["batch_prob"] > 0.5).nonzero().squeeze(1).to(x.device)

    def transform_inputs(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                         transform: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """kornia's image path without the whole-batch transform and blend: ``apply_transform`` honours the gate."""
        params, flags = self._process_kwargs_to_params_and_flags(
            self._params if params is None else params, flags, **kwargs)
        x = self.transform_tensor(input)
        self.validate_tensor(x)
        return self.transform_output_tensor(self.apply_transform(x, params, flags, transform=transform), input.shape)

    def __repr__(self) -> str:
        args = [f"{k}={getattr(self, k)}" for k in self.hparams] + [f"p={self.p}", f"same_on_batch={self.same_on_batch}"]
        return f"{type(self).__name__}({', '.join(args)})"


class RandomResizedCrop(RandomOp, K.GeometricAugmentationBase2D):
    """torchvision's RandomResizedCrop (and an optional horizontal flip) per sample, as one bilinear resampling.

    Boxes follow torchvision's rule (ten tries of area ∈ scale, log-uniform aspect ratio,
    else a centred fallback); the crop is resized with half-pixel bilinear interpolation,
    without antialiasing, so crops larger than ``size`` alias: feed images about ``size``
    large (the Trainer's loaders do). The flip mirrors the sampling grid, so it costs
    nothing. Parameters: ``top``, ``left``, ``height``, ``width`` (pixels), ``flip`` (bool)
    and ``output_size``; ``transform_matrix`` maps input pixel coordinates (integer pixel
    centres) to output ones, as kornia's geometric ops do, and ``inverse`` warps views back
    onto the input's grid. Applies to every channel.
    """

    hparams = ("size", "scale", "ratio", "flip_p")

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.0, same_on_batch: bool = False):
        super().__init__(p=1.0, same_on_batch=same_on_batch)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be a positive int or (height, width), got {size}")
        self.scale = _range(scale, "scale", "area fractions")
        self.ratio = _range(ratio, "ratio", "aspect ratios")
        self.flip_p = _probability(flip_p, "flip_p")

    def generate_parameters(self, batch_shape: torch.Size) -> Params:
        (n, draws), (H, W), dev = self._draws(batch_shape), batch_shape[-2:], self.device
        tries = 10
        area = H * W * torch.empty(draws, tries, device=dev).uniform_(*self.scale)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.empty(draws, tries, device=dev).uniform_(*log_ratio).exp_()
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
        top = torch.where(found, (torch.rand(draws, device=dev) * (H - h + 1)).floor_(), float((H - fh) // 2))
        left = torch.where(found, (torch.rand(draws, device=dev) * (W - w + 1)).floor_(), float((W - fw) // 2))
        flip = torch.rand(draws, device=dev) < self.flip_p
        params = {"top": top, "left": left, "height": h, "width": w, "flip": flip}
        params = {k: v.expand(n) for k, v in params.items()}
        # kornia's containers read output_size to give the ops after the crop the new image size
        params["output_size"] = torch.tensor(self.size, device=dev).expand(n, 2)
        return params

    def compute_transformation(self, input: torch.Tensor, params: Params, flags: dict[str, Any]) -> torch.Tensor:
        """(B,3,3) matrices from input to output pixel coordinates: x' = (x − left + ½)·out/width − ½, mirrored."""
        dev, dtype = input.device, input.dtype
        (oh, ow), n = self.size, input.shape[0]
        sx = ow / params["width"].to(dev, dtype)
        sy = oh / params["height"].to(dev, dtype)
        tx = sx * (0.5 - params["left"].to(dev, dtype)) - 0.5
        ty = sy * (0.5 - params["top"].to(dev, dtype)) - 0.5
        flip = params["flip"].to(dev)
        m = torch.zeros(n, 3, 3, device=dev, dtype=dtype)
        m[:, 0, 0] = torch.where(flip, -sx, sx)
        m[:, 0, 2] = torch.where(flip, ow - 1 - tx, tx)  # the mirror image x'' = ow − 1 − x'
        m[:, 1, 1], m[:, 1, 2], m[:, 2, 2] = sy, ty, 1.0
        return m

    def inverse_transform(self, input: torch.Tensor, flags: dict[str, Any], transform: torch.Tensor | None = None,
                          size: tuple[int, int] | None = None) -> torch.Tensor:
        """Views warped back onto the input's pixel grid (``transform``: the inverse matrices); zeros outside the crop."""
        if transform is None or size is None:
            raise ValueError("inverting a crop needs its inverse matrices and the input size; call op.inverse(views)")
        return warp_affine(input, transform[:, :2].to(input), tuple(size), align_corners=True)

    def apply_transform(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.resized_crop(input, params["top"], params["left"], params["height"], params["width"],
                                    params["flip"], self.size)


class ColorJitter(RandomOp, K.IntensityAugmentationBase2D):
    """torchvision's ColorJitter per sample: brightness, contrast, saturation, hue in a random per-sample order.

    With probability ``p`` a sample gets factors b, c, s ∈ [1−v, 1+v] and a hue shift ∈
    [−hue, hue] turns, applied in its own random order. Parameters: ``brightness_factor``,
    ``contrast_factor``, ``saturation_factor``, ``hue_factor`` (B,) and ``order`` (B,4).
    RGB images get all four; grey (1-channel) images brightness and contrast only, as in
    torchvision; images of any other channel count pass through unchanged (colour has no
    meaning for them).
    """

    hparams = ("brightness", "contrast", "saturation", "hue")
    factors = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, p: float = 1.0, same_on_batch: bool = False):
        super().__init__(p=_probability(p), same_on_batch=same_on_batch)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] (a fraction of the colour wheel), got {hue}")
        if min(brightness, contrast, saturation) < 0:
            raise ValueError("brightness, contrast and saturation must be >= 0, got "
                             f"{(brightness, contrast, saturation)}")
        self.brightness, self.contrast, self.saturation, self.hue = (
            float(brightness), float(contrast), float(saturation), float(hue))

    def generate_parameters(self, batch_shape: torch.Size) -> Params:
        (n, draws), dev = self._draws(batch_shape), self.device
        strength = (self.brightness, self.contrast, self.saturation)
        lo = torch.tensor([max(0.0, 1 - v) for v in strength] + [-self.hue], device=dev)
        hi = torch.tensor([1 + v for v in strength] + [self.hue], device=dev)
        factors = (lo + (hi - lo) * torch.rand(draws, 4, device=dev)).expand(n, 4)
        order = torch.rand(draws, 4, device=dev).argsort(dim=1).expand(n, 4)  # a uniform permutation per sample
        return {**dict(zip(self.factors, factors.unbind(1))), "order": order}

    def apply_transform(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        if input.shape[1] not in (1, 3):
            return input
        factors = torch.stack([params[k] for k in self.factors], dim=1).to(input.device)
        order = params["order"].to(input.device)
        return kernels.on_subset(input, self._chosen(params, input), lambda y, idx: kernels.jitter(
            y, kernels.take(factors, idx), kernels.take(order, idx), hue=self.hue > 0))


class RandomGrayscale(RandomOp, K.IntensityAugmentationBase2D):
    """With probability ``p`` an RGB sample becomes its luma, repeated over the three channels.

    Images of any other channel count pass through unchanged (grey ones already are grey,
    as torchvision returns them).
    """

    def __init__(self, p: float = 0.2, same_on_batch: bool = False):
        super().__init__(p=_probability(p), same_on_batch=same_on_batch)

    def apply_transform(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        if input.shape[1] != 3:
            return input
        return kernels.on_subset(input, self._chosen(params, input), lambda y, idx: kernels.gray(y).expand_as(y))


class RandomGaussianBlur(RandomOp, K.IntensityAugmentationBase2D):
    """With probability ``p`` a Gaussian blur of side ``kernel_size`` and σ ∈ ``sigma`` drawn per sample.

    Separable, with reflected borders, as torchvision's gaussian_blur; every channel.
    Parameters: ``sigma`` (B,).
    """

    hparams = ("kernel_size", "sigma")

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0), p: float = 1.0,
                 same_on_batch: bool = False):
        super().__init__(p=_probability(p), same_on_batch=same_on_batch)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        self.kernel_size, self.sigma = int(kernel_size), _range(sigma, "sigma", "standard deviations")

    def generate_parameters(self, batch_shape: torch.Size) -> Params:
        n, draws = self._draws(batch_shape)
        return {"sigma": torch.empty(draws, device=self.device).uniform_(*self.sigma).expand(n)}

    def apply_transform(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        sigma = params["sigma"].to(input.device)
        return kernels.on_subset(input, self._chosen(params, input),
                                 lambda y, idx: kernels.gaussian_blur(y, kernels.take(sigma, idx), self.kernel_size))


class RandomSolarize(RandomOp, K.IntensityAugmentationBase2D):
    """With probability ``p`` pixels at or above ``threshold`` are inverted (x → 1 − x), on every channel."""

    hparams = ("threshold",)

    def __init__(self, threshold: float = 0.5, p: float = 0.2, same_on_batch: bool = False):
        super().__init__(p=_probability(p), same_on_batch=same_on_batch)
        self.threshold = float(threshold)

    def apply_transform(self, input: torch.Tensor, params: Params, flags: dict[str, Any],
                        transform: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.on_subset(input, self._chosen(params, input),
                                 lambda y, idx: kernels.solarize(y, self.threshold))
