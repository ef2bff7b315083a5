"""What runs beside the training loop: the public per-step hook, and the kNN, health, export and plot callbacks.

A callback gets ``on_step(trainer, info)`` after every optimiser step for which ``due(step, last)``
is true, and ``on_fit_end(trainer)`` when ``fit()`` has reached ``num_train_steps``. Callbacks
with ``checked = True`` (the built-in ones: they read the weights) run only after the loop has
checked the loss and the weights, so none of them ever sees a NaN; that check reads the device,
so a callback due at every step should leave ``checked`` False. Time spent in callbacks is not
counted as training time (``trainer.train_minutes``).

>>> class PrintLoss(Callback):
...     def on_step(self, trainer, info):
...         if info.loss is not None:
...             print(info.step, info.loss)
>>> Trainer(net, dataset=images, num_train_steps=100, callbacks=[PrintLoss()])()
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import Dataset, IterableDataset

from .backbone import BACKBONE_SAFETENSORS, BackboneInfo, layer_to_json, save_backbone
from .config import TrainConfig, check_eval_dataset
from .data import as_dataset
from .fsdp import gathered, is_sharded, net_state_dict
from .health import Health, embedding_health, probe_images
from .nnutil import private_rng

# The callbacks receive the running wrapssl.trainer.Trainer; it is not imported here, because trainer.py
# imports this module (no import circle, not even for type checkers).
Trainer = Any

__all__ = ["StepInfo", "Callback", "Every", "KnnMonitor", "HealthCheck", "BackboneExport", "LossCurvePlot",
           "default_callbacks", "run_callbacks", "export_backbone", "check_health"]


@dataclass(frozen=True)
class StepInfo:
    """The optimiser step just taken: its number (1-based, = ``trainer.step``), the learning rate and EMA momentum
    it used (None without an EMA target), the mean loss since the last log when this step logged (else None), and
    whether it is the run's last step."""

    step: int
    lr: float
    momentum: float | None
    loss: float | None
    last: bool


class Callback:
    """Base of the Trainer's callbacks: override ``on_step`` and/or ``on_fit_end`` (and ``due`` to run less often)."""

    checked = False  # True: run only after the loop checked the loss and weights (a host sync)

    def due(self, step: int, last: bool) -> bool:
        """Whether ``on_step`` runs after optimiser step ``step``."""
        return True

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        """Called on every process after optimiser step ``info.step`` when due."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called on every process when ``fit()`` has trained to ``num_train_steps``."""


def run_callbacks(trainer: Trainer, due: list[Callback], info: StepInfo) -> None:
    """Call ``on_step`` of the callbacks ``due`` after a step; their time is not training time."""
    trainer.clock.pause()
    for callback in due:
        callback.on_step(trainer, info)
    trainer.clock.start()


class Every(Callback):
    """A callback due every ``every`` steps and at the last one; it reads the weights (``checked``)."""

    checked = True

    def __init__(self, every: int):
        self.every = every

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0


def probe_source(dataset: Dataset) -> Dataset:
    """Where probe images come from: the dataset, or the first samples of a stream (no random access)."""
    return dataset.head(512) if isinstance(dataset, IterableDataset) else dataset


class KnnMonitor(Every):
    """kNN accuracy of the representation on ``eval_dataset = (train, test)`` (main process), logged as "knn" with
    "train_minutes"; the embeddings of the last evaluation stay in ``trainer.last_eval``."""

    def __init__(self, every: int, eval_dataset: tuple[Any, Any], image_size: int | None = None):
        super().__init__(every)
        self.eval_dataset = tuple(as_dataset(d, image_size, f"eval_dataset[{i}]") for i, d in enumerate(eval_dataset))

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        acc = trainer.accelerator
        with gathered(trainer.learner, trainer.learner.encoder):  # FSDP: whole weights for the main process
            value = [self.knn(trainer)] if acc.is_main_process else [0.0]
        if acc.num_processes > 1:
            value = gather_object(value)[:1]
        trainer.run_log.log({"knn": value[0], "train_minutes": trainer.train_minutes}, trainer.step)
        acc.wait_for_everyone()

    def knn(self, trainer: Trainer) -> float:
        """kNN accuracy of the current representation (run it on one process)."""
        from .evaluate.embeddings import embed_dataset
        from .evaluate.metrics import knn_accuracy

        train, test = self.eval_dataset
        device = trainer.accelerator.device
        with private_rng(device):  # evaluating must not change the training's augmentations
            a = embed_dataset(trainer.learner, train, trainer.config.eval_batch_size, device)
            b = embed_dataset(trainer.learner, test, trainer.config.eval_batch_size, device)
        keep_a, keep_b = a.labels >= 0, b.labels >= 0
        if not keep_a.any() or not keep_b.any():
            raise ValueError("the kNN monitor needs labelled images in both eval datasets (labels >= 0)")
        trainer.last_eval = (trainer.step, a, b)
        return knn_accuracy(a.embeddings[keep_a], a.labels[keep_a], b.embeddings[keep_b], b.labels[keep_b],
                            k=trainer.config.eval_k, temperature=trainer.config.eval_temperature)


