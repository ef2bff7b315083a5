"""Fine-tune a pretrained backbone with a new classification head on a few labelled images.

    result = finetune("runs/simclr-fashion-mnist", labelled_train, test, out="runs/ft-100")
    print(result.test_accuracy)          # the classifier's top-1 on ``test``
    model = load_classifier("runs/ft-100")   # images in [0, 1] (or uint8) -> logits

The recipe (defaults in ``FinetuneSettings``): the head is first fitted on the frozen features (a
logistic regression, "LP-FT", Kumar et al. 2022, so that fine-tuning starts from a good head and does
not wreck the pretrained features), then the whole net trains with AdamW, the backbone at a tenth of
the head's learning rate, a warmup and a cosine decay, light crops and flips, label smoothing.
Accelerate runs it (several processes, mixed precision); checkpoints are atomic and a re-run continues.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .backbone import Backbone, BackboneInfo, Classifier, _guess_shape, load_backbone
from .finetune_runs import (FinetuneConflictError, load_classifier, resume_point, run_config,  # noqa: F401
                            save_checkpoint, save_classifier)  # the first two: importable from here
from .encoder import LayerSpec
from .nnutil import eval_mode, input_channels, private_rng

__all__ = ["FinetuneSettings", "FinetuneResult", "Classifier", "finetune", "load_classifier", "accuracy",
           "FinetuneConflictError"]

AUGMENTS = ("shift", "crop", "none")


@dataclass(frozen=True)
class FinetuneSettings:
    """How a backbone is fine-tuned; every field has the default measured on Fashion-MNIST (docs/finetuning.md)."""

    steps: int = 300                 # optimiser steps
    batch_size: int = 64             # labelled images per step and process (capped at the labelled count)
    lr: float = 2e-3                 # the head's AdamW learning rate
    backbone_lr_ratio: float = 0.1   # the backbone learns at lr x this (1.0 for a net trained from scratch)
    weight_decay: float = 0.05       # AdamW, on weights only (biases and norms never decay)
    warmup_steps: int | None = None  # linear warmup (default 10% of the steps), then cosine to 0
    label_smoothing: float = 0.1
    augment: str = "shift"           # "shift": random translations by up to 1/8 of the side (zero padding);
    #                                  "crop": random resized crops of crop_scale of the area; "none"
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area of the "crop" augmentation's crops (then resized back)
    flip: bool = True                # random horizontal flips
    linear_init: bool = True         # fit the head on frozen features before fine-tuning (LP-FT)
    seed: int = 0
    mixed_precision: str | None = None  # "no", "fp16", "bf16" (default: accelerate config's)
    checkpoint_every: int = 100
    num_workers: int = 0

    def __post_init__(self) -> None:
        from .checks import non_negative_float, positive_float, positive_int

        positive_int(self.steps, "steps")
        positive_int(self.batch_size, "batch_size")
        positive_int(self.checkpoint_every, "checkpoint_every")
        positive_float(self.lr, "lr")
        non_negative_float(self.weight_decay, "weight_decay")
        if not 0 <= self.backbone_lr_ratio <= 10:
            raise ValueError(f"backbone_lr_ratio must lie in [0, 10] (0 trains the head only), got "
                             f"{self.backbone_lr_ratio}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {self.crop_scale}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")

    def lr_factor(self, step: int) -> float:
        """The learning-rate factor of optimiser step ``step`` (0-based): warmup, then cosine to 0."""
        warmup = self.steps // 10 if self.warmup_steps is None else self.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, self.steps - warmup))))


@dataclass
class FinetuneResult:
    """What fine-tuning gave: the classifier, its test accuracy (None without a test set), where it was saved."""

    model: "Classifier"
    test_accuracy: float | None
    steps: int
    folder: Path | None
    seconds: float


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Every item's label (-1: none), read from ``.labels`` through any Subsets without decoding an image where
    the data set lists them."""
    indices: Sequence[int] = range(len(dataset))
    inner = dataset
    while isinstance(inner, Subset):
        indices, inner = [int(inner.indices[i]) for i in indices], inner.dataset
    labels = getattr(inner, "labels", None)
    if labels is not None and len(labels) == len(inner):
        return torch.as_tensor(labels).long()[list(indices)]
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _labelled(dataset: Dataset) -> list[int]:
    """Indices of the items with a label (>= 0)."""
    return torch.nonzero(dataset_labels(dataset) >= 0).flatten().tolist()


