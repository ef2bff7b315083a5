"""Embed a dataset with a Learner or a plain net, and export the embeddings (npz, csv)."""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checks import positive_int
from ..files import atomic_open
from ..nnutil import module_device


@dataclass
class Embeddings:
    """Embeddings (N, D) float32 of a dataset with labels (N,) long (-1 = unknown) and file names."""

    embeddings: torch.Tensor
    labels: torch.Tensor
    files: list[str]

    def __post_init__(self) -> None:
        self.embeddings = torch.as_tensor(self.embeddings).detach().float()
        self.labels = torch.as_tensor(self.labels).detach().long()
        self.files = [str(f) for f in self.files]
        if self.embeddings.ndim != 2:
            raise ValueError(f"embeddings must have shape (N, D), got {tuple(self.embeddings.shape)}")
        n = self.embeddings.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the embeddings, got {tuple(self.labels.shape)}")
        if len(self.files) != n:
            raise ValueError(f"files must hold one name per embedding ({n}), got {len(self.files)}")

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write ``embeddings``, ``labels`` and ``files`` to an .npz file atomically."""
        with atomic_open(path, "wb") as f:
            np.savez(f, embeddings=self.embeddings.cpu().numpy(), labels=self.labels.cpu().numpy(),
                     files=np.asarray(self.files, dtype=str))

    def save_csv(self, path: str | os.PathLike) -> None:
        """Write a CSV with columns file, label, e0..e{D-1} atomically."""
        emb = self.embeddings.cpu().numpy()
        labels = self.labels.cpu().tolist()
        with atomic_open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", *(f"e{i}" for i in range(emb.shape[1]))])
            for name, label, row in zip(self.files, labels, emb):
                # 9 significant digits round-trip float32 exactly
                writer.writerow([name, label, *(f"{v:.9g}" for v in row.tolist())])

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "Embeddings":
        """Read embeddings written by ``save_npz``."""
        with np.load(path, allow_pickle=False) as z:
            missing = {"embeddings", "labels", "files"} - set(z.files)
            if missing:
                raise ValueError(f"{os.fspath(path)} lacks {sorted(missing)}; was it written by Embeddings.save_npz?")
            return cls(torch.from_numpy(z["embeddings"].copy()), torch.from_numpy(z["labels"].copy()),
                       z["files"].tolist())


@contextlib.contextmanager
def _plain_embedder(net: nn.Module, hidden_layer: Any, device: torch.device
                    ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """An images → (B, D) function for a plain net; eval mode inside, every module's flag restored after."""
    from ..augment import normalization, to_float
    from ..encoder import Encoder
    from ..nnutil import eval_mode, input_channels

    encoder = Encoder(net, hidden_layer)
    channels = input_channels(net)
    normalize = normalization(channels).to(device)  # what a Learner trains such a net with
    try:
        with eval_mode(net):
            yield lambda images: encoder(normalize(to_float(images, channels)))
    finally:
        encoder.close()


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a collated batch; labels are -1 when the dataset gives none."""
    if isinstance(batch, torch.Tensor):
        return batch, torch.full((batch.shape[0],), -1, dtype=torch.long)
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], torch.as_tensor(batch[1]).long().view(-1)
    raise TypeError("dataset items must be (image, label) with image a (C,H,W) tensor and label an int "
                    f"(-1 = unknown); the loader produced {type(batch).__name__}")


def embed_dataset(model: Any, dataset: Dataset, batch_size: int = 256, device: str | torch.device | None = None,
                  num_workers: int = 0, hidden_layer: Any = -1) -> Embeddings:
    """Embed every item of ``dataset`` in order with a Learner (``.embed``) or a plain net.

    A plain ``nn.Module`` is cut at ``hidden_layer`` (as in ``Learner``), fed
    float images normalised as a Learner would (ImageNet statistics; their
    grey mean for a net whose first conv takes 1 channel), and run in eval mode without
    gradients; the train/eval flag of every submodule is restored afterwards.
    ``hidden_layer`` applies to a plain net only. ``device`` is where batches
    are sent (default: the model's device); the model itself is never moved.
    File names come from ``dataset.files`` when it exists, else they are the
    item indices as strings.
    """
    positive_int(batch_size, "batch_size")
    if not (callable(getattr(model, "embed", None)) or isinstance(model, nn.Module)):
        raise TypeError(f"model must be a wrapssl Learner (with .embed) or an nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else \
        module_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if callable(getattr(model, "embed", None)):
        embedder: contextlib.AbstractContextManager = contextlib.nullcontext(model.embed)
    else:
        embedder = _plain_embedder(model, hidden_layer, device)
    chunks, labels = [], []
    with embedder as embed, torch.no_grad():
        for batch in loader:
            images, y = _split_batch(batch)
            z = embed(images.to(device, non_blocking=True))
            if z.ndim != 2 or z.shape[0] != images.shape[0]:
                raise ValueError(f"the model gave embeddings of shape {tuple(z.shape)} for {images.shape[0]} "
                                 "images; it must return (B, D): pick a pooled hidden_layer")
            chunks.append(z.detach().float().cpu())
            labels.append(y)
    if not chunks:
        raise ValueError("the dataset is empty; nothing to embed")
    emb = torch.cat(chunks)
    files = getattr(dataset, "files", None)
    if files is None:
        files = [str(i) for i in range(len(emb))]
    elif len(files) != len(emb):
        raise ValueError(f"dataset.files has {len(files)} names but the dataset gave {len(emb)} items; "
                         "make .files match the items or remove it")
    return Embeddings(emb, torch.cat(labels), list(files))