class HealthCheck(Every):
    """The label-free health of the representation (main process): logged, kept in ``trainer.health``, and a
    collapse warned about once."""

    def __init__(self, every: int):
        super().__init__(every)
        self.images: torch.Tensor | None = None
        self.warned = False

    def on_step(self, trainer: Trainer, info: StepInfo) -> None:
        with gathered(trainer.learner, trainer.learner.encoder):  # FSDP: whole weights for the main process
            if trainer.accelerator.is_main_process:
                self.check(trainer)

    def check(self, trainer: Trainer) -> Health:
        """The health now, logged; its collapse warning said once."""
        if self.images is None:
            self.images = probe_images(probe_source(trainer.dataset)).to(trainer.accelerator.device)
        with private_rng(trainer.accelerator.device):
            trainer.health = embedding_health(trainer.learner, self.images)
        trainer.run_log.log({"rank": trainer.health.rank, "embedding_std": trainer.health.std}, trainer.step)
        message = trainer.health.warning(trainer.step)
        if message and not self.warned:
            self.warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return trainer.health


def check_health(trainer: Trainer) -> Health:
    """The health of ``trainer``'s representation now, through its HealthCheck (a new one if it has none)."""
    found = next((cb for cb in trainer.callbacks if isinstance(cb, HealthCheck)), None)
    return (found or HealthCheck(1)).check(trainer)


def export_backbone(trainer: Trainer) -> Path:
    """The user's net as ``backbone.safetensors`` (weights and what they are: layer, image size, channels,
    normalisation, and ``trainer.backbone_info``) and ``backbone.pt`` in the run folder; main process only."""
    path = trainer.folder / BACKBONE_SAFETENSORS
    state = net_state_dict(trainer.learner) if is_sharded(trainer.learner) else None  # FSDP: gathered on rank 0
    if trainer.accelerator.is_main_process:
        norm = trainer.learner.normalize
        mean, std = (norm.mean.flatten().tolist(), norm.std.flatten().tolist()) if norm.enabled else (None, None)
        info = BackboneInfo(hidden_layer=layer_to_json(trainer.learner.hidden_layer), image_size=trainer.image_size,
                            channels=trainer.channels, mean=mean, std=std, **trainer.backbone_info)
        save_backbone(trainer.net, trainer.folder, info, state)
    return path


class BackboneExport(Callback):
    """Writes the trained net (``export_backbone``) when fit() ends."""

    def due(self, step: int, last: bool) -> bool:
        return False

    def on_fit_end(self, trainer: Trainer) -> None:
        export_backbone(trainer)


class LossCurvePlot(Callback):
    """Saves loss_curve.png (and, for masked image modeling, reconstructions.png) when fit() ends, or says in one
    line why not."""

    def due(self, step: int, last: bool) -> bool:
        return False

    def on_fit_end(self, trainer: Trainer) -> None:
        if not (trainer.accelerator.is_main_process and trainer.history):
            return
        try:
            from .plots import loss_curve, reconstruction_grid
            loss_curve(trainer.history, trainer.folder / "loss_curve.png",
                       dim=trainer.health.dim if trainer.health is not None else None)
            if callable(getattr(trainer.learner.method, "reconstruct", None)):
                images = probe_images(probe_source(trainer.dataset), n=8).to(trainer.accelerator.device)
                reconstruction_grid(trainer.learner, images, trainer.folder / "reconstructions.png")
        except ImportError as e:  # plotting is an extra: training results stand without it
            print(f"wrapssl: no loss-curve plot ({e}); pip install matplotlib")


def default_callbacks(config: TrainConfig, eval_dataset: tuple[Any, Any] | None = None) -> list[Callback]:
    """Today's behaviour: health every ``health_every`` steps, kNN on ``eval_dataset`` every ``eval_every``, the
    backbone exported and (``plot``) the loss curve drawn at the end."""
    check_eval_dataset(config.eval_every, eval_dataset)
    found: list[Any] = [HealthCheck(config.health_every)] if config.health_every is not None else []
    if config.eval_every is not None:
        found.append(KnnMonitor(config.eval_every, eval_dataset, config.image_size))
    return found + [BackboneExport()] + ([LossCurvePlot()] if config.plot else [])
