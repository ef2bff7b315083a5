"""The Trainer's settings: one typed dataclass, validated in one place; the app's flags carry its field names."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .checks import int_at_least, non_negative_float, positive_float, positive_int

__all__ = ["TrainConfig", "DEFAULT_TIMEOUT", "check_eval_dataset"]

DEFAULT_TIMEOUT = 1800.0  # seconds a collective waits for the other processes (torch's own default for gloo)


@dataclass
class TrainConfig:
    """Every setting of a ``Trainer`` run; ``Trainer(net, dataset=..., **fields)`` builds one from its keywords.

    Keywords that are not fields go to ``method_kwargs``. A bad value raises a ValueError
    that names the fix when the config is built (``dataclasses.replace`` checks again).

    Args:
        image_size: side of the square views (default: the side of the dataset's first image).
        hidden_layer: as in ``Learner`` (default: the Learner's, the net's own pre-logits).
        method: a registered method name or a ``Method``; ``method_kwargs`` go to the ``Learner``,
            which passes the ones it does not take (``projection_size``, ``temperature``, ...) to the method.
        learning_rate, num_train_steps / epochs (exactly one), batch_size (per process, >= 2).
        optimizer: "adamw" (default), "sgd", "lars" (1-D parameters get no weight decay) or a
            ``torch.optim.Optimizer`` class (one group of every trainable parameter).
        scale_lr: multiply ``learning_rate`` by global batch / 256 (the linear scaling rule).
        warmup_steps: linear warmup (default: 10% of the steps), then ``schedule`` ("cosine" to
            ``min_lr_ratio``·lr, or "constant").
        gradient_accumulation_steps: batches per optimiser step. Default: what Accelerate was told
            (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` or the Accelerator's options), else 1.
        max_grad_norm, mixed_precision ("no", "fp16", "bf16"): passed to Accelerate (mixed
            precision defaults to `accelerate config`'s).
        num_workers: DataLoader worker processes (they only decode; 0 decodes in the main process).
        seed: the heads' initialisation, the data order and the augmentations (None: 0).
        checkpoint_folder, checkpoint_every, keep_checkpoints: where and how often the run is saved,
            and how many checkpoints are kept.
        resume: what to do with a ``checkpoint_folder`` that holds checkpoints. None (default):
            continue its run if its settings equal these (re-running a script continues it), raise
            ``RunConflictError`` if they differ; an empty folder starts fresh. "auto": continue its
            latest checkpoint with these settings: more steps or another learning rate rebuild the
            schedule at the step reached, as if the run had been planned so from the start (what
            changed is printed). A path: continue from that file (refused if the folder holds later
            checkpoints). False: start at step 0, refused if the folder holds any.
        log_every, log_with: how often the loss, lr and images/s are logged, and to which trackers
            among "tensorboard" and "csv" (both by default, TensorBoard when installed).
        eval_every, eval_k, eval_temperature, eval_batch_size: every ``eval_every`` steps, kNN accuracy
            (k, temperature) of the Trainer's ``eval_dataset = (train, test)``, logged as "knn" with
            "train_minutes" (minutes of training so far, evaluations not counted).
        health_every: every this many steps, the label-free health of the representation on a fixed
            batch of 512 training images (effective rank "rank", RankMe; "embedding_std"); a collapsed
            representation raises a RuntimeWarning that says what to try. None switches it off.
        channels: the net's input channels (default: read from the net).
        init: a weights file to start from (a torchvision/timm state dict, a ``backbone.pt``, a
            checkpoint; see ``archs.load_weights``); the net's final classifier keeps its own values.
        collective_timeout: seconds a collective (gradient all-reduce, barrier) waits for the other
            processes; a stopped, hung or dead process then ends the run with ``CollectiveTimeoutError``.
        sync_batchnorm: SyncBatchNorm across GPUs (default: on for multi-GPU runs).
        progress, plot: the progress bar; the loss-curve PNG at the end (matplotlib).
        compile: ``torch.compile`` the online and target encoders (True, or a dict of its options).
            Default: the dynamo backend of `accelerate config`, if one was chosen.
        deterministic: deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN autotuning
            off): on a GPU, a resumed run ends bit-identical to an uninterrupted one only with this on.
    """

    image_size: int | None = None
    hidden_layer: Any = None
    method: Any = "byol"
    learning_rate: float = 3e-4
    num_train_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    optimizer: Any = "adamw"
    weight_decay: float | None = None
    scale_lr: bool = False
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    gradient_accumulation_steps: int | None = None
    max_grad_norm: float | None = None
    mixed_precision: str | None = None
    num_workers: int = 0
    seed: int | None = 0
    checkpoint_folder: str | os.PathLike = "./checkpoints"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: str | os.PathLike | bool | None = None
    log_every: int = 10
    log_with: Sequence[str] = ("tensorboard", "csv")
    eval_every: int | None = None
    eval_k: int = 200
    eval_temperature: float = 0.1
    eval_batch_size: int = 256
    health_every: int | None = 50
    channels: int | None = None
    init: str | os.PathLike | None = None
    collective_timeout: float | None = DEFAULT_TIMEOUT
    sync_batchnorm: bool | None = None
    progress: bool = True
    plot: bool = True
    compile: bool | dict = False
    deterministic: bool = False
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_keywords(cls, **settings: Any) -> "TrainConfig":
        """A config from the Trainer's keywords: fields by name, every other keyword into ``method_kwargs``."""
        names = {f.name for f in dataclasses.fields(cls)}
        method_kwargs = {**(settings.pop("method_kwargs", None) or {}),
                         **{k: settings.pop(k) for k in list(settings) if k not in names}}
        return cls(**settings, method_kwargs=method_kwargs)

    def validate(self) -> None:
        """ValueError naming the fix for a setting no run could use."""
        self.batch_size = positive_int(self.batch_size, "batch_size")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 (batch norm and the losses compare the images of a "
                             "batch), got 1")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            setattr(self, name, positive_int(getattr(self, name), name))
        for name in ("image_size", "channels", "eval_every", "health_every"):
            setattr(self, name, positive_int(getattr(self, name), name, allow_none=True))
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 decodes in the main process), "
                             f"got {self.num_workers!r}")
        self.collective_timeout = positive_float(self.collective_timeout, "collective_timeout (seconds)",
                                                 allow_none=True)
        self.eval_k, self.eval_batch_size = positive_int(self.eval_k, "eval_k"), positive_int(self.eval_batch_size,
                                                                                           "eval_batch_size")
        positive_float(self.eval_temperature, "eval_temperature")
        positive_float(self.learning_rate, "learning_rate")
        non_negative_float(self.weight_decay, "weight_decay", allow_none=True)
        int_at_least(self.warmup_steps, "warmup_steps", 0, allow_none=True)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0 <= non_negative_float(self.min_lr_ratio, "min_lr_ratio") <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        positive_float(self.max_grad_norm, "max_grad_norm (or None for no clipping)", allow_none=True)
        positive_float(self.epochs, "epochs", allow_none=True)
        if (self.num_train_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of num_train_steps and epochs")
        positive_int(self.num_train_steps, "num_train_steps", allow_none=True)
        if self.num_train_steps is not None:
            self.check_warmup(self.num_train_steps)
        if not isinstance(self.method_kwargs, dict):
            raise TypeError(f"method_kwargs must be a dict of the method's keywords, got "
                            f"{type(self.method_kwargs).__name__}")

    def steps(self, per_epoch: int) -> int:
        """Optimiser steps of the run: ``num_train_steps``, or ``epochs`` of ``per_epoch`` steps."""
        steps = self.num_train_steps if self.num_train_steps is not None else max(1, round(self.epochs * per_epoch))
        return self.check_warmup(steps)

    def check_warmup(self, steps: int) -> int:
        """``steps``, after checking that the warmup fits into that many steps."""
        if self.warmup_steps is not None and self.warmup_steps > steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) is longer than the run ({steps} steps); "
                             f"use at most {steps}, or train longer")
        return steps

    def warmup(self, steps: int) -> int:
        """Warmup steps of a run of ``steps``: the setting, else 10% of the run."""
        return steps // 10 if self.warmup_steps is None else int(self.warmup_steps)


def check_eval_dataset(eval_every: int | None, eval_dataset: Any) -> None:
    """ValueError unless ``eval_dataset`` is a (train, test) pair, given whenever ``eval_every`` asks for it."""
    if eval_every is not None and eval_dataset is None:
        raise ValueError("eval_every needs eval_dataset=(train_dataset, test_dataset) with labels "
                         "for the kNN monitor")
    if eval_dataset is not None and (not isinstance(eval_dataset, (tuple, list)) or len(eval_dataset) != 2):
        raise ValueError("eval_dataset must be a pair (train_dataset, test_dataset) of labelled datasets")
