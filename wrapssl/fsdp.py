"""FSDP: a Learner sharded over processes (online net, EMA target, heads), and its checkpoints full or sharded.

Every repeated block (a ViT's ``blocks``, a ResNet stage's bottlenecks, MAE's decoder
layers) becomes its own FSDP2 unit (``torch.distributed.fsdp.fully_shard``), in the
online net and in the EMA target alike, and the Learner is the root unit: its forward
all-gathers what sits outside the blocks (patch embedding, heads), so the hook of the
Encoder, the target pass and a method's own calls into the net all run on gathered
weights. Online and target parameters then have the same sharding, so the EMA update
is a ``_foreach_lerp_`` over matching local shards. A block that holds the hooked layer
stays in the root unit: the hook's early exit skips that block's post-forward, which left
it gathered until the backward (and the target's, which has no backward, longer). Buffers
(BatchNorm statistics) are not sharded; rank 0's are broadcast before each training
forward, as DDP does.

The same code runs on GPUs (NCCL) and on CPUs (gloo). Accelerate applies its FSDP
plugin only on accelerators and ignores it on CPUs, so wrapssl shards the Learner itself
and reads from the plugin only its settings (``reshard_after_forward``, mixed precision,
CPU offload, ``state_dict_type``, ``transformer_cls_names_to_wrap``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["requested_plugin", "plugin_for", "shard_units", "shard_learner", "is_sharded", "gathered", "sync_buffers",
           "prepare", "full_checkpoints", "training_state", "load_training_state", "save_shards", "load_shards",
           "net_state_dict", "checkpoint_entries", "restore_entries"]

FSDP_ENV = "ACCELERATE_USE_FSDP"
FSDP1_REFUSED = ("wrapssl shards with FSDP2 (torch's fully_shard); pass --fsdp_version 2 to accelerate launch, set "
                 "fsdp_version: 2 in `accelerate config`, or FullyShardedDataParallelPlugin(fsdp_version=2)")
_RESHARD_AFTER_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the blocks' setting, per learner


def requested_plugin(accelerator_kwargs: dict) -> Any:
    """The FSDP plugin asked for: ``accelerator_kwargs["fsdp_plugin"]``, else the one ``accelerate launch
    --use_fsdp`` (or ``accelerate config``) describes in the environment; None for no FSDP. Only FSDP2."""
    plugin = accelerator_kwargs.get("fsdp_plugin")
    if plugin is None and os.environ.get(FSDP_ENV, "false").lower() in ("1", "true", "yes"):
        if os.environ.get("FSDP_VERSION", "1") != "2":  # checked first: Accelerate's FSDP1 plugin fails on CPUs
            raise ValueError(FSDP1_REFUSED)
        from accelerate.utils import FullyShardedDataParallelPlugin
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the environment, as Accelerate does
    if plugin is None:
        return None
    if plugin.fsdp_version != 2:
        raise ValueError(FSDP1_REFUSED)
    return plugin


def plugin_for(accelerator: Any, requested: Any) -> Any:
    """The FSDP plugin a run shards with: the Accelerator's (on accelerators it sets mixed precision there), else
    ``requested``, what ``requested_plugin`` found before the Accelerator was built (Accelerate drops it on CPUs)."""
    return getattr(accelerator.state, "fsdp_plugin", None) or requested


def _holding_hooked_layer(learner: nn.Module) -> set[nn.Module]:
    """The modules that hold a layer the Learner's encoders hook: the layers and their ancestors."""
    encoders = (learner.encoder, getattr(learner, "target_encoder", None))
    hooked = {id(e.module) for e in encoders if e is not None and getattr(e, "module", None) is not None}
    return {m for m in learner.modules() if any(id(x) in hooked for x in m.modules())}


def shard_units(learner: nn.Module, class_names: list[str] | None = None) -> list[nn.Module]:
    """The modules of ``learner`` that become FSDP units, innermost first.

    ``class_names``: the block classes to shard (Accelerate's ``transformer_cls_names_to_wrap``);
    default: every child of an ``nn.Sequential``/``nn.ModuleList`` whose class occurs there at
    least twice and which has submodules and parameters (transformer blocks, residual blocks).
    Blocks holding the hooked layer are left to the root (see the module docstring).
    """
    skip = _holding_hooked_layer(learner)
    units: list[nn.Module] = []
    if class_names:
        found = {type(m).__name__ for m in learner.modules()}
        missing = [n for n in class_names if n not in found]
        if missing:
            raise ValueError(f"transformer_cls_names_to_wrap names {missing}, which the net does not have; "
                             f"choose among its block classes (e.g. {sorted(found)[:8]}) or leave it empty")
        units = [m for m in learner.modules() if type(m).__name__ in class_names and m is not learner]
    else:
        for container in learner.modules():
            if not isinstance(container, (nn.Sequential, nn.ModuleList)):
                continue
            kids = list(container.children())
            for m in kids:
                repeated = sum(type(k) is type(m) for k in kids) >= 2
                if repeated and next(m.children(), None) is not None and next(m.parameters(), None) is not None:
                    units.append(m)
    units = [m for m in units if m not in skip]
    # a unit nested in another unit is sharded first (fully_shard wants children before parents)
    depth = {m: len(n.split(".")) for n, m in learner.named_modules()}
    return sorted(dict.fromkeys(units), key=lambda m: -depth[m])


