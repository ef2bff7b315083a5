"""Accelerate Trainer: the training loop around a Learner, from one CPU to many GPUs.

Its parts live beside it: checkpoints.py (files and RNG states), runs.py (which
run a folder holds: continue, start or refuse), tracking.py (logged values),
monitor.py (NaN/inf and blow-up checks without per-step host syncs),
interrupt.py (Ctrl-C and SIGTERM), sampler.py (a data order that resumes
exactly) and accelerator.py (the Accelerator and the settings read from
`accelerate config`).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from .accelerator import accumulation_steps, dynamo_compile_options, make_accelerator, use_deterministic_algorithms
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, checkpoint_path, latest_checkpoint, load_checkpoint,
                          remove_stale_temp_files, rng_state, set_rng_state, to_cpu, write_checkpoint)
from .backbone import BACKBONE_SAFETENSORS, BackboneInfo, layer_to_json, save_backbone
from .checks import non_negative_float, positive_float, positive_int
from .data import as_dataset, collate
from .distributed import CollectiveTimeoutError, collective_failure, is_collective_failure
from .health import Health, embedding_health, probe_images
from .hidden import LayerSpec, input_channels
from .interrupt import StopRequest, TrainingInterrupted, ignore_stop_signals
from .learner import Learner
from .methods import Method
from .monitor import (LossMonitor, NonFiniteLossError, RunEstimate, Throughput, WeightWatch, failure_message,
                      non_finite)
from .optim import WarmupCosine, build_optimizer
from .runs import (SCHEDULE_SETTINGS, RunConflictError, RunLock, RunLockedError, changed_settings, choose_checkpoint,
                   describe_changes)
from .sampler import ResumableSampler
from .tracking import CSVTracker, RunLog, make_trackers

# CSVTracker, latest_checkpoint and load_checkpoint stay importable from here, where they used to live
__all__ = ["Trainer", "NonFiniteLossError", "RunConflictError", "TrainingInterrupted", "CollectiveTimeoutError",
           "CSVTracker", "latest_checkpoint", "load_checkpoint"]

DEFAULT_TIMEOUT = 1800.0  # seconds a collective waits for the other processes (torch's own default for gloo)
ESTIMATE_AFTER = 10  # steps after which the run's remaining time is printed


class Trainer:
    """Self-supervised pretraining of ``net`` on ``dataset`` with Accelerate; ``trainer()`` runs it.

    >>> trainer = Trainer(net, dataset=images, image_size=64, hidden_layer="avgpool",
    ...                   learning_rate=3e-4, num_train_steps=10_000, batch_size=256)
    >>> trainer()
    >>> torch.save(net.state_dict(), "improved.pt")   # also written as <checkpoint_folder>/backbone.pt

    The same script runs on N processes with ``accelerate launch --multi_gpu --num_processes N
    script.py`` (or ``torchrun``): DDP on GPUs, gloo on a machine without them. Batch size is per
    process; checkpoints, logs and plots come from the main process. ``trainer.end()`` (or a
    ``with`` block) ends the trackers and the process group, as Accelerate's ``end_training``.

    byol-pytorch's ``BYOLTrainer`` arguments work as they are (``optimizer_klass``,
    ``byol_kwargs``, ``optimizer_kwargs``, ``accelerator_kwargs``, ``checkpoint_every``,
    ``checkpoint_folder``). Beyond them:

    Args:
        hidden_layer: as in ``Learner`` (default: the Learner's, the net's own pre-logits).
        dataset: any dataset of images or (image, label) items, uint8 or float in [0, 1],
            an image tensor, or a data set name ("fashion-mnist", "digits") / an image folder path, or
            tar shards ("shards/train-{000000..000099}.tar", a glob or a list; ``shards.TarShards``),
            streamed to the processes and workers in epochs of a known length.
            Workers only decode; random augmentation runs inside the Learner on the device.
        method: a registered method name or a ``Method``. Other keywords (``**method_kwargs``,
            merged over ``byol_kwargs``) go to the ``Learner``, which passes the ones it does
            not take (``projection_size``, ``temperature``, ...) on to the method.
        optimizer: "adamw" (default), "sgd" or "lars"; 1-D parameters get no weight decay.
        scale_lr: multiply ``learning_rate`` by global batch / 256 (the linear scaling rule).
        warmup_steps: linear warmup (default: 10% of the steps), then ``schedule``
            ("cosine" to ``min_lr_ratio``·lr, or "constant").
        gradient_accumulation_steps: batches per optimiser step. Default: what Accelerate was
            told (``accelerator_kwargs``, ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``), else 1.
        max_grad_norm, mixed_precision ("no", "fp16", "bf16"): passed to Accelerate
            (mixed precision defaults to `accelerate config`'s).
        resume: what to do with a ``checkpoint_folder`` that holds checkpoints. None (default):
            continue its run if its settings equal these (re-running a script continues it),
            raise ``RunConflictError`` if they differ; an empty folder starts fresh. "auto": continue
            its latest checkpoint with these settings: more steps or another learning rate
            rebuild the schedule at the step reached, as if the run had been planned so from the
            start (what changed is printed). A path: continue from that file (refused if the folder
            holds later checkpoints). False: start at step 0, refused if the folder holds any.
            A folder is trained by one process at a time: while a Trainer (rank 0 of its run) holds
            ``checkpoint_folder`` (from construction to ``end()`` or its process's death, SIGKILL
            included), a Trainer of another process raises ``RunLockedError`` naming the holder.
        init: a weights file to start from (a torchvision/timm state dict, a ``backbone.pt``, a
            checkpoint; see ``archs.load_weights``), loaded into ``net`` before anything else; the
            net's final classifier, which pretraining never runs, keeps its own values.
        eval_every, eval_dataset: every ``eval_every`` steps, kNN accuracy (k=``eval_k``,
            temperature ``eval_temperature``) of ``eval_dataset = (train, test)`` is logged as "knn",
            with the minutes of training so far as "train_minutes" (evaluations not counted).
        health_every: every this many steps, the label-free health of the representation on a fixed
            batch of 512 training images is logged: its effective rank ("rank", RankMe) and the spread
            of its L2-normalised embeddings ("embedding_std"); a collapsed representation raises a
            RuntimeWarning that says what to try. None switches it off.
        log_with: trackers among "tensorboard" and "csv" (both by default, TensorBoard when installed).
        sync_batchnorm: SyncBatchNorm across GPUs (default: on for multi-GPU runs).
        compile: ``torch.compile`` the online and target encoders (``Learner(compile=...)``: True,
            or a dict of ``torch.compile`` options). Default: the dynamo backend of `accelerate
            config`, if one was chosen. The first steps compile (tens of seconds to minutes);
            checkpoints and ``backbone.pt`` keep the plain net's keys.
        collective_timeout: seconds a collective operation (gradient all-reduce, barrier) waits for
            the other processes (default 1800). A stopped, hung or dead process then ends the run with
            a ``CollectiveTimeoutError`` instead of blocking the others forever.
        deterministic: deterministic kernels for this process (``torch.use_deterministic_algorithms``,
            cuDNN autotuning off, cuBLAS workspace pinned). On the CPU runs are bit-reproducible
            anyway; on a GPU, cuDNN's fastest convolution backward adds in a varying order, so a
            resumed run ends bit-identical to an uninterrupted one only with this on (slower).
            Ops with no deterministic kernel warn rather than fail.

    Ctrl-C and SIGTERM finish the current step, write a checkpoint and raise
    ``TrainingInterrupted`` (a ``KeyboardInterrupt``); run again to continue. The loss and the
    weights are checked at every log, evaluation and checkpoint: a NaN, an inf or a weight norm
    grown over 1000x stops the run (``NonFiniteLossError``) before any checkpoint holds it.
    The user's net is trained in train mode: a net handed over in eval mode gets a warning.
    """

    def __init__(self, net: nn.Module, *, dataset: Dataset | torch.Tensor | str, image_size: int | None = None,
                 hidden_layer: LayerSpec | None = None, learning_rate: float = 3e-4, num_train_steps: int | None = None,
                 batch_size: int = 16, optimizer_klass: type[Optimizer] | None = None, checkpoint_every: int = 1000,
                 checkpoint_folder: str | os.PathLike = "./checkpoints", byol_kwargs: dict | None = None,
                 optimizer_kwargs: dict | None = None, accelerator_kwargs: dict | None = None,
                 method: str | Method = "byol", epochs: float | None = None, optimizer: str = "adamw",
                 weight_decay: float | None = None, scale_lr: bool = False, warmup_steps: int | None = None,
                 schedule: str = "cosine", min_lr_ratio: float = 0.0, gradient_accumulation_steps: int | None = None,
                 max_grad_norm: float | None = None, mixed_precision: str | None = None, num_workers: int = 0,
                 seed: int | None = 0, resume: str | os.PathLike | bool | None = None, keep_checkpoints: int = 2,
                 log_every: int = 10, log_with: Sequence[str] = ("tensorboard", "csv"),
                 eval_every: int | None = None, eval_dataset: tuple[Any, Any] | None = None, eval_k: int = 200,
                 eval_temperature: float = 0.1, eval_batch_size: int = 256, health_every: int | None = 50,
                 channels: int | None = None, init: str | os.PathLike | None = None,
                 collective_timeout: float | None = DEFAULT_TIMEOUT,
                 sync_batchnorm: bool | None = None, progress: bool = True, plot: bool = True,
                 compile: bool | dict = False, deterministic: bool = False, **method_kwargs: Any):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.batch_size = positive_int(batch_size, "batch_size")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch norm and the losses compare the images of a "
                             "batch), got 1")
        self.checkpoint_every = positive_int(checkpoint_every, "checkpoint_every")
        self.keep_checkpoints = positive_int(keep_checkpoints, "keep_checkpoints")
        self.log_every = positive_int(log_every, "log_every")
        self.eval_every = positive_int(eval_every, "eval_every", allow_none=True)
        self.health_every = positive_int(health_every, "health_every", allow_none=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 decodes in the main process), got {num_workers!r}")
        self.num_workers = num_workers
        self.collective_timeout = positive_float(collective_timeout, "collective_timeout (seconds)", allow_none=True)
        _check_settings(learning_rate, weight_decay, warmup_steps, schedule, min_lr_ratio, max_grad_norm, epochs,
                        eval_every, eval_dataset)
        _warn_if_eval_mode(net)

        self.folder = Path(checkpoint_folder)
        kwargs = dict(accelerator_kwargs or {})
        self.grad_accum = accumulation_steps(gradient_accumulation_steps, kwargs)
        compile = compile or dynamo_compile_options(kwargs) or False
        trackers, csv_tracker = make_trackers(log_with, self.folder)
        self.accelerator = acc = make_accelerator(kwargs, self.grad_accum, mixed_precision, trackers, self.folder,
                                                  self.collective_timeout)
        self.run_log = RunLog(acc, csv_tracker)

        self.dataset = as_dataset(dataset, image_size, "dataset")
        self.image_size = image_size if image_size is not None else _square_side(self.dataset)
        self.global_batch = self.batch_size * acc.num_processes
        per_epoch = len(self.dataset) // self.global_batch // self.grad_accum
        if per_epoch < 1:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than one optimiser step needs "
                             f"({self.global_batch * self.grad_accum} = batch_size {self.batch_size} x "
                             f"{acc.num_processes} process(es) x {self.grad_accum} accumulation steps); "
                             "lower batch_size or add images")
        self.num_train_steps = _resolve_steps(num_train_steps, epochs, per_epoch)
        if warmup_steps is not None and warmup_steps > self.num_train_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) is longer than the run ({self.num_train_steps} steps); "
                             f"use at most {self.num_train_steps}, or train longer")

        if deterministic:
            use_deterministic_algorithms()
        # Learner heads must start identical on every process: same seed before building them.
        if seed is not None:
            set_seed(seed)
        self.seed = 0 if seed is None else int(seed)
        self.net = net
        self.channels = channels or input_channels(net)
        self.init = init
        if init is not None:
            _load_init(net, init, self.channels, image_size or self.image_size)
        learner_kwargs = {**(byol_kwargs or {}), **method_kwargs}
        if "sync_batchnorm" in learner_kwargs:  # byol-pytorch's BYOL argument
            sb = learner_kwargs.pop("sync_batchnorm")
            sync_batchnorm = sb if sync_batchnorm is None else sync_batchnorm
        learner_kwargs.setdefault("total_steps", self.num_train_steps)
        if compile:
            learner_kwargs["compile"] = compile
        learner = self._build_learner(hidden_layer, method, sync_batchnorm, learner_kwargs)
        _check_views(learner, self.channels, self.image_size)
        if acc.num_processes > 1 and learner.encoder.feeds_channels_last(acc.device.type,
                                                                          str(acc.mixed_precision) != "no"):
            # DDP's gradient buckets take the parameters' strides, and the convolutions' gradients from
            # channels_last views are channels_last: in one layout they are neither copied between layouts
            # nor warned about ("Grad strides do not match bucket view strides")
            learner.to(memory_format=torch.channels_last)
        self.lr = learning_rate * (self.global_batch * self.grad_accum / 256 if scale_lr else 1.0)
        opt = build_optimizer(optimizer_klass if optimizer_klass is not None else optimizer, learner, self.lr,
                              weight_decay, **(optimizer_kwargs or {}))
        self.warmup_steps = self.num_train_steps // 10 if warmup_steps is None else int(warmup_steps)
        self.schedule = WarmupCosine(self.num_train_steps, self.warmup_steps, min_lr_ratio,
                                     cosine=schedule == "cosine")
        self.sampler = ResumableSampler(len(self.dataset), self.global_batch, self.seed)
        if isinstance(self.dataset, IterableDataset):  # tar shards: the stream deals itself to ranks and workers
            self.dataset.plan(acc.num_processes, acc.process_index, self.batch_size, self.num_workers, self.seed)
            self.sampler = self.dataset  # positioned like the sampler; Accelerate must not shard it again
            self.loader = self._build_loader()
            self.model, self.optimizer, self.scheduler = acc.prepare(learner, opt, LambdaLR(opt, self.schedule))
        else:
            self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(
                learner, opt, self._build_loader(), LambdaLR(opt, self.schedule))
        self.learner: Learner = acc.unwrap_model(self.model)

        self.eval_dataset = None if eval_dataset is None else (
            as_dataset(eval_dataset[0], image_size, "eval_dataset[0]"),
            as_dataset(eval_dataset[1], image_size, "eval_dataset[1]"))
        self.eval_k, self.eval_temperature, self.eval_batch_size = eval_k, eval_temperature, eval_batch_size
        # what the saved backbone says of itself beyond what the Trainer knows (the app adds arch and classes)
        self.backbone_info: dict[str, Any] = {}
        self.last_eval: tuple[int, Any, Any] | None = None  # (step, memory, query Embeddings) of the last knn()
        self.health: Health | None = None  # the latest health reading
        self._health_images: torch.Tensor | None = None
        self._collapse_warned = False
        self._train_seconds, self._clock = 0.0, None  # training time so far; evaluations are not counted
        self.max_grad_norm = max_grad_norm
        self._watch: WeightWatch | None = None  # the weight-norm reference of the current fit()
        self.progress, self.plot, self.log_with = progress, plot, tuple(log_with)
        self.step = 0
        self.epoch, self.samples_in_epoch = 0, 0
        self.last_checkpoint: Path | None = None
        self.config = self._config(method, hidden_layer, optimizer_klass or optimizer, weight_decay, scale_lr,
                                   schedule, min_lr_ratio, learner_kwargs)
        self.resumed_from: Path | None = None
        self._run_lock = self._lock_folder()  # before any file of the folder is read: one run at a time
        try:
            self._resume(resume)
        except BaseException:
            self._unlock()
            raise
        if self.resumed_from is None and seed is not None:
            set_seed(self.seed, device_specific=True)  # different augmentations on each process

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every logged value by name, as (step, value) pairs."""
        return self.run_log.history

    # ------------------------------------------------------------------ setup helpers

    def _build_learner(self, hidden_layer: LayerSpec | None, method: str | Method, sync_batchnorm: bool | None,
                       learner_kwargs: dict) -> nn.Module:
        """The Learner around the user's net, with SyncBatchNorm on multi-GPU runs."""
        if hidden_layer is not None:  # None: the Learner's own default
            learner_kwargs = {"hidden_layer": hidden_layer, **learner_kwargs}
        learner = Learner(self.net, self.image_size, method=method, channels=self.channels, **learner_kwargs)
        acc = self.accelerator
        if sync_batchnorm is None:
            sync_batchnorm = acc.num_processes > 1 and acc.device.type == "cuda"
        return nn.SyncBatchNorm.convert_sync_batchnorm(learner) if sync_batchnorm else learner

    def _build_loader(self) -> DataLoader:
        """Batches of uint8 images in the resumable sampler's order; workers only decode."""
        sampler = None if isinstance(self.dataset, IterableDataset) else self.sampler
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=self.accelerator.device.type == "cuda", persistent_workers=self.num_workers > 0,
                          worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
                          # a private generator: creating an iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(self.seed))

    def _config(self, method: Any, hidden_layer: Any, optimizer: Any, weight_decay: Any, scale_lr: bool,
                schedule: str, min_lr_ratio: float, learner_kwargs: dict) -> dict:
        """The run's settings as JSON-able primitives (stored in checkpoints and trackers)."""
        def plain(v: Any) -> Any:
            if isinstance(v, (bool, int, float, str)) or v is None:
                return v
            if isinstance(v, os.PathLike):
                return os.fspath(v)
            if isinstance(v, nn.Module):  # a teacher net: its class, not its whole repr
                return type(v).__name__
            return getattr(v, "__name__", repr(v))
        cfg = {
            "net": type(self.net).__name__, "method": plain(getattr(method, "name", method)),
            "hidden_layer": plain(hidden_layer), "image_size": self.image_size, "channels": self.channels,
            "dataset_size": len(self.dataset), "batch_size": self.batch_size,
            "num_processes": self.accelerator.num_processes, "global_batch": self.global_batch,
            "gradient_accumulation_steps": self.grad_accum, "num_train_steps": self.num_train_steps,
            "learning_rate": self.lr, "optimizer": plain(optimizer), "weight_decay": plain(weight_decay),
            "scale_lr": scale_lr, "warmup_steps": self.warmup_steps, "schedule": schedule,
            "min_lr_ratio": min_lr_ratio, "mixed_precision": str(self.accelerator.mixed_precision),
            "max_grad_norm": plain(self.max_grad_norm), "seed": self.seed,
            # with the class name, the parameter count tells resnet18 from resnet50
            "net_params": sum(p.numel() for p in self.net.parameters()),
            "init": None if self.init is None else os.fspath(self.init),
        }
        cfg.update({f"method.{k}": plain(v) for k, v in learner_kwargs.items()})
        return cfg

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The full training state as tensors and primitive containers (``weights_only``-loadable)."""
        scaler = self.accelerator.scaler
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step,
            "learner": to_cpu(self.learner.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": to_cpu(scaler.state_dict()) if scaler is not None else None,
            "data": {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch, "seed": self.seed},
            "config": dict(self.config),
            "history": self.run_log.state_dict(),
        }

    def load_state_dict(self, state: dict, rng: bool = True) -> None:
        """Restore a ``state_dict()`` (and this process's RNG state when ``rng``)."""
        try:
            self.learner.load_state_dict(state["learner"])
        except RuntimeError as e:
            raise ValueError(f"the checkpoint does not fit this net/method ({e}); resume with the same "
                             "architecture, hidden_layer and method, or start a new checkpoint_folder") from e
        # the optimiser's moments come from the checkpoint, its hyperparameters from this run's settings
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.learner.step = self.step
        self._schedule_at(self.step)
        data = state["data"]
        self.epoch, self.samples_in_epoch = int(data["epoch"]), int(data["samples_in_epoch"])
        self.run_log.load_state_dict(state.get("history", {}))
        if rng:
            states = state.get("rng") or []
            rank, n = self.accelerator.process_index, self.accelerator.num_processes
            if len(states) == n:
                set_rng_state(states[rank])
            else:  # a different process count: fresh but reproducible streams
                set_seed(self.seed + 1_000 * self.step, device_specific=True)

    def _schedule_at(self, step: int) -> None:
        """Put the lr schedule (this run's: its steps, warmup and learning rate) at ``step``."""
        scheduler = self.scheduler.scheduler  # the LambdaLR inside Accelerate's wrapper
        scheduler.last_epoch, scheduler._step_count = step, step + 1
        lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    def _resume(self, resume: str | os.PathLike | bool | None) -> None:
        """Continue the run ``resume`` and the folder point to, if any (see ``runs.choose_checkpoint``)."""
        found = choose_checkpoint(self.folder, resume, self.config)
        if found is None:
            if resume is True or resume == "auto":
                self.accelerator.print(f"wrapssl: no checkpoint in {self.folder}; starting from step 0")
            return
        path, state = found
        step = int(state["step"])
        if step > self.num_train_steps:
            raise ValueError(f"{path} is at step {step}, past this run's num_train_steps={self.num_train_steps}; "
                             f"ask for more than {step} steps to continue it")
        changed = changed_settings(state.get("config", {}), self.config)
        rebuilt = {k: v for k, v in changed.items() if k in SCHEDULE_SETTINGS and not k.startswith("method.")}
        others = {k: v for k, v in changed.items() if k not in SCHEDULE_SETTINGS}
        if others:
            warnings.warn(f"resuming {path} with changed settings ({describe_changes(others)}); the run will not "
                          "match an uninterrupted one", stacklevel=3)
        self.load_state_dict(state)
        self.last_checkpoint = self.resumed_from = path
        how = "re-run with the same settings: " if resume is None else ""
        self.accelerator.print(f"wrapssl: {how}resumed from {path} at step {step} of {self.num_train_steps}")
        if rebuilt and step < self.num_train_steps:
            self.accelerator.print(
                f"wrapssl: schedule rebuilt for the new settings ({describe_changes(rebuilt)}): step {step + 1} "
                f"trains at lr {self.optimizer.param_groups[0]['lr']:.4g}, as a run planned with these settings "
                "from the start would")

    def save_checkpoint(self) -> Path:
        """Write the full state to ``checkpoint-<step>.pt`` atomically; prune old ones. Collective.

        Raises NonFiniteLossError instead if the weights are not finite or have blown up.
        """
        problem = self._weights_problem()
        if problem:
            self._fail(problem, self.step)
        state = self.state_dict()
        # each process's RNG, so every process resumes its own augmentation stream
        state["rng"] = gather_object([rng_state()]) if self.accelerator.num_processes > 1 else [rng_state()]
        if self.accelerator.is_main_process:
            write_checkpoint(state, self.folder, self.step, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = checkpoint_path(self.folder, self.step)
        return self.last_checkpoint

    def save_backbone(self) -> Path:
        """The user's net as ``backbone.safetensors`` (weights and what they are: layer, image size, channels,
        normalisation, and ``self.backbone_info``) and ``backbone.pt`` in the folder; main process only."""
        path = self.folder / BACKBONE_SAFETENSORS
        if self.accelerator.is_main_process:
            norm = self.learner.normalize
            mean, std = (norm.mean.flatten().tolist(), norm.std.flatten().tolist()) if norm.enabled else (None, None)
            info = BackboneInfo(hidden_layer=layer_to_json(self.learner.hidden_layer), image_size=self.image_size,
                                channels=self.channels, mean=mean, std=std, **self.backbone_info)
            save_backbone(self.net, self.folder, info)
        return path

    def _weights_problem(self) -> str | None:
        """What is wrong with the learner's weights (not finite; blown up since fit() began), or None."""
        if self._watch is not None:
            return self._watch.problem(self.learner)
        bad = non_finite(self.learner.state_dict())
        return f"the weights became NaN or infinite ({', '.join(bad[:2])})" if bad else None

    def _fail(self, problem: str, step: int) -> None:
        """Stop the run: end the trackers and raise with the step and what to try."""
        message = failure_message(problem, step, self.num_train_steps, self.last_checkpoint, self.lr,
                                  str(self.accelerator.mixed_precision), self.max_grad_norm)
        self.end()
        raise NonFiniteLossError(message)

    # ------------------------------------------------------------------ evaluation

    def knn(self) -> float:
        """kNN accuracy of the current representation on ``eval_dataset`` (run it on one process)."""
        if self.eval_dataset is None:
            raise ValueError("knn() needs eval_dataset=(train_dataset, test_dataset) given to the Trainer")
        from .evaluate import embed_dataset, knn_accuracy

        train, test = self.eval_dataset
        # a private RNG stream: evaluating must not change the training's augmentations
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            a = embed_dataset(self.learner, train, self.eval_batch_size, self.accelerator.device)
            b = embed_dataset(self.learner, test, self.eval_batch_size, self.accelerator.device)
        keep_a, keep_b = a.labels >= 0, b.labels >= 0
        if not keep_a.any() or not keep_b.any():
            raise ValueError("the kNN monitor needs labelled images in both eval datasets (labels >= 0)")
        self.last_eval = (self.step, a, b)
        return knn_accuracy(a.embeddings[keep_a], a.labels[keep_a], b.embeddings[keep_b], b.labels[keep_b],
                            k=self.eval_k, temperature=self.eval_temperature)

    @property
    def train_minutes(self) -> float:
        """Minutes spent training so far (this run and the runs it resumed), evaluations not counted."""
        running = time.perf_counter() - self._clock if self._clock is not None else 0.0
        return (self._train_seconds + running) / 60

    def _pause_clock(self) -> None:
        if self._clock is not None:
            self._train_seconds += time.perf_counter() - self._clock
            self._clock = None

    def _evaluate(self) -> None:
        """kNN accuracy on the main process, logged as "knn" with "train_minutes"; the others wait."""
        acc = self.accelerator
        self._pause_clock()
        value = [self.knn()] if acc.is_main_process else [0.0]
        if acc.num_processes > 1:
            value = gather_object(value)[:1]
        self.run_log.log({"knn": value[0], "train_minutes": self.train_minutes}, self.step)
        acc.wait_for_everyone()
        self._clock = time.perf_counter()

    def check_health(self) -> Health:
        """The label-free health of the representation now (main process); logged, and warned about once."""
        if self._health_images is None:
            self._health_images = probe_images(_probe_source(self.dataset)).to(self.accelerator.device)
        self._pause_clock()
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda"
                                   else []):
            self.health = embedding_health(self.learner, self._health_images)
        self.run_log.log({"rank": self.health.rank, "embedding_std": self.health.std}, self.step)
        message = self.health.warning(self.step)
        if message and not self._collapse_warned:
            self._collapse_warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        self._clock = time.perf_counter()
        return self.health

    # ------------------------------------------------------------------ the loop

    def __call__(self) -> nn.Module:
        """Train to ``num_train_steps``; returns the user's (now pretrained) net."""
        return self.fit()

    def fit(self) -> nn.Module:
        """Train to ``num_train_steps``, checkpointing and logging; returns the user's net."""
        acc = self.accelerator
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.folder)
        acc.wait_for_everyone()
        self.run_log.start(self.step, self.config)
        minutes = self.history.get("train_minutes")  # a resumed run's clock goes on from its predecessor's
        self._train_seconds = 60 * minutes[-1][1] if minutes and self._clock is None and self.step > 0 else \
            self._train_seconds
        self._clock = time.perf_counter()
        monitor, meter = LossMonitor(acc.device), Throughput(self.global_batch * self.grad_accum)
        estimate = RunEstimate(ESTIMATE_AFTER)
        self._watch = WeightWatch(self.learner)
        bar = tqdm(total=self.num_train_steps, initial=self.step, desc="pretraining", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        self.model.train()
        try:
            with StopRequest() as stop:
                while self.step < self.num_train_steps:
                    self.sampler.position(self.epoch, self.samples_in_epoch)
                    for images, _ in self.loader:
                        used = self._batch(images, monitor)
                        if used is not None:
                            bar.update(1)
                            self._after_step(*used, monitor, meter, bar, stop, estimate)
                            if self.step >= self.num_train_steps:
                                break
                    else:
                        self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        except RuntimeError as e:
            if acc.num_processes > 1 and is_collective_failure(e):
                raise collective_failure(e, self.collective_timeout, self.last_checkpoint) from e
            raise
        finally:
            bar.close()
            self._pause_clock()
        self._sync_buffers()
        self.save_backbone()
        self._plot_history()
        return self.net

    def end(self) -> None:
        """End the run through Accelerate (``end_training``: trackers closed, process group destroyed); unlock
        the folder."""
        self._unlock()
        self.accelerator.end_training()

    def _lock_folder(self) -> RunLock | None:
        """The folder's run lock, taken by the main process; every process raises if the folder cannot be locked
        (``RunLockedError``: another live run trains into it)."""
        acc = self.accelerator
        lock, refused = None, None
        if acc.is_main_process:
            try:
                lock = RunLock.acquire(self.folder)
            except OSError as e:
                refused = (isinstance(e, RunLockedError), str(e))
        if acc.num_processes > 1:
            refused = broadcast_object_list([refused])[0]
        if refused is not None:
            raise (RunLockedError if refused[0] else OSError)(refused[1])
        return lock

    def _unlock(self) -> None:
        """Release this Trainer's hold on the folder's run lock (once)."""
        lock, self._run_lock = getattr(self, "_run_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def _batch(self, images: torch.Tensor, monitor: LossMonitor) -> tuple[float, float] | None:
        """Forward and backward of one batch, and an optimiser step every ``gradient_accumulation_steps``.

        Returns the (lr, EMA momentum) the optimiser step used, or None when gradients only accumulated.
        """
        acc = self.accelerator
        images = images.to(acc.device, non_blocking=True)  # a no-op for batches Accelerate's loader placed
        with acc.accumulate(self.model):
            loss = self.model(images)
            acc.backward(loss)
            if acc.sync_gradients and self.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        monitor.add(loss, self.step + 1)
        self.samples_in_epoch += self.global_batch
        if not acc.sync_gradients:
            return None
        used = (self.optimizer.param_groups[0]["lr"], self.learner.current_momentum)
        self.scheduler.step()
        self.learner.update_moving_average()  # on the unwrapped learner, once per optimiser step
        self.step += 1
        return used

    def _after_step(self, lr: float, momentum: float, monitor: LossMonitor, meter: Throughput, bar: tqdm,
                    stop: StopRequest, estimate: RunEstimate) -> None:
        """Check, log, evaluate and checkpoint when they are due; stop after a checkpoint on a signal."""
        step, last = self.step, self.step == self.num_train_steps
        log = step % self.log_every == 0 or last
        health = self.health_every is not None and (step % self.health_every == 0 or last)
        evaluate = self.eval_every is not None and (step % self.eval_every == 0 or last)
        checkpoint = step % self.checkpoint_every == 0 or last
        stopping = self._stop_agreed(stop, log)
        meter.steps += 1
        note = estimate.update(step, self.num_train_steps, 60 * self.train_minutes)
        if note and self.progress and self.accelerator.is_main_process:
            bar.write(note)  # above the progress bar, not into its line
        if not (log or health or evaluate or checkpoint or stopping):
            return
        loss = self._guard(monitor)  # nothing below may see a NaN or blown-up weights
        if log:
            values = {"loss": loss, "lr": lr, "momentum": momentum, "images_per_s": meter.rate(),
                      "train_minutes": self.train_minutes}
            if self.learner.target_encoder is None:  # no EMA target, no momentum to report
                del values["momentum"]
            monitor.reset()
            self.run_log.log(values, step)
            bar.set_postfix({k[:5]: f"{v:.4g}" for k, v in values.items() if k != "train_minutes"})
        if health and self.accelerator.is_main_process:
            self.check_health()
        if evaluate:
            self._evaluate()
        if checkpoint or stopping:
            self.save_checkpoint()
        meter.restart()  # images/s counts training only, not the checks, evaluations and checkpoints
        if stopping:
            name = stop.requested or "SIGTERM"  # another process received it
            raise TrainingInterrupted(f"training stopped by {name} at step {step} of {self.num_train_steps}; "
                                      f"{self.last_checkpoint} holds it. Run again (same settings, or "
                                      "resume='auto') to continue", name, step, self.last_checkpoint)

    def _stop_agreed(self, stop: StopRequest, log_point: bool) -> bool:
        """True when the run should stop now: at once on one process, at the next log point on many
        (all processes must checkpoint the same step; the flag rides on a reduction there)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return stop.requested is not None
        if not log_point:
            return False
        flag = torch.tensor([float(stop.requested is not None)], device=acc.device)
        return bool(acc.reduce(flag, "sum").item() > 0)

    def _guard(self, monitor: LossMonitor) -> float:
        """Mean loss of the window over all processes; stops the run if a loss was not finite or the weights
        are not sound."""
        loss, bad_step = monitor.read(self.accelerator)
        if bad_step is not None:
            self._fail("the loss became NaN or infinite", bad_step)
        problem = self._weights_problem()
        if problem:
            self._fail(problem, self.step)
        return loss

    def _sync_buffers(self) -> None:
        """Give every process the main one's buffers (BN statistics drift apart between DDP broadcasts)."""
        if self.accelerator.num_processes > 1:
            for buffer in self.learner.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _plot_history(self) -> None:
        """Save the loss curve PNG (and, for masked image modeling, reconstructions.png), or say in one line
        why not."""
        if not (self.plot and self.accelerator.is_main_process and self.history):
            return
        try:
            from .plots import loss_curve, reconstruction_grid
            loss_curve(self.history, self.folder / "loss_curve.png",
                       dim=self.health.dim if self.health is not None else None)
            if callable(getattr(self.learner.method, "reconstruct", None)):
                images = probe_images(_probe_source(self.dataset), n=8).to(self.accelerator.device)
                reconstruction_grid(self.learner, images, self.folder / "reconstructions.png")
        except ImportError as e:  # plotting is an extra: training results stand without it
            print(f"wrapssl: no loss-curve plot ({e}); pip install matplotlib")


def _check_settings(learning_rate: float, weight_decay: float | None, warmup_steps: int | None, schedule: str,
                    min_lr_ratio: float, max_grad_norm: float | None, epochs: float | None, eval_every: int | None,
                    eval_dataset: Any) -> None:
    """ValueError naming the fix for a setting no run could use."""
    positive_float(learning_rate, "learning_rate")
    non_negative_float(weight_decay, "weight_decay", allow_none=True)
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                     or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not 0 <= non_negative_float(min_lr_ratio, "min_lr_ratio") <= 1:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    positive_float(max_grad_norm, "max_grad_norm (or None for no clipping)", allow_none=True)
    positive_float(epochs, "epochs", allow_none=True)
    if eval_every is not None and eval_dataset is None:
        raise ValueError("eval_every needs eval_dataset=(train_dataset, test_dataset) with labels "
                         "for the kNN monitor")
    if eval_dataset is not None and (not isinstance(eval_dataset, (tuple, list)) or len(eval_dataset) != 2):
        raise ValueError("eval_dataset must be a pair (train_dataset, test_dataset) of labelled datasets")


def _probe_source(dataset: Dataset) -> Dataset:
    """Where probe images come from: the dataset, or the first samples of a stream (no random access)."""
    return dataset.head(512) if isinstance(dataset, IterableDataset) else dataset


def _warn_if_eval_mode(net: nn.Module) -> None:
    """Warn that a net handed over in eval mode is trained in train mode (BatchNorm statistics move)."""
    frozen = [name or type(net).__name__ for name, m in net.named_modules() if not m.training]
    if frozen:
        warnings.warn(f"{type(net).__name__} is in eval mode ({len(frozen)} module(s), e.g. {frozen[0]!r}); the "
                      "Trainer trains it in train mode, so BatchNorm statistics update and dropout is active. To "
                      "keep BatchNorm frozen, replace it with torchvision.ops.FrozenBatchNorm2d, which ignores "
                      "train()", RuntimeWarning, stacklevel=3)


def _load_init(net: nn.Module, path: str | os.PathLike, channels: int, image_size: int) -> None:
    """Load the weights at ``path`` into ``net``; its final classifier (never run by pretraining) may differ."""
    from .archs import load_weights
    from .hidden import ClassifierInput
    from .prelogits import TimmPreLogits, find_pre_logits

    layer = find_pre_logits(net, channels, image_size)
    head = None
    if isinstance(layer, ClassifierInput):
        head = layer.classifier
    elif isinstance(layer, TimmPreLogits):
        module = net.get_classifier()
        head = next((n for n, m in net.named_modules() if m is module and n), None)
    load_weights(net, path, ignore=[f"{head}."] if head else ())
    bad = non_finite(net.state_dict())
    if bad:
        raise ValueError(f"the weights in {os.fspath(path)} hold NaN or inf ({', '.join(bad[:3])}); start from "
                         "another file")


def _check_views(learner: Learner, channels: int, image_size: int) -> None:
    """Run the views once on two blank images (own RNG stream), so a recipe that cannot work at this size fails
    now, before any data is read or any step is taken."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            learner.views(torch.zeros(2, channels, image_size, image_size))
        except Exception as e:
            raise ValueError(f"the views cannot run on {image_size}x{image_size} images ({e}); use a larger "
                             "image_size") from e


def _square_side(dataset: Dataset) -> int:
    """The side of the dataset's first image (square images expected)."""
    h, w = dataset[0][0].shape[-2:]
    if h != w:
        raise ValueError(f"the dataset's images are {h}x{w}; pass image_size= (the side of the square views)")
    return int(h)


def _resolve_steps(num_train_steps: int | None, epochs: float | None, per_epoch: int) -> int:
    """Optimiser steps from ``num_train_steps`` or ``epochs`` (exactly one of them)."""
    if (num_train_steps is None) == (epochs is None):
        raise ValueError("give exactly one of num_train_steps and epochs")
    if num_train_steps is not None:
        return positive_int(num_train_steps, "num_train_steps")
    return max(1, round(epochs * per_epoch))
