"""Accelerate Trainer: the training loop around a Learner, from one CPU to many GPUs.

Its parts live beside it: checkpoints.py (files and RNG states), tracking.py
(logged values), monitor.py (NaN/inf checks without per-step host syncs),
sampler.py (a data order that resumes exactly) and accelerator.py (the
Accelerator and the settings read from `accelerate config`).
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import gather_object, set_seed
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .accelerator import accumulation_steps, dynamo_compile_options, make_accelerator, use_deterministic_algorithms
from .checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, checkpoint_path, latest_checkpoint, load_checkpoint,
                          remove_stale_temp_files, rng_state, save_backbone, set_rng_state, to_cpu, write_checkpoint)
from .checks import positive_int
from .data import as_dataset, collate
from .health import Health, embedding_health, probe_images
from .hidden import LayerSpec, input_channels
from .learner import Learner
from .methods import Method
from .monitor import LossMonitor, NonFiniteLossError, Throughput, all_finite, failure_message
from .optim import WarmupCosine, build_optimizer
from .sampler import ResumableSampler
from .tracking import CSVTracker, RunLog, make_trackers

# CSVTracker, latest_checkpoint and load_checkpoint stay importable from here, where they used to live
__all__ = ["Trainer", "NonFiniteLossError", "CSVTracker", "latest_checkpoint", "load_checkpoint"]


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
            an image tensor, or a data set name ("fashion-mnist", "digits") / an image folder path.
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
        resume: "auto" continues from the latest checkpoint in ``checkpoint_folder``
            (a fresh start if there is none); a path continues from that file.
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
        deterministic: deterministic kernels for this process (``torch.use_deterministic_algorithms``,
            cuDNN autotuning off, cuBLAS workspace pinned). On the CPU runs are bit-reproducible
            anyway; on a GPU, cuDNN's fastest convolution backward adds in a varying order, so a
            resumed run ends bit-identical to an uninterrupted one only with this on (slower).
            Ops with no deterministic kernel warn rather than fail.
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
                 channels: int | None = None,
                 sync_batchnorm: bool | None = None, progress: bool = True, plot: bool = True,
                 compile: bool | dict = False, deterministic: bool = False, **method_kwargs: Any):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.checkpoint_every = positive_int(checkpoint_every, "checkpoint_every")
        self.keep_checkpoints = positive_int(keep_checkpoints, "keep_checkpoints")
        self.log_every = positive_int(log_every, "log_every")
        self.eval_every = positive_int(eval_every, "eval_every", allow_none=True)
        self.health_every = positive_int(health_every, "health_every", allow_none=True)
        self.num_workers = int(num_workers)
        _check_settings(learning_rate, schedule, max_grad_norm, eval_every, eval_dataset)

        self.folder = Path(checkpoint_folder)
        kwargs = dict(accelerator_kwargs or {})
        self.grad_accum = accumulation_steps(gradient_accumulation_steps, kwargs)
        compile = compile or dynamo_compile_options(kwargs) or False
        trackers, csv_tracker = make_trackers(log_with, self.folder)
        self.accelerator = acc = make_accelerator(kwargs, self.grad_accum, mixed_precision, trackers, self.folder)
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

        if deterministic:
            use_deterministic_algorithms()
        # Learner heads must start identical on every process: same seed before building them.
        if seed is not None:
            set_seed(seed)
        self.seed = 0 if seed is None else int(seed)
        self.net = net
        self.channels = channels or input_channels(net)
        learner_kwargs = {**(byol_kwargs or {}), **method_kwargs}
        if "sync_batchnorm" in learner_kwargs:  # byol-pytorch's BYOL argument
            sb = learner_kwargs.pop("sync_batchnorm")
            sync_batchnorm = sb if sync_batchnorm is None else sync_batchnorm
        learner_kwargs.setdefault("total_steps", self.num_train_steps)
        if compile:
            learner_kwargs["compile"] = compile
        learner = self._build_learner(hidden_layer, method, sync_batchnorm, learner_kwargs)
        self.lr = learning_rate * (self.global_batch * self.grad_accum / 256 if scale_lr else 1.0)
        opt = build_optimizer(optimizer_klass if optimizer_klass is not None else optimizer, learner, self.lr,
                              weight_decay, **(optimizer_kwargs or {}))
        self.warmup_steps = self.num_train_steps // 10 if warmup_steps is None else int(warmup_steps)
        self.schedule = WarmupCosine(self.num_train_steps, min(self.warmup_steps, self.num_train_steps),
                                     min_lr_ratio, cosine=schedule == "cosine")
        self.sampler = ResumableSampler(len(self.dataset), self.global_batch, self.seed)
        self.model, self.optimizer, self.loader, self.scheduler = acc.prepare(
            learner, opt, self._build_loader(), LambdaLR(opt, self.schedule))
        self.learner: Learner = acc.unwrap_model(self.model)

        self.eval_dataset = None if eval_dataset is None else (
            as_dataset(eval_dataset[0], image_size, "eval_dataset[0]"),
            as_dataset(eval_dataset[1], image_size, "eval_dataset[1]"))
        self.eval_k, self.eval_temperature, self.eval_batch_size = eval_k, eval_temperature, eval_batch_size
        self.last_eval: tuple[int, Any, Any] | None = None  # (step, memory, query Embeddings) of the last knn()
        self.health: Health | None = None  # the latest health reading
        self._health_images: torch.Tensor | None = None
        self._collapse_warned = False
        self._train_seconds, self._clock = 0.0, None  # training time so far; evaluations are not counted
        self.max_grad_norm = max_grad_norm
        self.progress, self.plot, self.log_with = progress, plot, tuple(log_with)
        self.step = 0
        self.epoch, self.samples_in_epoch = 0, 0
        self.last_checkpoint: Path | None = None
        self.config = self._config(method, hidden_layer, optimizer_klass or optimizer, weight_decay, scale_lr,
                                   schedule, min_lr_ratio, learner_kwargs)
        self.resumed_from: Path | None = None
        self._resume(resume)
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
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate,
                          pin_memory=self.accelerator.device.type == "cuda", persistent_workers=self.num_workers > 0,
                          # a private generator: creating an iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(self.seed))

    def _config(self, method: Any, hidden_layer: Any, optimizer: Any, weight_decay: Any, scale_lr: bool,
                schedule: str, min_lr_ratio: float, learner_kwargs: dict) -> dict:
        """The run's settings as JSON-able primitives (stored in checkpoints and trackers)."""
        def plain(v: Any) -> Any:
            return v if isinstance(v, (bool, int, float, str)) or v is None else getattr(v, "__name__", repr(v))
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
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.learner.step = self.step
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

    def _resume(self, resume: str | os.PathLike | bool | None) -> None:
        """Load the checkpoint that ``resume`` points to, if any."""
        if resume is None or resume is False:
            return
        if resume is True or resume == "auto":
            path = latest_checkpoint(self.folder)
            if path is None:
                self.accelerator.print(f"wrapssl: no checkpoint in {self.folder}; starting from step 0")
                return
        else:
            path = Path(resume)
            if not path.is_file():
                raise FileNotFoundError(f"resume checkpoint {str(path)!r} does not exist; pass resume='auto' to "
                                        f"continue from the latest one in {str(self.folder)!r}")
        state = load_checkpoint(path)
        old = state.get("config", {})
        # a longer run (more steps, hence a longer warmup and EMA schedule) is a normal way to resume
        derived = ("num_train_steps", "warmup_steps", "method.total_steps")
        changed = {k: (old[k], v) for k, v in self.config.items() if k in old and old[k] != v and k not in derived}
        if changed:
            warnings.warn(f"resuming {path} with changed settings {changed}; the run will not match an "
                          "uninterrupted one", stacklevel=3)
        self.load_state_dict(state)
        self.last_checkpoint = self.resumed_from = path
        self.accelerator.print(f"wrapssl: resumed from {path} at step {self.step}")

    def save_checkpoint(self) -> Path:
        """Write the full state to ``checkpoint-<step>.pt`` atomically; prune old ones. Collective."""
        if not all_finite(self.learner):
            self._fail(self.step, "weights")
        state = self.state_dict()
        # each process's RNG, so every process resumes its own augmentation stream
        state["rng"] = gather_object([rng_state()]) if self.accelerator.num_processes > 1 else [rng_state()]
        if self.accelerator.is_main_process:
            write_checkpoint(state, self.folder, self.step, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = checkpoint_path(self.folder, self.step)
        return self.last_checkpoint

    def save_backbone(self) -> Path:
        """The user's net's weights as ``backbone.pt`` and ``backbone.safetensors`` in the folder; main process only."""
        return save_backbone(self.accelerator, self.net, self.folder)

    def _fail(self, step: int, what: str) -> None:
        """Stop the run: end the trackers and raise with the step and what to try."""
        message = failure_message(what, step, self.num_train_steps, self.last_checkpoint, self.lr,
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
            self._health_images = probe_images(self.dataset).to(self.accelerator.device)
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
        bar = tqdm(total=self.num_train_steps, initial=self.step, desc="pretraining", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process))
        self.model.train()
        try:
            while self.step < self.num_train_steps:
                self.sampler.position(self.epoch, self.samples_in_epoch)
                for images, _ in self.loader:
                    used = self._batch(images, monitor)
                    if used is not None:
                        bar.update(1)
                        self._after_step(*used, monitor, meter, bar)
                        if self.step >= self.num_train_steps:
                            break
                else:
                    self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        finally:
            bar.close()
            self._pause_clock()
        self._sync_buffers()
        self.save_backbone()
        self._plot_history()
        return self.net

    def end(self) -> None:
        """End the run through Accelerate (``end_training``: trackers closed, process group destroyed)."""
        self.accelerator.end_training()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()

    def _batch(self, images: torch.Tensor, monitor: LossMonitor) -> tuple[float, float] | None:
        """Forward and backward of one batch, and an optimiser step every ``gradient_accumulation_steps``.

        Returns the (lr, EMA momentum) the optimiser step used, or None when gradients only accumulated.
        """
        acc = self.accelerator
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

    def _after_step(self, lr: float, momentum: float, monitor: LossMonitor, meter: Throughput, bar: tqdm) -> None:
        """Log, evaluate and checkpoint when they are due."""
        last = self.step == self.num_train_steps
        meter.steps += 1
        if self.step % self.log_every == 0 or last:
            values = {"loss": self._read_loss(monitor), "lr": lr, "momentum": momentum, "images_per_s": meter.rate(),
                      "train_minutes": self.train_minutes}
            if self.learner.target_encoder is None:  # no EMA target, no momentum to report
                del values["momentum"]
            monitor.reset()
            self.run_log.log(values, self.step)
            bar.set_postfix({k[:5]: f"{v:.4g}" for k, v in values.items() if k != "train_minutes"})
            meter.restart()
        if self.health_every is not None and (self.step % self.health_every == 0 or last) \
                and self.accelerator.is_main_process:
            self.check_health()
            meter.restart()
        if self.eval_every is not None and (self.step % self.eval_every == 0 or last):
            self._evaluate()
            meter.restart()  # images/s counts training only
        if self.step % self.checkpoint_every == 0 or last:
            self._read_loss(monitor)  # a NaN since the last log must not reach the checkpoint
            self.save_checkpoint()
            meter.restart()

    def _read_loss(self, monitor: LossMonitor) -> float:
        """Mean loss of the window over all processes; stops the run if a loss was not finite."""
        loss, bad_step = monitor.read(self.accelerator)
        if bad_step is not None:
            self._fail(bad_step, "loss")
        return loss

    def _sync_buffers(self) -> None:
        """Give every process the main one's buffers (BN statistics drift apart between DDP broadcasts)."""
        if self.accelerator.num_processes > 1:
            for buffer in self.learner.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _plot_history(self) -> None:
        """Save the loss curve PNG, or say in one line why not."""
        if not (self.plot and self.accelerator.is_main_process and self.history):
            return
        try:
            from .plots import loss_curve
            loss_curve(self.history, self.folder / "loss_curve.png")
        except ImportError as e:  # plotting is an extra: training results stand without it
            print(f"wrapssl: no loss-curve plot ({e}); pip install matplotlib")


def _check_settings(learning_rate: float, schedule: str, max_grad_norm: float | None, eval_every: int | None,
                    eval_dataset: Any) -> None:
    """ValueError naming the fix for a setting no run could use."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm}")
    if eval_every is not None and eval_dataset is None:
        raise ValueError("eval_every needs eval_dataset=(train_dataset, test_dataset) with labels "
                         "for the kNN monitor")
    if eval_dataset is not None and (not isinstance(eval_dataset, (tuple, list)) or len(eval_dataset) != 2):
        raise ValueError("eval_dataset must be a pair (train_dataset, test_dataset) of labelled datasets")


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
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    return max(1, round(epochs * per_epoch))
