"""Accelerate Trainer: the loop, schedules, checkpoints, logging; from one CPU to many GPUs.

Checks without host syncs: each step adds the loss to an on-device running sum
and records, still on the device, the first step whose loss was not finite.
Both are read once per ``log_every`` steps (the read that logging needs
anyway) and before every checkpoint, so a NaN stops the run at the next log
or checkpoint point, names the step where it began, and never reaches a
checkpoint file. Parameters are also checked for finiteness before each save.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, GradientAccumulationPlugin,
                              ProjectConfiguration, gather_object, set_seed)
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checks import positive_int
from .data import as_uint8_dataset, collate, load_dataset
from .files import atomic_open, atomic_save, atomic_write_text
from .hidden import LayerSpec, input_channels
from .learner import Learner
from .methods import Method
from .optim import WarmupCosine, build_optimizer

__all__ = ["Trainer", "NonFiniteLossError", "CSVTracker", "latest_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "wrapssl.trainer"
CHECKPOINT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) stopped being finite; training was stopped before any bad checkpoint."""


# ----------------------------------------------------------------------------- files

def _checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``folder``, or None."""
    found = _checkpoints(folder)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Trainer checkpoint as plain data, loaded with ``weights_only=True`` onto the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{os.fspath(path)} is not a readable checkpoint ({type(e).__name__}: {e}); "
                         "pick another checkpoint from the folder or start without resume") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a wrapssl Trainer checkpoint (for the bare net weights "
                         "use net.load_state_dict(torch.load(path)) instead)")
    return state


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and moved to the CPU (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- RNG

def _rng_state() -> dict:
    """This process's torch, CUDA, NumPy and Python RNG states as tensors and primitives."""
    np_state = np.random.get_state()
    version, mt, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }


def _set_rng_state(state: dict) -> None:
    """Restore what ``_rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


# ----------------------------------------------------------------------------- data order

class ResumableSampler(Sampler[int]):
    """A seeded shuffle per epoch that can start part-way through an epoch.

    Epoch ``e`` is ``randperm(n)`` from a generator seeded with (seed, e);
    ``skip`` leading indices are dropped (the samples already trained on) and
    the rest is cut to whole global batches, so every process gets full,
    equal batches and the order is the same however often the run resumes.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0):
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.epoch, self.skip = 0, 0

    def position(self, epoch: int, skip: int) -> None:
        """Start the next iteration at sample ``skip`` of epoch ``epoch``."""
        self.epoch, self.skip = int(epoch), int(skip)

    def _count(self) -> int:
        return max(0, (self.num_samples - self.skip) // self.global_batch * self.global_batch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
        order = torch.randperm(self.num_samples, generator=g)
        return iter(order[self.skip:self.skip + self._count()].tolist())

    def __len__(self) -> int:
        return self._count()


# ----------------------------------------------------------------------------- logging

class CSVTracker(GeneralTracker):
    """An Accelerate tracker writing ``step,name,value`` rows to a CSV file (long format).

    On resume (``resume_step``) rows logged after that step by the interrupted
    run are dropped, so the file never holds two values for one step.
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self._file = None
        self._writer = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[list[str]] = []
        if self.resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= self.resume_step]
        # rewrite through a temp file so a crash here cannot lose the old log
        with atomic_open(self.path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["step", "name", "value"], *rows])
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        atomic_write_text(self.path.with_name("config.json"), json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        if self._writer is None:
            self.start()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.writerow([step, key, repr(float(value))])
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


def _has_accelerator() -> bool:
    """True if torch sees a GPU (or another accelerator)."""
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _warn_single_cpu_launch() -> None:
    """Say so when `accelerate launch --cpu --num_processes N` started this as the only process."""
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # accelerate sets MASTER_PORT only when more than one process was asked for; without MPI it starts one
    ranks = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_cpu and "MASTER_PORT" in os.environ and not any(k in os.environ for k in ranks):
        warnings.warn("accelerate launch --cpu started a single process (it runs several CPU processes only "
                      "through mpirun). For N CPU processes use `accelerate launch --multi_gpu --num_processes N "
                      "script.py` or `torchrun --nproc_per_node N script.py`; wrapssl then trains over gloo.",
                      RuntimeWarning, stacklevel=4)


def _tensorboard_available() -> bool:
    """True if torch's TensorBoard writer can be imported."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class _LossMonitor:
    """Running loss sum and first non-finite step, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()
        self.first_bad = torch.full((), -1.0, device=device)  # float32: exact to 16M steps, and MPS has no float64

    def reset(self) -> None:
        """Start a new logging window (the first-bad record persists)."""
        self.total = torch.zeros((), device=self.device)
        self.count = 0

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Account one micro-batch loss belonging to optimiser step ``step`` (1-based)."""
        value = loss.detach().float()
        self.total += value
        self.count += 1
        bad = ~torch.isfinite(value) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)


