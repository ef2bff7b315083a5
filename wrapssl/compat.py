"""byol-pytorch 0.9.1's API (``BYOL``, ``BYOLTrainer``, ``MockDataset``), so its code migrates by changing one import.

Float images: byol-pytorch feeds whatever it is given to its augmentations, and its README
trains on ``torch.randn`` images. Here a float batch inside [0, 1] is read as plain images;
any other float batch is read as standardised with the normalisation statistics (ImageNet's
unless ``normalize=`` says otherwise), mapped back to [0, 1] by ``x * std + mean`` (values
beyond [0, 1] clipped), augmented and normalised again (``Learner(float_input="auto")``).
So normalised loaders work unchanged, and noise still trains. uint8 images are 0-255.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from .augment import IMAGENET_MEAN, IMAGENET_STD, normalization
from .encoder import LayerSpec
from .heads import mlp, simplicial_embedding
from .learner import Learner, standardized_to_unit
from .methods.byol import BYOL as BYOLMethod
from .nnutil import input_channels
from .trainer import Trainer

__all__ = ["BYOL", "BYOLTrainer", "MockDataset", "ByolPytorchMethod"]

# BYOL's keywords that shape its heads, as byol-pytorch 0.9.1 names them
HEAD_KEYWORDS = ("projection_size", "projection_hidden_size", "use_momentum", "use_simplicial_embeddings",
                 "sem_num_simplices", "sem_simplex_dim", "sem_temperature")


class ByolPytorchMethod(BYOLMethod):
    """BYOL with byol-pytorch 0.9.1's heads.

    ``use_simplicial_embeddings`` (on by default, as in 0.9.1) puts a Linear, a BatchNorm and
    a softmax over ``sem_num_simplices`` groups of ``sem_simplex_dim`` features (at
    ``sem_temperature``) in front of the projector (Lavoie et al. 2022). With
    ``use_momentum=False`` the projector is SimSiam's three-layer MLP, as in byol-pytorch.
    """

    def __init__(self, projection_size: int = 256, projection_hidden_size: int = 4096, use_momentum: bool = True,
                 use_simplicial_embeddings: bool = True, sem_num_simplices: int = 32, sem_simplex_dim: int = 8,
                 sem_temperature: float = 0.1):
        super().__init__(projection_size, projection_hidden_size, use_momentum)
        self.use_simplicial_embeddings = bool(use_simplicial_embeddings)
        self.sem = (sem_num_simplices, sem_simplex_dim, sem_temperature)

    def build(self, dim: int) -> None:
        sem = simplicial_embedding(dim, *self.sem) if self.use_simplicial_embeddings else None
        width = sem[0].out_features if sem is not None else dim
        super().build(width)
        if not self.uses_target:
            hidden = self.projection_hidden_size
            self.projector = mlp([width, hidden, hidden, self.projection_size], last_bn=True, last_bn_affine=False)
        if sem is not None:
            self.projector = nn.Sequential(sem, self.projector)


class BYOL(Learner):
    """``byol_pytorch.BYOL`` (0.9.1) with wrapssl inside: per-sample augmentation, no hidden copies.

    Same arguments and defaults as byol-pytorch 0.9.1 (momentum 0.99, constant unless
    ``total_steps`` is given; simplicial embeddings on), plus the Learner's keywords.
    Differences: ``hidden_layer`` defaults to the net's pre-logits (byol-pytorch: -2, the
    child before the last, the same layer for a ResNet); float images may be standardised
    (see the module's docstring; ``float_input="unit"`` restores the Learner's check);
    ``sync_batchnorm`` (default: on when torch.distributed is initialised) turns the heads'
    BatchNorms into SyncBatchNorm.
    """

    def __init__(self, net: nn.Module, image_size: int, hidden_layer: LayerSpec | None = None,
                 projection_size: int = 256, projection_hidden_size: int = 4096,
                 augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 moving_average_decay: float = 0.99, use_momentum: bool = True,
                 sync_batchnorm: bool | None = None, use_simplicial_embeddings: bool = True,
                 sem_num_simplices: int = 32, sem_simplex_dim: int = 8, sem_temperature: float = 0.1,
                 float_input: str = "auto", **kwargs):
        method = ByolPytorchMethod(projection_size, projection_hidden_size, use_momentum, use_simplicial_embeddings,
                                   sem_num_simplices, sem_simplex_dim, sem_temperature)
        super().__init__(net, image_size, hidden_layer, method, augment_fn=augment_fn, augment_fn2=augment_fn2,
                         moving_average_decay=moving_average_decay, float_input=float_input, **kwargs)
        if sync_batchnorm is None:
            sync_batchnorm = dist.is_available() and dist.is_initialized()
        if sync_batchnorm:
            for name in ("projector", "predictor"):
                setattr(self.method, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self.method, name)))
            if self.target_projector is not None:
                self.target_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.target_projector)


class MockDataset(Dataset):
    """``length`` standard-normal images of shape (3, image_size, image_size), byol-pytorch's placeholder data.

    Each index always gives the same image, so a resumed run sees the same data.
    """

    def __init__(self, image_size: int, length: int):
        self.image_size, self.length = image_size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(index)
        return torch.randn(3, self.image_size, self.image_size, generator=g)


class _Unstandardized(Dataset):
    """``dataset`` with float images outside [0, 1] mapped back to [0, 1] (see the module's docstring)."""

    def __init__(self, dataset: Dataset, mean: torch.Tensor, std: torch.Tensor):
        self.dataset, self.mean, self.std = dataset, mean, std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, torch.Tensor) and image.is_floating_point() and image.ndim == 3:
            image = standardized_to_unit(image[None], self.mean, self.std, only_outside_unit=True)[0]
            return (image, *item[1:]) if isinstance(item, (tuple, list)) else image
        return item


