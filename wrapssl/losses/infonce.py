"""InfoNCE of a query against the keys of the global batch (MoCo v3, NNCLR)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed


def info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: query i must pick key i among the keys of the global batch (cosine logits / τ).

    Keys are gathered from every process (with gradients when they carry any);
    the label of local query i is its position ``rank·n + i`` in the gathered keys.
    """
    q = F.normalize(query.float(), dim=1)
    k = distributed.gather(F.normalize(key.float(), dim=1))
    labels = distributed.rank() * q.shape[0] + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(q @ k.T / temperature, labels)


class InfoNCELoss(nn.Module):
    """InfoNCE (van den Oord et al., 2018, arXiv:1807.03748) as MoCo v3 uses it (Chen, Xie & He, 2021,
    arXiv:2104.02057, Algorithm 1, without its 2τ factor): ``cross_entropy(q·kᵀ/τ, i)`` with q and k
    L2-normalised, so that query i must pick key i among all keys.

    Inputs: queries (n, d) and keys (n, d); the keys of every process are the candidates (gathered
    with gradients), so negatives cover the global batch. Output: a scalar, about log(N) for
    random inputs. ``temperature``: MoCo v3 uses 1.0 for ResNets and 0.2 for ViTs; NNCLR 0.1.

    >>> loss = InfoNCELoss(temperature=0.2)(queries, keys.detach())
    """

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; MoCo v3 uses 0.2-1.0")
        self.temperature = float(temperature)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return info_nce(query, key, self.temperature)
