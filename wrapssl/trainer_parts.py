"""The parts a Trainer runs, built and checked before any step: the Learner, the data loader, the start weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .accelerator import accumulation_steps, dynamo_compile_options, make_accelerator
from .config import TrainConfig
from .data import collate
from .interrupt import ignore_stop_signals
from .fsdp import plugin_for, prepare as fsdp_prepare, requested_plugin, shard_learner
from .learner import Learner
from .monitor import non_finite
from .nnutil import private_rng
from .optim import build_optimizer
from .sampler import ResumableSampler
from .tracking import RunLog, make_trackers

__all__ = ["make_accelerator_and_log", "build_learner", "build_loader", "prepare", "load_init", "square_side",
           "steps_per_epoch"]


def make_accelerator_and_log(config: TrainConfig, accelerator_options: dict | None
                             ) -> tuple[Accelerator, RunLog, int, bool | dict, Any]:
    """The Accelerator, the run's log (its trackers), the batches per optimiser step, the compile setting and the
    FSDP plugin (None without FSDP), from the config and the extra ``accelerate.Accelerator`` keywords."""
    options, folder = dict(accelerator_options or {}), Path(config.checkpoint_folder)
    fsdp = requested_plugin(options)  # before the Accelerator: FSDP1 is refused in one line
    accumulation = accumulation_steps(config.gradient_accumulation_steps, options)
    compile = config.compile or dynamo_compile_options(options) or False
    trackers, csv_tracker = make_trackers(config.log_with, folder)
    acc = make_accelerator(options, accumulation, config.mixed_precision, trackers, folder, config.collective_timeout)
    return acc, RunLog(acc, csv_tracker), accumulation, compile, plugin_for(acc, fsdp)


def build_learner(net: nn.Module, image_size: int, channels: int, config: TrainConfig, total_steps: int,
                  compile: bool | dict, accelerator: Accelerator) -> tuple[nn.Module, dict[str, Any]]:
    """The Learner around the user's net (SyncBatchNorm on multi-GPU runs), its views checked at ``image_size``,
    and the keywords it got beyond the net, layer and method (the run records them)."""
    learner_kwargs = dict(config.method_kwargs)
    learner_kwargs.setdefault("total_steps", total_steps)
    if compile:
        learner_kwargs["compile"] = compile
    given = learner_kwargs
    if config.hidden_layer is not None:  # None: the Learner's own default
        learner_kwargs = {"hidden_layer": config.hidden_layer, **learner_kwargs}
    learner = Learner(net, image_size, method=config.method, channels=channels, **learner_kwargs)
    sync_batchnorm = config.sync_batchnorm
    if sync_batchnorm is None:
        sync_batchnorm = accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    if sync_batchnorm:
        learner = nn.SyncBatchNorm.convert_sync_batchnorm(learner)
    check_views(learner, channels, image_size)
    if accelerator.num_processes > 1 and learner.encoder.feeds_channels_last(
            accelerator.device.type, str(accelerator.mixed_precision) != "no"):
        # DDP's gradient buckets take the parameters' strides, and the convolutions' gradients from
        # channels_last views are channels_last: in one layout they are neither copied between layouts
        # nor warned about ("Grad strides do not match bucket view strides")
        learner.to(memory_format=torch.channels_last)
    return learner, given


def build_loader(dataset: Dataset, sampler: Any, batch_size: int, num_workers: int, seed: int,
                 device: torch.device) -> DataLoader:
    """Batches of uint8 images in the resumable sampler's order (a stream orders itself); workers only decode."""
    return DataLoader(dataset, batch_size=batch_size, drop_last=True, collate_fn=collate,
                      sampler=None if isinstance(dataset, IterableDataset) else sampler,
                      num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                      # a private generator: creating an iterator must not draw from the global RNG
                      generator=torch.Generator().manual_seed(seed))