def is_sharded(module: nn.Module) -> bool:
    """True if ``module`` was sharded with ``fully_shard`` (it is then an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def _fully_shard_kwargs(plugin: Any, mesh: Any) -> dict:
    """``fully_shard`` keyword arguments from the plugin's settings."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    kwargs: dict = {"mesh": mesh}
    if plugin is None:
        return kwargs
    kwargs["reshard_after_forward"] = bool(plugin.reshard_after_forward)
    kwargs["mp_policy"] = plugin.mixed_precision_policy or MixedPrecisionPolicy()
    if plugin.cpu_offload is not None and not isinstance(plugin.cpu_offload, bool):
        kwargs["offload_policy"] = plugin.cpu_offload
    return kwargs


def _before_training_forward(module: nn.Module, args: Any) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every process before a training forward, as DDP does."""
    if module.training:
        sync_buffers(module)


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers to every process (one broadcast per dtype). Collective."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for buffers in by_dtype.values():
        flat = _flatten_dense_tensors(buffers)
        dist.broadcast(flat, src=0)
        for b, value in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            b.copy_(value)


def shard_learner(learner: nn.Module, plugin: Any = None, mesh: Any = None) -> nn.Module:
    """Shard ``learner`` in place over the process group: its repeated blocks (online and EMA target) as units,
    the Learner as the root; returns it. Call before building the optimiser. Collective."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        raise RuntimeError("FSDP shards over several processes: start with `accelerate launch --num_processes N` "
                           "(N >= 2) or torchrun; for one process, train without FSDP")
    if is_sharded(learner):
        return learner
    from torch.distributed.fsdp import fully_shard
    for p in learner.parameters():  # FSDP shards contiguous parameters only (DDP's channels_last layout is undone)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    kwargs = _fully_shard_kwargs(plugin, mesh)
    names = list(plugin.transformer_cls_names_to_wrap or []) if plugin is not None else None
    for unit in shard_units(learner, names):
        fully_shard(unit, **kwargs)
    # the root keeps its leftovers gathered for the backward (fully_shard's default for a root)
    _RESHARD_AFTER_FORWARD[learner] = kwargs.pop("reshard_after_forward", True)
    fully_shard(learner, **kwargs)
    if learner.ema is not None:  # it caches the parameter lists: drop the unsharded ones now, not at its first update
        learner.ema.refresh()
    if next(learner.buffers(), None) is not None:
        learner.register_forward_pre_hook(_before_training_forward)
    return learner


@contextlib.contextmanager
def gathered(learner: nn.Module, part: nn.Module | None = None) -> Iterator[None]:
    """Whole weights inside: the root's and those of the units in ``part`` (default: all) gathered on every process,
    for code that calls the net outside the Learner's forward (``learner.embed``, ``Embedder``, evaluation and
    health callbacks), on every process or on one alone; sharded again after. Every process must enter it, and
    before a process's first training step every process must run the same forwards inside (FSDP's processes fall
    out of step otherwise). A no-op for an unsharded learner."""
    if not is_sharded(learner):
        yield
        return
    # A forward of an inner unit before any of the root (an evaluation before the first step) would make that unit
    # a root of its own, and the training's forward would then fail ("FSDP state has already been lazily
    # initialized"); initialise from the root first. torch has no public call for it: a no-op once initialised.
    learner._get_fsdp_state()._lazy_init()
    units = [learner, *(m for m in (part or learner).modules() if is_sharded(m) and m is not learner)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)  # a forward inside must not reshard: no collective
    try:
        yield
    finally:
        for unit in units:
            if unit is not learner:  # the root never reshards after its forward
                unit.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.get(learner, True), recurse=False)
            unit.reshard()


def prepare(accelerator: Any, learner: nn.Module, *objects: Any) -> tuple:
    """``accelerator.prepare(learner, *objects)``, also for a sharded learner: Accelerate keeps that as it is (it
    leaves an ``FSDPModule`` alone on accelerators), and on CPUs it must not wrap it in DDP."""
    from accelerate.utils import DistributedType
    if not is_sharded(learner) or accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.prepare(learner, *objects)
    prepared = accelerator.prepare(*objects) if objects else ()
    if len(objects) == 1:
        prepared = (prepared,)
    return (learner, *prepared)


def full_checkpoints(plugin: Any) -> bool:
    """True when checkpoints hold the full state on rank 0 (``state_dict_type: FULL_STATE_DICT``), False for
    one shard per process (the plugin's default, ``SHARDED_STATE_DICT``)."""
    kind = getattr(plugin, "state_dict_type", None)
    return "FULL" in str(getattr(kind, "name", kind)).upper()


