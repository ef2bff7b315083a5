"""Process-group helpers for losses over the global batch: gather with gradients, reductions, rank."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    """True when a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return dist.get_rank() if _active() else 0


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this process's share of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process computed a loss that uses every slice: the gradient of a
        # slice is the sum over processes (DDP then averages parameter gradients).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0 in rank order, with gradients.

    All processes must pass tensors of the same shape (use drop_last=True).
    Backward sums the incoming gradient over processes and keeps this
    process's slice, so that under DDP's gradient averaging W processes at
    batch N give the gradient of one process at batch W·N. Identity without
    torch.distributed.
    """
    if not _active() or dist.get_world_size() == 1:
        return x
    return _Gather.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over processes, without gradient (``x.detach()`` itself without dist)."""
    if not _active() or dist.get_world_size() == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
