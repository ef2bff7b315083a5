"""The Accelerator a Trainer runs on, built from its arguments and from `accelerate config` / `accelerate launch`.

Settings Accelerate reads from its config and environment keep their meaning:
gradient accumulation (``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``), mixed
precision and the dynamo backend. The dynamo backend compiles the Learner's
encoders (``Learner(compile=...)``) instead of the whole Learner: compiling the
random augmentation and the method's loss as one graph recompiles on every step.
"""
from __future__ import annotations

import os
import warnings
from datetime import timedelta
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DynamoBackend,
                              GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration,
                              TorchDynamoPlugin)

from .checks import positive_int
from .distributed import is_collective_failure, join_failure

__all__ = ["make_accelerator", "accumulation_steps", "dynamo_compile_options", "use_deterministic_algorithms"]

_ACCUMULATION_ENV = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


def accumulation_steps(argument: int | None, accelerator_options: dict) -> int:
    """Batches per optimiser step: the argument, else ``accelerator_options``, else Accelerate's environment, else 1.

    Pops the accumulation settings from ``accelerator_options`` (the Trainer builds its own plugin).
    """
    plugin = accelerator_options.pop("gradient_accumulation_plugin", None)
    given = accelerator_options.pop("gradient_accumulation_steps", None)
    if plugin is not None:
        if given is not None and given != plugin.num_steps:
            raise ValueError("accelerator_options has both gradient_accumulation_steps and a "
                             "gradient_accumulation_plugin with different steps; give one")
        given = plugin.num_steps
    if argument is not None and given is not None and argument != given:
        raise ValueError(f"gradient_accumulation_steps is {argument} but accelerator_options says {given}; "
                         "give it once")
    from_env = os.environ.get(_ACCUMULATION_ENV)
    if argument is None and given is None and from_env:
        try:
            return positive_int(int(from_env), _ACCUMULATION_ENV)
        except ValueError:
            raise ValueError(f"{_ACCUMULATION_ENV}={from_env!r} (from `accelerate config` or the environment) "
                             "must be a positive int; fix or unset it") from None
    steps = positive_int(argument if argument is not None else (given or 1), "gradient_accumulation_steps")
    if from_env and from_env.strip() != str(steps):
        warnings.warn(f"gradient_accumulation_steps={steps} given to the Trainer overrides {_ACCUMULATION_ENV}="
                      f"{from_env} from the environment (`accelerate config`)", RuntimeWarning, stacklevel=3)
    return steps


def dynamo_compile_options(accelerator_options: dict) -> dict | None:
    """``torch.compile`` options of the dynamo backend Accelerate was configured with, or None for no backend.

    Pops ``dynamo_backend`` / ``dynamo_plugin`` from ``accelerator_options``; the environment of
    ``accelerate launch`` (``ACCELERATE_DYNAMO_*``) is read when neither is given.
    """
    plugin = accelerator_options.pop("dynamo_plugin", None)
    backend = accelerator_options.pop("dynamo_backend", None)
    if plugin is not None and backend is not None:
        raise ValueError("accelerator_options has both dynamo_backend and dynamo_plugin; give one")
    if plugin is None:
        plugin = TorchDynamoPlugin(backend=backend)  # None: ACCELERATE_DYNAMO_BACKEND, as Accelerate reads it
    if plugin.backend == DynamoBackend.NO or plugin.disable:
        return None
    return plugin.to_kwargs()


def has_accelerator() -> bool:
    """True if torch sees a GPU (or another accelerator)."""
    probe = getattr(torch, "accelerator", None)
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def warn_single_cpu_launch() -> None:
    """Say so when `accelerate launch --cpu --num_processes N` started this as the only process."""
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # accelerate sets MASTER_PORT only when more than one process was asked for; without MPI it starts one
    ranks = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched_cpu and "MASTER_PORT" in os.environ and not any(k in os.environ for k in ranks):
        warnings.warn("accelerate launch --cpu started a single process (it runs several CPU processes only "
                      "through mpirun). For N CPU processes use `accelerate launch --multi_gpu --num_processes N "
                      "script.py` or `torchrun --nproc_per_node N script.py`; wrapssl then trains over gloo.",
                      RuntimeWarning, stacklevel=4)


def make_accelerator(kwargs: dict, accumulation: int, mixed_precision: str | None, trackers: Sequence[Any],
                     folder: os.PathLike, timeout: float | None = None) -> Accelerator:
    """The Accelerator with DDP, accumulation and tracking set up for the Learner (``kwargs``: the user's).

    ``timeout``: seconds a collective operation waits for the other processes before it fails
    (set when this call starts the process group; None keeps torch's default).
    """
    if mixed_precision is not None:
        if kwargs.get("mixed_precision", mixed_precision) != mixed_precision:
            raise ValueError("mixed_precision is given twice (argument and accelerator_options) "
                             "with different values; give it once")
        kwargs["mixed_precision"] = mixed_precision
    # The Learner skips the net past the hidden layer (e.g. a ResNet's fc), so those parameters never
    # get a gradient. static_graph lets DDP learn that set on the first step instead of searching
    # the autograd graph every step as find_unused_parameters would. A static graph cannot skip the
    # all-reduce of accumulation steps (no_sync trips an internal assert in DDP), so with our handler
    # every batch is all-reduced; gradients are the same, communication is once per batch.
    static = "kwargs_handlers" not in kwargs
    handlers = list(kwargs.get("kwargs_handlers") or [DistributedDataParallelKwargs(static_graph=True)])
    # without a timeout a stopped or hung process blocks every other one at the next collective
    if timeout is not None and not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=timeout)))
    kwargs["kwargs_handlers"] = handlers
    # Accumulation counts batches only: an epoch's end must not force an early optimiser step,
    # or the step count (and the schedules indexed by it) would depend on the dataset size.
    kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(
        num_steps=accumulation, sync_with_dataloader=False, sync_each_batch=static)
    # The LR schedule is indexed by optimiser steps; the Trainer steps it once per optimiser step.
    kwargs["step_scheduler_with_optimizer"] = False
    # the Learner's encoders are compiled instead (see the module docstring)
    kwargs["dynamo_backend"] = "no"
    # pinned uint8 batches copy to the GPU while the previous step still runs
    kwargs.setdefault("dataloader_config", DataLoaderConfiguration(non_blocking=True))
    # Accelerate builds a gloo process group on CPU only when told cpu=True; without it, torchrun or
    # `accelerate launch --multi_gpu` on a machine without accelerators gives N unrelated runs.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator():
        kwargs.setdefault("cpu", True)
    warn_single_cpu_launch()
    if trackers and "log_with" not in kwargs:
        kwargs["log_with"] = list(trackers)
        kwargs.setdefault("project_config", ProjectConfiguration(project_dir=os.fspath(folder),
                                                                 logging_dir=os.path.join(folder, "tensorboard")))
    try:
        return Accelerator(**kwargs)  # under a launcher, this joins the process group (rendezvous)
    except Exception as e:
        if is_collective_failure(e):  # a process that never joined: one line that says what to do
            raise join_failure(e, timeout) from e
        raise


def use_deterministic_algorithms() -> None:
    """Deterministic kernels for the rest of this process (a global switch, as torch's own)."""
    # cuBLAS reads this when its first handle is made; setting it before any GPU matmul is enough
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