def _options(full: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def training_state(learner: nn.Module, optimizer: torch.optim.Optimizer, full: bool = True) -> tuple[dict, dict]:
    """(learner state, optimiser state) of a sharded learner. ``full``: whole tensors on the CPU on rank 0 and
    empty dicts elsewhere, keyed as an unsharded Learner's; else this process's shards. Collective.

    The optimiser's state is keyed by parameter name (torch.distributed.checkpoint's layout).
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(learner, optimizer, options=_options(full))


def load_training_state(learner: nn.Module, optimizer: torch.optim.Optimizer, learner_state: dict,
                        optimizer_state: dict, full: bool = True) -> None:
    """Load what ``training_state`` gave (``full``: every process passes the whole dicts). Collective.

    The learner's keys must match; parameters without optimiser state (those that never got a gradient,
    such as a classifier the hidden layer skips) start without it, as they would in an unsharded run.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(learner, learner_state, options=StateDictOptions(full_state_dict=full))
    set_optimizer_state_dict(learner, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=full, strict=False))


def save_shards(folder: str | os.PathLike, learner: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Write each process's shards of the learner and optimiser into ``folder`` (torch.distributed.checkpoint:
    one file per process and rank 0's metadata). Collective."""
    import torch.distributed.checkpoint as dcp
    sync_buffers(learner)  # the processes' BatchNorm statistics differ since the last forward; rank 0's are saved
    learner_state, optimizer_state = training_state(learner, optimizer, full=False)
    dcp.save({"learner": learner_state, "optimizer": optimizer_state}, checkpoint_id=os.fspath(folder))
    return Path(folder)


def load_shards(folder: str | os.PathLike, learner: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``save_shards``' folder into the sharded learner and optimiser. Collective."""
    import torch.distributed.checkpoint as dcp
    if not (Path(folder) / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} holds no sharded checkpoint (no .metadata); resume from another "
                                "checkpoint or start a new run folder")
    learner_state, optimizer_state = training_state(learner, optimizer, full=False)
    state = {"learner": learner_state, "optimizer": optimizer_state}
    # a fresh optimiser holds zero state for every parameter; the checkpoint only for those that had gradients
    dcp.load(state, checkpoint_id=os.fspath(folder), planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    load_training_state(learner, optimizer, state["learner"], state["optimizer"], full=False)


def net_state_dict(learner: nn.Module) -> dict[str, torch.Tensor]:
    """The user's net's whole weights (keys as ``net.state_dict()``), on the CPU on rank 0, empty elsewhere: what
    ``backbone.safetensors`` holds. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    prefix = "encoder.net."
    state = get_model_state_dict(learner, options=_options(True))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _names(learner: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimiser's parameters, in its order (the index an optimiser state_dict uses)."""
    names = {p: n for n, p in learner.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _by_index(state: dict, names: list[str]) -> dict:
    """An optimiser state keyed by parameter name turned into ``optimizer.state_dict()``'s layout (by index)."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _by_name(state: dict, names: list[str]) -> dict:
    """``optimizer.state_dict()``'s layout (by index) turned into one keyed by parameter name."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def checkpoint_entries(learner: nn.Module, optimizer: torch.optim.Optimizer, plugin: Any,
                       checkpoint: str | os.PathLike) -> dict:
    """The ``learner``, ``optimizer`` and ``fsdp`` entries of a Trainer checkpoint for a sharded learner. Collective.

    Full (the plugin's ``FULL_STATE_DICT``): whole tensors on rank 0 ({} elsewhere) in an unsharded run's layout, so
    a run with or without FSDP resumes from it. Sharded: each process writes its shards into ``<checkpoint>.shards``
    beside ``checkpoint`` (a temporary folder, renamed when complete), and the entries name that folder.
    """
    if full_checkpoints(plugin):
        learner_state, optimizer_state = training_state(learner, optimizer, full=True)
        if optimizer_state:
            optimizer_state = _by_index(optimizer_state, _names(learner, optimizer))
        return {"learner": learner_state, "optimizer": optimizer_state, "fsdp": {"layout": "full"}}
    final = Path(checkpoint).with_suffix(".shards")
    temp = final.parent / f".{final.name}.partial.tmp"  # the same name on every process
    main = dist.get_rank() == 0
    if main:
        shutil.rmtree(temp, ignore_errors=True)
    dist.barrier()
    save_shards(temp, learner, optimizer)
    dist.barrier()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temp, final)
    dist.barrier()
    return {"learner": {}, "optimizer": {}, "fsdp": {"layout": "sharded", "shards": final.name}}


def restore_entries(learner: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    folder: str | os.PathLike) -> None:
    """Load a checkpoint's ``learner`` and ``optimizer`` (and ``fsdp``) entries into a sharded learner: from
    ``checkpoint_entries``, or from a run without FSDP. Every process passes the checkpoint it read. Collective."""
    fsdp = state.get("fsdp") or {"layout": "full"}
    if fsdp["layout"] == "sharded":
        load_shards(Path(folder) / fsdp["shards"], learner, optimizer)
        return
    optimizer_state = _by_name(state["optimizer"], _names(learner, optimizer))
    load_training_state(learner, optimizer, state["learner"], optimizer_state, full=True)
