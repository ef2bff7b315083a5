"""Decode + resize speed of wrapssl.data's paths against torchvision.transforms.v2's uint8 resize, on real photos.

Issue 20 asks whether torchvision's uint8 resize should replace wrapssl's. Two paths are timed, one thread
(as one DataLoader worker), interleaved, median of --reps passes over the same images:

1. Photo files (what ImageFolder and TarShards decode): wrapssl's ``_pil_to_tensor`` (libjpeg's
   reduced-size decode, then one PIL resize that crops and scales in one step, uint8 throughout) against
   PIL decoding the same draft, then ``v2.functional.resize`` (uint8 antialiased bilinear) + a centre crop.
2. Decoded uint8 tensors (what TensorImages, STL-10 and array folders resize): the float round trip through
   ``F.interpolate`` that ``_resize_tensor`` did before issue 20, against ``v2.functional.resize`` on the uint8
   tensor (what ``_resize_tensor`` does now).

The photo folder: --images crops of mixed sizes (about 40 to 1,200 px a side, some narrow) cut from the
real photos that ship inside scikit-learn and matplotlib, saved as JPEG (quality 75-95) and PNG (a few
with transparency), so sizes, formats and modes are mixed as in a user's folder.

    python benchmarks/bench_resize.py                  # 300 photos, 64 and 224 px

Measured at 9a7b4be (2026-12-07 15:39 UTC, 2 busy AMD EPYC cores, load average 5.8; images/s, one thread):

| size | input | PIL / float round trip | torchvision v2 uint8 | ratio |
|---|---|---|---|---|
| 64 px | photo files | 343 | 353 | 1.03x |
| 64 px | decoded uint8 tensors | 1,128 | 3,004 | 2.66x |
| 224 px | photo files | 192 | 206 | 1.08x |
| 224 px | decoded uint8 tensors | 242 | 852 | 3.52x |

Two earlier runs on the same machine under heavier load gave 0.84x and 0.91x (64 px) and 1.18x and 1.00x
(224 px) for the photo files, 2.35x and 3.36x for the tensors. Small tensors gain less (Fashion-MNIST 28 px
to 32 px 1.04x, to 64 px 1.2x; CIFAR 32 px to 64 px 1.9x; STL-10 96 px to 64 px 1.9x). So tensors now resize
with torchvision's uint8 kernel (within one grey level of the float result), and photo files keep PIL: equal
within the noise, and PIL crops the exact centred box while it resizes, where resize-then-crop lands up to
half an output pixel off centre (a mean difference of 4-8 grey levels on these photos).
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from common import machine, markdown_table, median
from wrapssl.data.decode import _cover_scale, _pil_to_tensor


def source_photos() -> list[np.ndarray]:
    """The real photos that ship with scikit-learn and matplotlib, as RGB arrays."""
    import matplotlib
    import sklearn
    paths = [Path(sklearn.__file__).parent / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths if p.is_file()]


def make_photos(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (name, encoded bytes) crops of mixed sizes, aspect ratios, formats and modes."""
    rng = np.random.default_rng(seed)
    sources, out = source_photos(), []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(24, h)), int(rng.integers(24, w))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = Image.fromarray(src[top:top + ch, left:left + cw])
        scale = float(rng.choice([0.5, 1.0, 1.0, 1.5, 2.0]))  # some larger than the source: phone-sized photos
        image = image.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.Resampling.BICUBIC)
        buf, kind = io.BytesIO(), i % 10
        if kind < 7:
            image.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        elif kind < 9:
            image.save(buf, format="PNG", compress_level=1)
        else:
            image.putalpha(200)
            image.save(buf, format="PNG", compress_level=1)
        out.append((f"{i:04d}.{'jpg' if kind < 7 else 'png'}", buf.getvalue()))
    return out


def pil_then_v2(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """PIL decodes (the same reduced-size JPEG draft), then torchvision's uint8 resize and a centre crop."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            scale = _cover_scale(image.height, image.width, size)
            image.draft(None, (int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale))))
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
            image = flat
        array = np.asarray(image.convert("RGB"))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return v2_resize(tensor, size)


def v2_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's uint8 antialiased bilinear resize to cover ``size``, then the centre crop."""
    _, height, width = image.shape
    scale = _cover_scale(height, width, size)
    new_h, new_w = max(size[0], round(height * scale)), max(size[1], round(width * scale))
    if (new_h, new_w) != (height, width):
        image = TF.resize(image, [new_h, new_w], antialias=True)
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return image[:, top:top + size[0], left:left + size[1]].contiguous()


def float_resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The float round trip ``_resize_tensor`` used before issue 20: uint8 -> float -> interpolate -> round."""
    _, height, width = image.shape
    scale = _cover_scale(height, width, size)
    new_h, new_w = max(size[0], round(height * scale)), max(size[1], round(width * scale))
    if (new_h, new_w) != (height, width):
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    top, left = (new_h - size[0]) // 2, (new_w - size[1]) // 2
    return image[:, top:top + size[0], left:left + size[1]].contiguous()


def wrapssl_photo(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return _pil_to_tensor(image, 3, size)


def timed(fn, items, size) -> float:
    """Images per second of ``fn`` over ``items``."""
    start = time.perf_counter()
    for item in items:
        fn(item, size)
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    photos = [data for _, data in make_photos(args.images)]
    decoded = [wrapssl_photo(d, None) for d in photos]  # full-size uint8 tensors for the tensor path
    rows = []
    for side in args.sizes:
        size = (side, side)
        runs: dict[str, list[float]] = {k: [] for k in ("pil", "pil+v2", "interp", "v2")}
        for _ in range(args.reps + 1):  # the first pass warms caches and is dropped
            runs["pil"].append(timed(wrapssl_photo, photos, size))
            runs["pil+v2"].append(timed(pil_then_v2, photos, size))
            runs["interp"].append(timed(float_resize, decoded, size))
            runs["v2"].append(timed(v2_resize, decoded, size))
        med = {k: median(v[1:]) for k, v in runs.items()}
        diff_photo = max((wrapssl_photo(d, size).int() - pil_then_v2(d, size).int()).abs().float().mean().item()
                         for d in photos[:50])
        diff_tensor = max((float_resize(t, size).int() - v2_resize(t, size).int()).abs().max().item()
                          for t in decoded[:50])
        rows.append([f"{side} px", "photo files", f"{med['pil']:,.0f}", f"{med['pil+v2']:,.0f}",
                     f"{med['pil+v2'] / med['pil']:.2f}x", f"mean |diff| <= {diff_photo:.2f}"])
        rows.append([f"{side} px", "decoded uint8 tensors", f"{med['interp']:,.0f}", f"{med['v2']:,.0f}",
                     f"{med['v2'] / med['interp']:.2f}x", f"max |diff| {diff_tensor}"])
    print(machine())
    print(f"{args.images} photo crops, one thread, median of {args.reps} passes (images/s)")
    print("photo files: wrapssl (PIL) against PIL + torchvision; tensors: the float round trip against torchvision")
    print(markdown_table(["size", "input", "PIL / float", "torchvision v2 uint8", "ratio", "outputs"], rows))


if __name__ == "__main__":
    main()