def check_labels(labels: torch.Tensor, what: str = "the labelled images") -> int:
    """The class count of ``labels``; ValueError naming the fix for no labels or a single class."""
    if labels.numel() == 0:
        raise ValueError(f"{what} hold no labels; fine-tuning needs labelled images (a folder with one "
                         "subfolder per class, or a named data set)")
    present = torch.unique(labels)
    if len(present) < 2:
        raise ValueError(f"{what} hold a single class ({int(present[0])}); a classifier needs at least two "
                         "classes of labelled images")
    return int(labels.max()) + 1


class _StepBatches:
    """This process's indices for each optimiser step from ``start``: a seeded shuffle per epoch of the labelled
    set, so a resumed run draws exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch: int, steps: int, start: int, seed: int, rank: int, world: int):
        self.n, self.batch, self.steps, self.start = n, batch, steps, start
        self.seed, self.rank, self.world = seed, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch * self.world
        per_epoch = max(1, self.n // global_batch)
        order, drawn = None, None
        for step in range(self.start, self.steps):
            epoch, k = divmod(step, per_epoch)
            if epoch != drawn:  # one shuffle per epoch
                order, drawn = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch)), epoch
            chunk = order[k * global_batch:(k + 1) * global_batch]
            yield chunk[self.rank * self.batch:(self.rank + 1) * self.batch].tolist()

    def __len__(self) -> int:
        return self.steps - self.start


def _shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to 1/8 of its side in each direction (zeros fill in)."""
    b, c, h, w = images.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(images, (pw, pw, ph, ph))
    dy = torch.randint(0, 2 * ph + 1, (b,), generator=gen).to(images.device)
    dx = torch.randint(0, 2 * pw + 1, (b,), generator=gen).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (b, h): the padded rows each image keeps
    cols = dx[:, None] + torch.arange(w, device=images.device)
    batch = torch.arange(b, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _augment(images: torch.Tensor, settings: FinetuneSettings, seed: int, crop: nn.Module | None = None
             ) -> torch.Tensor:
    """Light views for fine-tuning (``settings.augment``: ``crop`` is its random resized crop, built once; and
    flips), drawn from their own seed (the step's), so a resumed run sees the same views."""
    if crop is not None:
        with private_rng(images.device, seed):
            return crop(images)
    gen = torch.Generator().manual_seed(seed)
    if settings.augment == "shift":
        images = _shift(images, gen)
    if settings.flip:
        flip = (torch.rand(images.shape[0], generator=gen) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def _features(model: Classifier, dataset: Dataset, device: torch.device, batch_size: int = 256
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every item, in eval mode without gradients."""
    from .data import collate

    xs, ys = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with torch.no_grad(), eval_mode(model):
        for images, labels in loader:
            xs.append(model.features(images.to(device)).float().cpu())
            ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def fit_linear_head(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-3,
                    iterations: int = 100) -> None:
    """Set ``head`` to the logistic regression of ``y`` on ``x`` (``evaluate.fit_logistic``, mapped back from
    standardised features)."""
    from .evaluate import fit_logistic

    w, b, mean, std = fit_logistic(x, y, head.out_features, weight_decay, iterations)
    with torch.no_grad():  # logits = ((x - mean) / std) @ w + b = x @ (w / std) + (b - (mean / std) @ w)
        scaled = w / std[:, None]
        head.weight.copy_(scaled.T.to(head.weight))
        head.bias.copy_((b - mean @ scaled).to(head.bias))


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device | None = None
             ) -> float:
    """Top-1 accuracy of ``model`` (images → logits) on the labelled items of ``dataset``, in eval mode."""
    from .data import collate

    device = torch.device(device) if device is not None else next(model.parameters()).device
    keep = _labelled(dataset)
    if not keep:
        raise ValueError("the test images hold no labels; accuracy needs labelled images")
    loader = DataLoader(Subset(dataset, keep), batch_size=batch_size, shuffle=False, collate_fn=collate)
    right = 0
    with torch.no_grad(), eval_mode(model):
        for images, labels in loader:
            right += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
    return right / len(keep)


def _as_backbone(backbone: Backbone | nn.Module | str | os.PathLike, hidden_layer: LayerSpec | None,
                 image_size: int | None) -> Backbone:
    """A ``Backbone`` from a path (its metadata), a loaded one, or a bare net (its pre-logits, ImageNet stats)."""
    if isinstance(backbone, Backbone):
        return backbone
    if isinstance(backbone, (str, os.PathLike)):
        return load_backbone(backbone, hidden_layer=hidden_layer, image_size=image_size)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be a run folder, a weights file, a Backbone or an nn.Module, got "
                        f"{type(backbone).__name__}")
    from .augment.inputs import IMAGENET_MEAN, IMAGENET_STD
    from .prelogits import find_pre_logits

    from .archs import SmallResNet

    channels = input_channels(backbone)
    layer = hidden_layer if hidden_layer is not None else find_pre_logits(backbone, channels, image_size or 224)
    info = BackboneInfo(arch="small_resnet" if type(backbone) is SmallResNet else None,
                        net_class=type(backbone).__name__, image_size=image_size, channels=channels,
                        num_classes=_guess_shape(backbone.state_dict())[1],
                        mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    return Backbone(backbone, layer, info, Path("."))


def _image_size(dataset: Dataset, backbone: Backbone, image_size: int | None) -> int:
    """The side the images are trained at: given, else the backbone's, else the data's first image."""
    side = image_size or backbone.info.image_size
    if side:
        return int(side)
    return int(dataset[0][0].shape[-1])


def finetune(backbone: Backbone | nn.Module | str | os.PathLike, train: Dataset, test: Dataset | None = None, *,
             settings: FinetuneSettings | None = None, out: str | os.PathLike | None = None,
             classes: Sequence[str] | None = None, hidden_layer: LayerSpec | None = None,
             image_size: int | None = None, resume: bool | None = None, progress: bool = True,
             local: bool = False, device: str | torch.device | None = None, **overrides: Any) -> FinetuneResult:
    """Fine-tune ``backbone`` with a new linear head on the labelled items of ``train``; score it on ``test``.

    ``backbone``: a run folder or weights file (read with ``load_backbone``), a ``Backbone``, or a
    bare net (its pre-logits, ImageNet normalisation). The net is trained in place. ``settings``
    (or keyword ``overrides`` of its fields) say how. With ``out``, checkpoints, the classifier
    (``classifier.safetensors``, with its metadata) and ``finetune.json`` (the test accuracy)
    are written there; re-running continues a run with the same settings, other settings raise
    ``FinetuneConflictError`` unless ``resume=True`` (continue with these) — ``resume=False``
    refuses any earlier checkpoint. Runs on every process of ``accelerate launch``; ``local=True`` trains in
    this process alone, on ``device`` (default: CUDA when there is one), whatever the launcher started: what
    one rank does while the others wait (the training app's few-label report).
    """
    from .accelerator import make_accelerator
    from .data import as_dataset, collate

    settings = replace(settings or FinetuneSettings(), **overrides)
    started = time.perf_counter()
    bb = _as_backbone(backbone, hidden_layer, image_size)
    train = as_dataset(train, None, "train")
    all_labels = dataset_labels(train)
    keep = torch.nonzero(all_labels >= 0).flatten().tolist()
    labels = all_labels[keep]
    num_classes = max(check_labels(labels), len(classes or ()))
    if test is not None:
        test = as_dataset(test, None, "test")
        test_labels = dataset_labels(test)
        if test_labels.numel() and int(test_labels.max()) >= num_classes:
            num_classes = int(test_labels.max()) + 1
    side = _image_size(train, bb, image_size)
    folder = Path(out) if out is not None else None

    acc = _Local(device, settings.mixed_precision) if local else \
        make_accelerator({}, 1, settings.mixed_precision, (), folder or Path("."))
    batch = min(settings.batch_size, max(1, len(keep) // acc.num_processes))
    torch.manual_seed(settings.seed)  # the same head on every process
    model = Classifier(bb.net, bb.hidden_layer, num_classes, bb.info.normalize, side, bb.info.channels)
    model.to(acc.device)
    config = run_config(settings, bb, num_classes, side, batch * acc.num_processes, keep, labels)
    start, state = resume_point(folder, config, resume)
    if state is not None:
        model.load_state_dict(state["model"])
    elif settings.linear_init:
        from .evaluate import choose_weight_decay
        x, y = _features(model, Subset(train, keep), acc.device)
        fit_linear_head(model.head, x, y, choose_weight_decay(x, y, num_classes))  # as the few-label probe
        model.head.to(acc.device)

    backbone_params = [p for p in model.encoder.parameters() if p.requires_grad]
    head_params = list(model.head.parameters())
    groups = []
    for params, scale in ((backbone_params, settings.backbone_lr_ratio), (head_params, 1.0)):
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": settings.weight_decay, "scale": scale},
                   {"params": rest, "weight_decay": 0.0, "scale": scale}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    model, optimizer = acc.prepare(model, optimizer)
    classifier: Classifier = acc.unwrap_model(model)

    sampler = _StepBatches(len(keep), batch, settings.steps, start, settings.seed, acc.process_index,
                           acc.num_processes)
    loader = DataLoader(Subset(train, keep), batch_sampler=sampler, collate_fn=collate,
                        num_workers=settings.num_workers, pin_memory=acc.device.type == "cuda")
    from tqdm.auto import tqdm
    bar = tqdm(total=settings.steps, initial=start, desc="fine-tuning", dynamic_ncols=True,
               disable=not (progress and acc.is_main_process))
    from .augment import RandomResizedCrop
    crop = RandomResizedCrop(side, scale=settings.crop_scale, flip_p=0.5 if settings.flip else 0.0) \
        if settings.augment == "crop" else None
    step = start
    model.train()
    try:
        for images, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * group["scale"] * settings.lr_factor(step)
            x = images.to(acc.device, non_blocking=True).float().div_(255) if images.dtype == torch.uint8 \
                else images.to(acc.device).float()
            x = _augment(x, settings, settings.seed * 1_000_003 + step * 64 + acc.process_index, crop)
            with acc.autocast():
                loss = F.cross_entropy(model(x), y.to(acc.device), label_smoothing=settings.label_smoothing)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % 10 == 0 or step == settings.steps:
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"fine-tuning diverged at step {step} (loss {value}); lower --lr "
                                             f"(now {settings.lr:g})")
                bar.set_postfix(loss=f"{value:.3f}")
            if folder is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
                save_checkpoint(acc, classifier, optimizer, step, config, folder)
    finally:
        bar.close()
    score = None
    if test is not None and acc.is_main_process:
        score = accuracy(classifier, test, device=acc.device)
    if folder is not None and acc.is_main_process:
        save_classifier(classifier, bb.info, num_classes, list(classes or bb.info.classes or []), folder, score,
                         config, time.perf_counter() - started)
    acc.wait_for_everyone()
    return FinetuneResult(classifier, score, step, folder, time.perf_counter() - started)


class _Local:
    """What ``finetune`` uses of an Accelerator, for one process alone (no process group, no DDP)."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: str | torch.device | None, mixed_precision: str | None):
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or "no")

    def prepare(self, *objects: Any) -> Any:
        return objects

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self) -> Any:
        import contextlib
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else \
            contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def wait_for_everyone(self) -> None:
        pass
