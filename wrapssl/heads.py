"""Heads shared by the methods: MLPs, and the simplicial embedding byol-pytorch 0.9 puts before its projector."""
from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange
from torch import nn

from .checks import positive_int

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU}


def mlp(dims: Sequence[int], batchnorm: bool = True, act: str = "relu",
        last_bn: bool = False, last_bn_affine: bool = True, bias: bool | None = None) -> nn.Sequential:
    """Linear layers through ``dims`` with BN + activation between them.

    ``mlp([2048, 4096, 256])`` is BYOL's projector: Linear-BN-ReLU-Linear.
    ``last_bn`` adds a BatchNorm after the final Linear (SimSiam, MoCo v3).
    Hidden Linear layers drop their bias when a BatchNorm follows (it would cancel it).
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(dims)}")
    if any(int(d) < 1 for d in dims):
        raise ValueError(f"MLP widths must be positive, got {list(dims)}")
    layers: list[nn.Module] = []
    n = len(dims) - 1
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == n - 1
        norm_after = (batchnorm and not last) or (last and last_bn)
        layers.append(nn.Linear(d_in, d_out, bias=not norm_after if bias is None else bias))
        if not last:
            if batchnorm:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(_ACTS[act]())
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=last_bn_affine))
    return nn.Sequential(*layers)


class Simplicial(nn.Module):
    """Softmax over each group of ``simplex_dim`` features, at ``temperature``: vectors on products of simplices.

    The SEM layer of Lavoie et al. 2022 (arXiv:2204.00616), used in front of the projector.
    """

    def __init__(self, simplex_dim: int = 8, temperature: float = 0.1):
        super().__init__()
        simplex_dim = positive_int(simplex_dim, "simplex_dim")
        if not temperature > 0:
            raise ValueError(f"the simplicial temperature must be > 0, got {temperature!r}")
        self.simplex_dim, self.temperature = simplex_dim, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = rearrange(x, "... (l v) -> ... l v", v=self.simplex_dim)
        return rearrange((groups / self.temperature).softmax(dim=-1), "... l v -> ... (l v)")


def simplicial_embedding(dim: int, num_simplices: int = 32, simplex_dim: int = 8,
                         temperature: float = 0.1) -> nn.Sequential:
    """Linear to ``num_simplices · simplex_dim`` features, BatchNorm, then ``Simplicial``."""
    num_simplices = positive_int(num_simplices, "num_simplices")
    width = num_simplices * simplex_dim
    return nn.Sequential(nn.Linear(dim, width), nn.BatchNorm1d(width), Simplicial(simplex_dim, temperature))
