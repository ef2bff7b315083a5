"""The training loop and its state: setup, the step, checkpoint and resume, fit; all else are callbacks on its hook.

Its settings are config.TrainConfig; its parts are built in trainer_parts.py; lr and EMA momentum come from
schedules.py; checkpoints.py, runs.py, monitor.py, interrupt.py and callbacks.py hold the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import Dataset

from .accelerator import use_deterministic_algorithms
from .callbacks import Callback, StepInfo, check_health, default_callbacks, run_callbacks
from .checkpoints import latest_checkpoint, load_checkpoint, remove_stale_temp_files, save_trainer
from .config import TrainConfig
from .data import as_dataset
from .distributed import CollectiveTimeoutError, collective_failure, is_collective_failure
from .health import Health
from .interrupt import StopRequest, TrainingInterrupted
from .monitor import LossMonitor, NonFiniteLossError, Progress, TrainClock, WeightWatch, stop_if_unsound
from .nnutil import input_channels, warn_if_frozen
from .runs import RunConflictError, lock_folder, resume_run, run_record
from .schedules import Schedules
from .tracking import CSVTracker
from .trainer_parts import build_learner, make_accelerator_and_log, load_init, prepare, square_side, steps_per_epoch

# CSVTracker, latest_checkpoint and load_checkpoint stay importable from here, where they used to live
__all__ = ["Trainer", "TrainConfig", "NonFiniteLossError", "RunConflictError", "TrainingInterrupted",
           "CollectiveTimeoutError", "CSVTracker", "latest_checkpoint", "load_checkpoint"]


class Trainer:
    """Self-supervised pretraining of ``net`` on ``dataset`` with Accelerate; ``trainer()`` runs it.

    >>> trainer = Trainer(net, dataset=images, image_size=64, num_train_steps=10_000, batch_size=256)
    >>> trainer()    # or Trainer(net, dataset=images, config=TrainConfig(image_size=64, ...)): the same names
    >>> torch.save(net.state_dict(), "improved.pt")   # also written as <checkpoint_folder>/backbone.pt

    Settings: ``TrainConfig``'s fields (``trainer.config``); other keywords go to the method. ``dataset``:
    images or (image, label) items, uint8 or float in [0, 1], a tensor, a data set name, a folder or tar
    shards; ``eval_dataset=(train, test)``: labelled sets for kNN. ``accelerator_options`` /
    ``optimizer_options``: keywords for ``accelerate.Accelerator`` / the optimiser (byol-pytorch's names:
    ``compat.BYOLTrainer``). The hook: ``callbacks=[...]`` or ``add_callback(cb)`` appends to
    ``trainer.callbacks`` (by default health, kNN, the backbone export and the loss curve); each callback
    gets ``on_step(trainer, StepInfo)`` after the optimiser steps it is ``due`` at, and
    ``on_fit_end(trainer)`` (see ``callbacks``). ``trainer.step`` is ``learner.step``, the one counter;
    each step's lr and EMA momentum come precomputed from ``trainer.schedules``. ``end()`` or a ``with``
    block ends the trackers and unlocks the folder (one run per folder; else ``RunLockedError``). Ctrl-C
    and SIGTERM checkpoint the step and raise ``TrainingInterrupted``; a NaN loss or blown-up weights stop
    the run (``NonFiniteLossError``) before any checkpoint holds them.
    """

    def __init__(self, net: nn.Module, *, dataset: Dataset | torch.Tensor | str, config: TrainConfig | None = None,
                 eval_dataset: tuple[Any, Any] | None = None, callbacks: Sequence[Callback] = (),
                 accelerator_options: dict | None = None, optimizer_options: dict | None = None, **settings: Any):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if config is not None and settings:
            raise TypeError(f"give config= or keyword settings, not both (got {', '.join(settings)})")
        self.config = cfg = config if config is not None else TrainConfig.from_keywords(**settings)
        self.callbacks: list[Callback] = default_callbacks(cfg, eval_dataset) + [*callbacks]  # checks eval_dataset
        warn_if_frozen(net, "the Trainer trains the net in train mode", "BatchNorm statistics update and dropout "
                       "is active", stacklevel=2)
        self.folder = Path(cfg.checkpoint_folder)
        (self.accelerator, self.run_log, self.grad_accum, compile,
         self.fsdp_plugin) = make_accelerator_and_log(cfg, accelerator_options)  # the plugin: None without FSDP
        acc = self.accelerator
        self.dataset = as_dataset(dataset, cfg.image_size, "dataset")
        self.image_size = cfg.image_size if cfg.image_size is not None else square_side(self.dataset)
        self.global_batch = cfg.batch_size * acc.num_processes
        self.num_train_steps = cfg.steps(steps_per_epoch(len(self.dataset), cfg.batch_size, acc.num_processes,
                                                         self.grad_accum))
        if cfg.deterministic:
            use_deterministic_algorithms()
        if cfg.seed is not None:  # Learner heads must start identical on every process
            set_seed(cfg.seed)
        self.seed, self.net = 0 if cfg.seed is None else int(cfg.seed), net
        self.channels = cfg.channels or input_channels(net)
        if cfg.init is not None:
            load_init(net, cfg.init, self.channels, cfg.image_size or self.image_size)
        learner, learner_kwargs = build_learner(net, self.image_size, self.channels, cfg, self.num_train_steps,
                                                compile, acc)
        self.lr = cfg.learning_rate * (self.global_batch * self.grad_accum / 256 if cfg.scale_lr else 1.0)
        self.model, self.optimizer, self.loader, self.sampler = prepare(acc, learner, self.dataset, cfg, self.lr,
                                                                        self.seed, optimizer_options, self.fsdp_plugin)
        self.learner = acc.unwrap_model(self.model)
        self.warmup_steps = cfg.warmup(self.num_train_steps)
        self.schedules = Schedules(self.num_train_steps, self.warmup_steps, cfg.min_lr_ratio, cfg.schedule == "cosine",
                                   self.learner.momentum, self.learner.total_steps,
                                   [group["lr"] for group in self.optimizer.param_groups])
        # what the saved backbone says of itself beyond what the Trainer knows (the app adds arch and classes)
        self.backbone_info: dict[str, Any] = {}
        self.last_eval: tuple[int, Any, Any] | None = None  # (step, memory, query Embeddings) of the last kNN
        self.health: Health | None = None  # the latest health reading
        self.clock, self._watch = TrainClock(), None  # training time; the weight-norm reference of fit()
        self.epoch, self.samples_in_epoch = 0, 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.record = run_record(self, learner_kwargs)  # the settings a checkpoint stores, as plain data
        self._run_lock = lock_folder(acc, self.folder)  # before any file of the folder is read: one run at a time
        try:
            resume_run(self, cfg.resume)
        except BaseException:
            self._unlock()
            raise
        if self.resumed_from is None and cfg.seed is not None:
            set_seed(self.seed, device_specific=True)  # different augmentations on each process
        self.schedules.set_lr(self.optimizer, self.step)

    @property
    def step(self) -> int:
        """Optimiser steps taken: the Learner's count, the run's one step counter."""
        return self.learner.step

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Every logged value by name, as (step, value) pairs."""
        return self.run_log.history

    @property
    def train_minutes(self) -> float:
        """Minutes spent training so far (this run and the runs it resumed), callbacks' time not counted."""
        return self.clock.minutes

    def add_callback(self, callback: Callback) -> None:
        """Run ``callback`` after the others (see ``callbacks.Callback``)."""
        self.callbacks.append(callback)

    def check_health(self) -> Health:
        """The label-free health of the representation now (main process); logged, and warned about once."""
        return check_health(self)

    def save_checkpoint(self) -> Path:
        """Write the full state to ``checkpoint-<step>.pt`` atomically and prune old ones (collective); raises
        NonFiniteLossError instead if the weights are not finite or have blown up."""
        stop_if_unsound(self, self._watch)
        self.last_checkpoint = save_trainer(self)
        return self.last_checkpoint

    # ------------------------------------------------------------------ the loop

    def fit(self) -> nn.Module:
        """Train to ``num_train_steps``, checkpointing, logging and calling the callbacks; returns the user's net."""
        acc = self.accelerator
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.folder)
        acc.wait_for_everyone()
        self.run_log.start(self.step, self.record)
        self.clock.resume(self.history, self.step)
        progress = Progress(acc, self.global_batch * self.grad_accum, self.step, self.num_train_steps,
                            self.config.progress)
        self._watch = WeightWatch(self.learner)
        self.model.train()
        try:
            with StopRequest() as stop:
                while self.step < self.num_train_steps:
                    self.sampler.position(self.epoch, self.samples_in_epoch)
                    for images, _ in self.loader:
                        used = self._batch(images, progress.loss)
                        if used is not None:
                            progress.stepped(self.step, 60 * self.train_minutes)
                            self._after_step(*used, progress, stop)
                            if self.step >= self.num_train_steps:
                                break
                    else:
                        self.epoch, self.samples_in_epoch = self.epoch + 1, 0
        except RuntimeError as e:
            if acc.num_processes > 1 and is_collective_failure(e):
                raise collective_failure(e, self.config.collective_timeout, self.last_checkpoint) from e
            raise
        finally:
            progress.bar.close()
            self.clock.pause()
        if acc.num_processes > 1:  # every process gets the main one's buffers (BN statistics drift apart)
            for buffer in self.learner.buffers():
                torch.distributed.broadcast(buffer, src=0)
        for callback in self.callbacks:
            callback.on_fit_end(self)
        return self.net

    __call__ = fit

    def _batch(self, images: torch.Tensor, monitor: LossMonitor) -> tuple[float, float] | None:
        """Forward and backward of one batch, and an optimiser step (at its scheduled lr) and an EMA step (at its
        scheduled momentum) every ``gradient_accumulation_steps``; returns that (lr, momentum), else None."""
        acc, step = self.accelerator, self.step
        images = images.to(acc.device, non_blocking=True)  # a no-op for batches Accelerate's loader placed
        with acc.accumulate(self.model):
            loss = self.model(images)
            acc.backward(loss)
            if acc.sync_gradients:
                self.schedules.set_lr(self.optimizer, step)
                if self.config.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        monitor.add(loss, step + 1)
        self.samples_in_epoch += self.global_batch
        if not acc.sync_gradients:
            return None
        momentum = self.schedules.momentum[step]
        self.learner.update_moving_average(momentum)  # on the unwrapped learner; advances the step count
        return self.optimizer.param_groups[0]["lr"], momentum

    def _after_step(self, lr: float, momentum: float | None, progress: Progress, stop: StopRequest) -> None:
        """Log, run the callbacks and checkpoint when they are due; stop after a checkpoint on a signal."""
        cfg, step = self.config, self.step
        last = step == self.num_train_steps
        log, checkpoint = step % cfg.log_every == 0 or last, step % cfg.checkpoint_every == 0 or last
        due = [callback for callback in self.callbacks if callback.due(step, last)]
        checked = log or checkpoint or any(callback.checked for callback in due)
        # nothing below may see a NaN or blown-up weights
        loss = stop_if_unsound(self, self._watch, progress.loss) if checked else None
        momentum = momentum if self.learner.target_encoder is not None else None  # no EMA target, no momentum
        if log:
            self.run_log.log(progress.values(loss, lr, momentum, self.train_minutes), step)
        if due:
            run_callbacks(self, due, StepInfo(step, lr, momentum, loss if log else None, last))
        stopping = stop.agreed(self.accelerator, log)
        if stopping and not checked:
            stop_if_unsound(self, self._watch, progress.loss)
        if checkpoint or stopping:
            self.save_checkpoint()
        if checked or stopping:
            progress.meter.restart()  # images/s counts training only, not the checks, evaluations and checkpoints
        if stopping:
            raise stop.interrupted(step, self.num_train_steps, self.last_checkpoint)

    def end(self) -> None:
        """End the run through Accelerate (``end_training``: trackers closed, process group destroyed); unlock
        the folder."""
        self._unlock()
        self.accelerator.end_training()

    def _unlock(self) -> None:
        """Release this Trainer's hold on the folder's run lock (once)."""
        lock, self._run_lock = getattr(self, "_run_lock", None), None
        if lock is not None:
            lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()
