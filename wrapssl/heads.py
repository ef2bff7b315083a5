"""MLP heads shared by the methods."""
from __future__ import annotations

from typing import Sequence

from torch import nn

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