class _Throughput:
    """Images per second over the optimiser steps since the last restart."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def rate(self) -> float:
        return self.steps * self.images_per_step / max(time.perf_counter() - self.start, 1e-9)


# ----------------------------------------------------------------------------- the trainer

def _use_deterministic_algorithms() -> None:
    """Deterministic kernels for the rest of this process (a global switch, as torch's own)."""
    # cuBLAS reads this when its first handle is made; setting it before any GPU matmul is enough
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _as_dataset(data: Dataset | torch.Tensor | str, image_size: int | None, what: str) -> Dataset:
    """A dataset of (uint8 image, label) items from a spec string, a tensor or any image dataset."""
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(os.fspath(data), image_size=image_size)
    if isinstance(data, torch.Tensor) or isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return as_uint8_dataset(data)
    raise TypeError(f"{what} must be a torch Dataset, an image tensor (N,C,H,W), 'fashion-mnist', 'digits' or "
                    f"an image folder path, got {type(data).__name__}")


class Trainer:
    """Self-supervised pretraining of ``net`` on ``dataset`` with Accelerate; ``trainer()`` runs it.

    >>> trainer = Trainer(net, dataset=images, image_size=64, hidden_layer="avgpool",
    ...                   learning_rate=3e-4, num_train_steps=10_000, batch_size=256)
    >>> trainer()
    >>> torch.save(net.state_dict(), "improved.pt")   # also written as <checkpoint_folder>/backbone.pt

    The same script runs on N processes with ``accelerate launch --multi_gpu --num_processes N
    script.py`` (or ``torchrun``): DDP on GPUs, gloo on a machine without them. Batch size is per
    process; checkpoints, logs and plots come from the main process.

    byol-pytorch's ``BYOLTrainer`` arguments work as they are (``optimizer_klass``,
    ``byol_kwargs``, ``optimizer_kwargs``, ``accelerator_kwargs``, ``checkpoint_every``,
    ``checkpoint_folder``). Beyond them:

    Args:
        dataset: any dataset of images or (image, label) items, uint8 or float in [0, 1],
            an image tensor, or "fashion-mnist" / "digits" / an image folder path.
            Workers only decode; random augmentation runs inside the Learner on the device.
        method: a registered method name or a ``Method``. Other keywords (``**method_kwargs``,
            merged over ``byol_kwargs``) go to the ``Learner``, which passes the ones it does
            not take (``projection_size``, ``temperature``, ...) on to the method.
        optimizer: "adamw" (default), "sgd" or "lars"; 1-D parameters get no weight decay.
        scale_lr: multiply ``learning_rate`` by global batch / 256 (the linear scaling rule).
        warmup_steps: linear warmup (default: 10% of the steps), then ``schedule``
            ("cosine" to ``min_lr_ratio``·lr, or "constant").
        gradient_accumulation_steps, max_grad_norm, mixed_precision ("no", "fp16", "bf16"):
            passed to Accelerate; one optimiser step = ``gradient_accumulation_steps`` batches.
        resume: "auto" continues from the latest checkpoint in ``checkpoint_folder``
            (a fresh start if there is none); a path continues from that file.
        eval_every, eval_dataset: every ``eval_every`` steps, kNN accuracy (k=``eval_k``,
            temperature ``eval_temperature``) of ``eval_dataset = (train, test)`` is logged as "knn".
        log_with: trackers among "tensorboard" and "csv" (both by default, TensorBoard when installed).
        sync_batchnorm: SyncBatchNorm across GPUs (default: on for multi-GPU runs).
        compile: ``torch.compile`` the online and target encoders (``Learner(compile=...)``: True,
            or a dict of ``torch.compile`` options).
            The first steps compile (tens of seconds to minutes); checkpoints and
            ``backbone.pt`` keep the plain net's keys. benchmarks/RESULTS.md says where it pays.
        deterministic: deterministic kernels for this process (``torch.use_deterministic_algorithms``,
            cuDNN autotuning off, cuBLAS workspace pinned). On the CPU runs are bit-reproducible
            anyway; on a GPU, cuDNN's fastest convolution backward adds in a varying order, so a
            resumed run ends bit-identical to an uninterrupted one only with this on (slower).
            Ops with no deterministic kernel warn rather than fail.
    """

    def __init__(self, net: nn.Module, *, dataset: Dataset | torch.Tensor | str, image_size: int | None = None,
                 hidden_layer: LayerSpec = -2, learning_rate: float = 3e-4, num_train_steps: int | None = None,
                 batch_size: int = 16, optimizer_klass: type[Optimizer] | None = None, checkpoint_every: int = 1000,
                 checkpoint_folder: str | os.PathLike = "./checkpoints", byol_kwargs: dict | None = None,
                 optimizer_kwargs: dict | None = None, accelerator_kwargs: dict | None = None,
                 method: str | Method = "byol", epochs: float | None = None, optimizer: str = "adamw",
                 weight_decay: float | None = None, scale_lr: bool = False, warmup_steps: int | None = None,
                 schedule: str = "cosine", min_lr_ratio: float = 0.0, gradient_accumulation_steps: int = 1,
                 max_grad_norm: float | None = None, mixed_precision: str | None = None, num_workers: int = 0,
                 seed: int | None = 0, resume: str | os.PathLike | bool | None = None, keep_checkpoints: int = 2,
                 log_every: int = 10, log_with: Sequence[str] = ("tensorboard", "csv"),
                 eval_every: int | None = None, eval_dataset: tuple[Any, Any] | None = None, eval_k: int = 200,
                 eval_temperature: float = 0.1, eval_batch_size: int = 256, channels: int | None = None,
                 sync_batchnorm: bool | None = None, progress: bool = True, plot: bool = True,
                 compile: bool | dict = False, deterministic: bool = False, **method_kwargs: Any):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.checkpoint_every = positive_int(checkpoint_every, "checkpoint_every")
        self.grad_accum = positive_int(gradient_accumulation_steps, "gradient_accumulation_steps")
        self.keep_checkpoints = positive_int(keep_checkpoints, "keep_checkpoints")
        self.log_every = positive_int(log_every, "log_every")
        self.eval_every = positive_int(eval_every, "eval_every", allow_none=True)
        self.num_workers = int(num_workers)
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (or None for no clipping), got {max_grad_norm}")
        if self.eval_every is not None and eval_dataset is None:
            raise ValueError("eval_every needs eval_dataset=(train_dataset, test_dataset) with labels "
                             "for the kNN monitor")
        if eval_dataset is not None and (not isinstance(eval_dataset, (tuple, list)) or len(eval_dataset) != 2):
            raise ValueError("eval_dataset must be a pair (train_dataset, test_dataset) of labelled datasets")
        unknown = set(log_with) - {"tensorboard", "csv"}
        if unknown:
            raise ValueError(f"log_with accepts 'tensorboard' and 'csv', got {sorted(unknown)}")

        self.folder = Path(checkpoint_folder)
        self.accelerator = self._make_accelerator(dict(accelerator_kwargs or {}), mixed_precision, log_with)
        acc = self.accelerator
        self.dataset = _as_dataset(dataset, image_size, "dataset")
        if image_size is None:
            image_size = self._infer_image_size()
        self.image_size = image_size
        self.global_batch = self.batch_size * acc.num_processes
        per_epoch = len(self.dataset) // self.global_batch // self.grad_accum
        if per_epoch < 1:
            raise ValueError(f"the dataset has {len(self.dataset)} images, fewer than one optimiser step needs "
                             f"({self.global_batch * self.grad_accum} = batch_size {self.batch_size} x "
                             f"{acc.num_processes} process(es) x {self.grad_accum} accumulation steps); "
                             "lower batch_size or add images")
        self.num_train_steps = self._resolve_steps(num_train_steps, epochs, per_epoch)

        if deterministic:
            _use_deterministic_algorithms()
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
            _as_dataset(eval_dataset[0], image_size, "eval_dataset[0]"),
            _as_dataset(eval_dataset[1], image_size, "eval_dataset[1]"))
        self.eval_k, self.eval_temperature, self.eval_batch_size = eval_k, eval_temperature, eval_batch_size
        self.max_grad_norm = max_grad_norm
        self.progress, self.plot, self.log_with = progress, plot, tuple(log_with)
        self.step = 0
        self.epoch, self.samples_in_epoch = 0, 0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.last_checkpoint: Path | None = None
        self.config = self._config(method, hidden_layer, optimizer_klass or optimizer, weight_decay, scale_lr,
                                   schedule, min_lr_ratio, learner_kwargs)
        self.resumed_from: Path | None = None
        self._resume(resume)
        if self.resumed_from is None and seed is not None:
            set_seed(self.seed, device_specific=True)  # different augmentations on each process

    # ------------------------------------------------------------------ setup helpers

    def _build_learner(self, hidden_layer: LayerSpec, method: str | Method, sync_batchnorm: bool | None,
                       learner_kwargs: dict) -> nn.Module:
        """The Learner around the user's net, with SyncBatchNorm on multi-GPU runs."""
        learner = Learner(self.net, self.image_size, hidden_layer, method, channels=self.channels, **learner_kwargs)
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

    def _make_accelerator(self, kwargs: dict, mixed_precision: str | None, log_with: Sequence[str]) -> Accelerator:
        """The Accelerator with DDP, accumulation and tracking set up for the Learner."""
        if mixed_precision is not None:
            if kwargs.get("mixed_precision", mixed_precision) != mixed_precision:
                raise ValueError("mixed_precision is given twice (argument and accelerator_kwargs) "
                                 "with different values; give it once")
            kwargs["mixed_precision"] = mixed_precision
        # The Learner skips the net past the hidden layer (e.g. a ResNet's fc), so those parameters never
        # get a gradient. static_graph lets DDP learn that set on the first step instead of searching
        # the autograd graph every step as find_unused_parameters would. A static graph cannot skip the
        # all-reduce of accumulation steps (no_sync trips an internal assert in DDP), so with our handler
        # every batch is all-reduced; gradients are the same, communication is once per batch.
        static = "kwargs_handlers" not in kwargs
        kwargs.setdefault("kwargs_handlers", [DistributedDataParallelKwargs(static_graph=True)])
        if "gradient_accumulation_steps" in kwargs or "gradient_accumulation_plugin" in kwargs:
            raise ValueError("pass gradient_accumulation_steps to the Trainer, not in accelerator_kwargs")
        # Accumulation counts batches only: an epoch's end must not force an early optimiser step,
        # or the step count (and the schedules indexed by it) would depend on the dataset size.
        kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(
            num_steps=self.grad_accum, sync_with_dataloader=False, sync_each_batch=static)
        # The LR schedule is indexed by optimiser steps; we step it ourselves once per optimiser step.
        kwargs["step_scheduler_with_optimizer"] = False
        # pinned uint8 batches copy to the GPU while the previous step still runs
        kwargs.setdefault("dataloader_config", DataLoaderConfiguration(non_blocking=True))
        # Accelerate builds a gloo process group on CPU only when told cpu=True; without it, torchrun or
        # `accelerate launch --multi_gpu` on a machine without accelerators gives N unrelated runs.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            kwargs.setdefault("cpu", True)
        _warn_single_cpu_launch()
        trackers: list[Any] = []
        if "tensorboard" in log_with:
            if _tensorboard_available():
                trackers.append("tensorboard")
            else:
                print("wrapssl: tensorboard is not installed; logging to CSV only (pip install tensorboard)")
        if "csv" in log_with:
            self._csv = CSVTracker(self.folder / "metrics.csv")
            trackers.append(self._csv)
        if trackers and "log_with" not in kwargs:
            kwargs["log_with"] = trackers
            kwargs.setdefault("project_config", ProjectConfiguration(project_dir=str(self.folder),
                                                                     logging_dir=str(self.folder / "tensorboard")))
        return Accelerator(**kwargs)

    def _infer_image_size(self) -> int:
        """The side of the dataset's first image (square images expected)."""
        image = self.dataset[0][0]
        h, w = image.shape[-2:]
        if h != w:
            raise ValueError(f"the dataset's images are {h}x{w}; pass image_size= (the side of the square views)")
        return int(h)

    def _resolve_steps(self, num_train_steps: int | None, epochs: float | None, per_epoch: int) -> int:
        """Optimiser steps from ``num_train_steps`` or ``epochs`` (exactly one of them)."""
        if (num_train_steps is None) == (epochs is None):
            raise ValueError("give exactly one of num_train_steps and epochs")
        if num_train_steps is not None:
            return positive_int(num_train_steps, "num_train_steps")
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        return max(1, round(epochs * per_epoch))

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
            "learner": _to_cpu(self.learner.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": _to_cpu(scaler.state_dict()) if scaler is not None else None,
            "data": {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch, "seed": self.seed},
            "config": dict(self.config),
            "history": {k: [[s, v] for s, v in pts] for k, pts in self.history.items()},
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
        self.history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in state.get("history", {}).items()}
        if rng:
            states = state.get("rng") or []
            rank, n = self.accelerator.process_index, self.accelerator.num_processes
            if len(states) == n:
                _set_rng_state(states[rank])
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
        self._check_finite()
        state = self.state_dict()
        # each process's RNG, so every process resumes its own augmentation stream
        state["rng"] = gather_object([_rng_state()]) if self.accelerator.num_processes > 1 else [_rng_state()]
        path = self.folder / f"checkpoint-{self.step:08d}.pt"
        if self.accelerator.is_main_process:
            atomic_save(state, path)
            for _, old in _checkpoints(self.folder)[:-self.keep_checkpoints]:
                if old != path:
                    with contextlib.suppress(FileNotFoundError):
                        old.unlink()
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def save_backbone(self, path: str | os.PathLike | None = None) -> Path:
        """The user's net's ``state_dict`` (on the CPU), written atomically; main process only."""
        path = Path(path) if path is not None else self.folder / "backbone.pt"
        if self.accelerator.is_main_process:
            atomic_save(_to_cpu(self.net.state_dict()), path)
        return path

    # ------------------------------------------------------------------ checks

    def _check_loss(self, monitor: _LossMonitor) -> float:
        """Mean loss of the window across processes; raises NonFiniteLossError if a loss was not finite."""
        acc = self.accelerator
        count = torch.full_like(monitor.total, float(monitor.count))
        local = torch.stack([monitor.total, count, monitor.first_bad])
        stats = acc.gather(local.view(1, 3)).view(-1, 3).cpu() if acc.num_processes > 1 else local.view(1, 3).cpu()
        bad = [int(b) for b in stats[:, 2].tolist() if b >= 0]
        if bad:
            self._fail(min(bad), "loss")
        total, count = stats[:, 0].sum().item(), stats[:, 1].sum().item()
        return total / max(count, 1.0)

    def _check_finite(self) -> None:
        """Raise NonFiniteLossError if any parameter or buffer of the learner is not finite."""
        tensors = [t for t in self.learner.state_dict().values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            self._fail(self.step, "weights")

    def _fail(self, step: int, what: str) -> None:
        """Stop the run: close trackers and raise with the step and what to try."""
        kept = f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint else \
            "no checkpoint was written before it"
        mp = self.accelerator.mixed_precision
        hints = [f"a lower learning rate (now {self.lr:g}; try {self.lr / 10:g})"]
        if mp != "no":
            hints.append(f"full precision instead of {mp} (mixed_precision='no')")
        if self.max_grad_norm is None:
            hints.append("gradient clipping (max_grad_norm=1.0)")
        hints.append("a longer warmup (warmup_steps)")
        self._finish_trackers()
        raise NonFiniteLossError(
            f"the {what} became NaN or infinite at step {step} (of {self.num_train_steps}); training stopped and "
            f"{kept}. Try {', '.join(hints)}, then resume with resume='auto' or start again.")

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
        return knn_accuracy(a.embeddings[keep_a], a.labels[keep_a], b.embeddings[keep_b], b.labels[keep_b],
                            k=self.eval_k, temperature=self.eval_temperature)

    # ------------------------------------------------------------------ the loop

    def _log(self, values: dict[str, float]) -> None:
        """Record values at the current step in the history and the trackers."""
        for k, v in values.items():
            self.history.setdefault(k, []).append((self.step, float(v)))
        self.accelerator.log(values, step=self.step)

    def _start_trackers(self) -> None:
        """Start the trackers; a resumed run drops what the interrupted one logged after its checkpoint."""
        resumed = self.step > 0  # resumed, or fit() called again
        if hasattr(self, "_csv"):
            self._csv.resume_step = self.step if resumed else None
        init = {"tensorboard": {"purge_step": self.step}} if resumed else {}
        self.accelerator.init_trackers("wrapssl", config=self.config, init_kwargs=init)

    def __call__(self) -> nn.Module:
        """Train to ``num_train_steps``; returns the user's (now pretrained) net."""
        return self.fit()

    def fit(self) -> nn.Module:
        """Train to ``num_train_steps``, checkpointing and logging; returns the user's net."""
        acc = self.accelerator
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(".checkpoint-*.tmp"):  # left by a killed save
                stale.unlink(missing_ok=True)
        acc.wait_for_everyone()
        self._start_trackers()
        monitor, meter = _LossMonitor(acc.device), _Throughput(self.global_batch * self.grad_accum)
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
        self._sync_buffers()
        self.save_backbone()
        self._plot_history()
        self._finish_trackers()
        return self.net

    def _batch(self, images: torch.Tensor, monitor: _LossMonitor) -> tuple[float, float] | None:
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

    def _after_step(self, lr: float, momentum: float, monitor: _LossMonitor, meter: "_Throughput",
                    bar: tqdm) -> None:
        """Log, evaluate and checkpoint when they are due."""
        last = self.step == self.num_train_steps
        meter.steps += 1
        if self.step % self.log_every == 0 or last:
            values = {"loss": self._check_loss(monitor), "lr": lr, "momentum": momentum, "images_per_s": meter.rate()}
            if self.learner.target_encoder is None:  # no EMA target, no momentum to report
                del values["momentum"]
            monitor.reset()
            self._log(values)
            bar.set_postfix({k[:5]: f"{v:.4g}" for k, v in values.items()})
            meter.restart()
        if self.eval_every is not None and (self.step % self.eval_every == 0 or last):
            self._evaluate()
            meter.restart()  # images/s counts training only
        if self.step % self.checkpoint_every == 0 or last:
            self._check_loss(monitor)
            self.save_checkpoint()
            meter.restart()

    def _finish_trackers(self) -> None:
        """Close the trackers (not ``end_training``: that would also tear down the process group)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    def _sync_buffers(self) -> None:
        """Give every process the main one's buffers (BN statistics drift apart between DDP broadcasts)."""
        if self.accelerator.num_processes > 1:
            for buffer in self.learner.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _evaluate(self) -> None:
        """kNN accuracy on the main process, logged as "knn"; the others wait."""
        acc = self.accelerator
        value = [self.knn()] if acc.is_main_process else [0.0]
        if acc.num_processes > 1:
            value = gather_object(value)[:1]
        self._log({"knn": value[0]})
        acc.wait_for_everyone()

    def _plot_history(self) -> None:
        """Save the loss curve PNG, or say in one line why not."""
        if not (self.plot and self.accelerator.is_main_process and self.history):
            return
        try:
            from .plots import loss_curve
            loss_curve(self.history, self.folder / "loss_curve.png")
        except ImportError as e:  # plotting is an extra: training results stand without it
            print(f"wrapssl: no loss-curve plot ({e}); pip install matplotlib")
