"""byol-pytorch's constructor, so its code migrates by changing one import."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .hidden import LayerSpec
from .learner import Learner


class BYOL(Learner):
    """``byol_pytorch.BYOL`` with wrapssl inside: per-sample augmentation, no hidden copies.

    Same arguments and defaults as byol-pytorch (momentum 0.99, constant unless
    ``total_steps`` is given). ``sync_batchnorm`` (default: on when
    torch.distributed is initialised) turns the heads' BatchNorms into SyncBatchNorm.
    """

    def __init__(self, net: nn.Module, image_size: int, hidden_layer: LayerSpec = -2,
                 projection_size: int = 256, projection_hidden_size: int = 4096,
                 augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 moving_average_decay: float = 0.99, use_momentum: bool = True,
                 sync_batchnorm: bool | None = None, **kwargs):
        super().__init__(net, image_size, hidden_layer, method="byol", augment_fn=augment_fn,
                         augment_fn2=augment_fn2, moving_average_decay=moving_average_decay,
                         projection_size=projection_size, projection_hidden_size=projection_hidden_size,
                         use_momentum=use_momentum, **kwargs)
        if sync_batchnorm is None:
            sync_batchnorm = dist.is_available() and dist.is_initialized()
        if sync_batchnorm:
            for name in ("projector", "predictor"):
                setattr(self.method, name, nn.SyncBatchNorm.convert_sync_batchnorm(getattr(self.method, name)))
            if self.target_projector is not None:
                self.target_projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.target_projector)