def prepare(accelerator: Accelerator, learner: nn.Module, dataset: Dataset, config: TrainConfig, lr: float, seed: int,
            optimizer_options: dict | None, fsdp_plugin: Any = None) -> tuple[nn.Module, Any, DataLoader, Any]:
    """(model, optimizer, loader, sampler) made ready by Accelerate: the optimiser over the learner at ``lr``, the
    loader in a resumable order (a tar-shard stream is its own sampler: it deals itself to ranks and workers).
    With ``fsdp_plugin`` the learner is sharded first (``fsdp.shard_learner``)."""
    if fsdp_plugin is not None:
        learner = shard_learner(learner, fsdp_plugin)
    opt = build_optimizer(config.optimizer, learner, lr, config.weight_decay, **(optimizer_options or {}))
    acc, batch, workers = accelerator, config.batch_size, config.num_workers
    if isinstance(dataset, IterableDataset):
        dataset.plan(acc.num_processes, acc.process_index, batch, workers, seed)
        model, opt = fsdp_prepare(acc, learner, opt)  # positioned like the sampler; Accelerate must not shard it again
        return model, opt, build_loader(dataset, None, batch, workers, seed, acc.device), dataset
    sampler = ResumableSampler(len(dataset), batch * acc.num_processes, seed)
    model, opt, loader = fsdp_prepare(acc, learner, opt, build_loader(dataset, sampler, batch, workers, seed,
                                                                      acc.device))
    return model, opt, loader, sampler


def steps_per_epoch(images: int, batch_size: int, processes: int, accumulation: int) -> int:
    """Optimiser steps in one pass over ``images``; ValueError naming the fix when not even one fits."""
    per_epoch = images // (batch_size * processes) // accumulation
    if per_epoch < 1:
        raise ValueError(f"the dataset has {images} images, fewer than one optimiser step needs "
                         f"({batch_size * processes * accumulation} = batch_size {batch_size} x "
                         f"{processes} process(es) x {accumulation} accumulation steps); "
                         "lower batch_size or add images")
    return per_epoch


def load_init(net: nn.Module, path: str | os.PathLike, channels: int, image_size: int) -> None:
    """Load the weights at ``path`` into ``net``; its final classifier (never run by pretraining) may differ."""
    from .archs import load_weights
    from .prelogits import classifier_prefix

    head = classifier_prefix(net, channels, image_size)
    load_weights(net, path, ignore=[head] if head else ())
    bad = non_finite(net.state_dict())
    if bad:
        raise ValueError(f"the weights in {os.fspath(path)} hold NaN or inf ({', '.join(bad[:3])}); start from "
                         "another file")


def check_views(learner: Learner, channels: int, image_size: int) -> None:
    """Run the views once on two blank images (own RNG stream), and the net on a meta-device probe at each other
    view size (a multi-crop method's local crops), so that a recipe that cannot work with this size or this net
    fails now, before any data is read or any step is taken."""
    with private_rng(), torch.no_grad():
        try:
            views = learner.views(torch.zeros(2, channels, image_size, image_size))
        except Exception as e:
            raise ValueError(f"the views cannot run on {image_size}x{image_size} images ({e}); use a larger "
                             "image_size") from e
    for side in sorted({v.shape[-1] for v in views} - {image_size}):
        try:
            learner.encoder.probe_width(channels, side)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the method's {side}x{side} views (its local crops) do not run through "
                             f"{type(learner.net).__name__} ({reason}); use a net that takes any image size (a "
                             "timm ViT built with dynamic_img_size=True), or no local crops (method_kwargs "
                             "n_local=0; --method-arg n_local=0), or a local_size the net takes") from e


def square_side(dataset: Dataset) -> int:
    """The side of the dataset's first image (square images expected)."""
    h, w = dataset[0][0].shape[-2:]
    if h != w:
        raise ValueError(f"the dataset's images are {h}x{w}; pass image_size= (the side of the square views)")
    return int(h)
