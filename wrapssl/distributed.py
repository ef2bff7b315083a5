"""Process-group helpers: gather with gradients for losses over the global batch, reductions, rank, and the
error a run raises when another process stops answering."""
from __future__ import annotations

import os

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


class CollectiveTimeoutError(RuntimeError):
    """Another process stopped answering a collective operation (it is stopped, hung or dead)."""


# what gloo says when a peer stops answering or goes away (NCCL raises torch.distributed.DistError)
_PEER_LOST = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """True for the errors torch.distributed raises when another process stops answering or dies."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _PEER_LOST)


def collective_failure(error: BaseException, timeout: float | None, checkpoint: object) -> CollectiveTimeoutError:
    """The error to raise for ``error``: what happened, what is kept and what to change."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    wait = f"{timeout:g} s" if timeout is not None else "torch's default time"
    kept = f"the latest checkpoint {checkpoint} is intact and" if checkpoint else "no checkpoint was written yet;"
    return CollectiveTimeoutError(
        f"another process stopped answering ({last}): a collective operation waited {wait} for it. It may be "
        f"stopped, hung or dead: check its output. This process stops here; {kept} running the same command "
        "again continues the run. The wait is collective_timeout= (seconds)")


def join_failure(error: BaseException, timeout: float | None) -> CollectiveTimeoutError:
    """The error to raise when the run's processes did not all join its process group (a machine or process that
    never started, or cannot reach the main one): what torch saw and what to do. Nothing was trained or written."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    wait = f"{timeout:g} s" if timeout is not None else "torch's default time"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return CollectiveTimeoutError(
        f"the run's {os.environ.get('WORLD_SIZE', '?')} processes did not all join within {wait} ({last}). Start the "
        "same command on every machine (accelerate launch --num_machines N --machine_rank R --main_process_ip IP), "
        f"check that each reaches {where}, or wait longer with collective_timeout= (seconds); nothing was trained "
        "or written")
