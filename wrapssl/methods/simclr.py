"""SimCLR: A Simple Framework for Contrastive Learning (Chen et al., 2020, arXiv:2002.05709)."""
from __future__ import annotations

from ..augment import Views, simclr_views
from ..heads import mlp
from ..losses import NTXentLoss
from .base import Method, register_method


@register_method("simclr")
class SimCLR(Method):
    """Two views of an image attract; every other image of the global batch repels.

    Knobs: ``temperature`` (0.5; the paper uses 0.1 with large batches and LARS,
    lower values weight hard negatives more), ``projection_hidden_size`` (2048)
    and ``projection_size`` (128) size the 2-layer projector. More negatives help:
    the paper trains at batch 4096 (LARS lr 0.3·B/256 at τ=0.1); below 256
    expect weaker results, and consider NNCLR or a non-contrastive method.
    Negatives are gathered from every process, so the effective batch is global.
    ``n_views`` global views per image (2; more as in FastSiam, every pair attracts) and
    ``n_local`` small crops of ``local_size`` over ``local_scale`` of the area (0: none).
    """

    uses_target = False

    def __init__(self, temperature: float = 0.5, projection_size: int = 128, projection_hidden_size: int = 2048,
                 n_views: int = 2, n_local: int = 0, local_size: int | None = None,
                 local_scale: tuple[float, float] = (0.05, 0.4)):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; SimCLR uses 0.1-0.5")
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views + n_local < 2 or n_views < 1:
            raise ValueError(f"SimCLR needs n_views >= 1 global views and at least two views in all, got "
                             f"n_views={n_views!r}, n_local={n_local!r}")
        self.temperature = float(temperature)
        self.criterion = NTXentLoss(self.temperature)
        self.projection_size, self.projection_hidden_size = projection_size, projection_hidden_size
        self.n_views, self.n_local, self.local_size = n_views, n_local, local_size
        self.local_scale = tuple(local_scale)

    def build(self, dim: int) -> None:
        self.projector = mlp([dim, self.projection_hidden_size, self.projection_size])

    def default_views(self, image_size: int, channels: int = 3) -> Views:
        return simclr_views(image_size, channels=channels, n_views=self.n_views, n_local=self.n_local,
                            local_size=self.local_size, local_scale=self.local_scale)

    def loss(self, online, target, step=0):
        if len(online) < 2:
            raise ValueError(f"SimCLR needs at least two views, got {len(online)}")
        return self.criterion(online)