class BYOLTrainer(Trainer):
    """``byol_pytorch.BYOLTrainer`` (0.9.1): wrapssl's ``Trainer`` around byol-pytorch's BYOL.

    Same arguments, translated to the Trainer's: ``optimizer_klass`` is ``optimizer``, ``optimizer_kwargs``
    ``optimizer_options``, ``accelerator_kwargs`` ``accelerator_options``, and ``byol_kwargs`` (every ``BYOL``
    keyword) the method's keywords (their ``sync_batchnorm``, the Trainer's). Float images in the dataset
    may be standardised (``MockDataset``'s are): see the module's docstring. The improved net
    is written to ``checkpoint_folder`` as ``backbone.pt`` every ``checkpoint_every`` steps,
    beside resumable checkpoints; every other ``Trainer`` keyword works too.
    """

    def __init__(self, net: nn.Module, *, image_size: int, hidden_layer: LayerSpec | None = None,
                 learning_rate: float, dataset: Dataset, num_train_steps: int, batch_size: int = 16,
                 byol_kwargs: dict | None = None, optimizer_klass: type[Optimizer] | None = None,
                 optimizer_kwargs: dict | None = None, accelerator_kwargs: dict | None = None, **kwargs):
        byol = dict(byol_kwargs or {})
        method = ByolPytorchMethod(**{k: byol.pop(k) for k in HEAD_KEYWORDS if k in byol})
        byol.setdefault("moving_average_decay", 0.99)  # byol-pytorch's, where wrapssl's BYOL starts at 0.996
        byol.pop("float_input", None)  # the images reach the Learner as uint8, already mapped back
        sync_batchnorm = byol.pop("sync_batchnorm", None)  # BYOL's argument is the Trainer's setting here
        if kwargs.get("sync_batchnorm") is None and sync_batchnorm is not None:
            kwargs["sync_batchnorm"] = sync_batchnorm
        if optimizer_klass is not None:
            kwargs["optimizer"] = optimizer_klass
        stats: tuple[Sequence[float], Sequence[float]] | None = byol.get("normalize", (IMAGENET_MEAN, IMAGENET_STD))
        norm = normalization(kwargs.get("channels") or input_channels(net), stats)
        data = _Unstandardized(dataset, norm.mean[0], norm.std[0]) if isinstance(dataset, Dataset) else dataset
        super().__init__(net, dataset=data, image_size=image_size, hidden_layer=hidden_layer,
                         learning_rate=learning_rate, num_train_steps=num_train_steps, batch_size=batch_size,
                         method=method, method_kwargs={**byol, **kwargs.pop("method_kwargs", {})},
                         accelerator_options=accelerator_kwargs, optimizer_options=optimizer_kwargs, **kwargs)
