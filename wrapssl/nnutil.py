"""Small torch helpers used in several rooms: modes, copies, shape probes, devices, RNG streams, error context."""
from __future__ import annotations

import contextlib
import copy
import warnings
from itertools import chain
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

__all__ = ["eval_mode", "copy_module", "module_device", "meta_probe", "input_channels", "size_hint", "with_context",
           "private_rng", "warn_if_frozen"]

T = TypeVar("T")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside; every submodule's own train/eval flag restored afterwards.

    Restored through ``train()``, parents before children, rather than by setting the flags:
    modules that keep eval-mode caches (timm's LeViT attention biases) drop them in ``train()``,
    so weights that change while training are never served from a stale cache.
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in flags:  # modules() lists parents first: children then fix their own flag
            if m.training != was_training:
                m.train(was_training)


def _tensors_in(value: object) -> Iterator[torch.Tensor]:
    """The tensors held by a module attribute: a tensor, or one inside dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v)


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module``, also when it caches tensors computed with gradients.

    ``copy.deepcopy`` refuses non-leaf tensors; nets such as timm's LeViT keep one (an
    attention-bias cache) after a forward in eval mode. The copy gets such a tensor detached:
    its value, computed from weights the copy shares at this moment.
    """
    memo: dict[int, object] = {}
    for m in module.modules():
        for name, value in vars(m).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            for t in _tensors_in(value):
                if t.grad_fn is not None:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(module, memo)


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU if it has none)."""
    first = next(chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class _Call(nn.Module):
    """``run(net, x)`` as a module's forward, so that ``functional_call`` can swap the net's tensors around it."""

    def __init__(self, net: nn.Module, run: Callable[[nn.Module, torch.Tensor], object]):
        super().__init__()
        self.net, self.run = net, run

    def forward(self, x: torch.Tensor) -> object:
        return self.run(self.net, x)


def meta_probe(net: nn.Module, run: Callable[[nn.Module, torch.Tensor], T], shape: tuple[int, ...]) -> T:
    """``run(net, x)`` for zero images ``x`` of ``shape``, in eval mode without gradients, leaving ``net`` as it was.

    First on the meta device: ``torch.func.functional_call`` lends the net meta stand-ins for its
    weights and buffers for the one call (no memory, no compute; no BN statistic can move).
    Nets that meta tensors cannot run through (tensors kept outside parameters and buffers,
    data-dependent shapes) get the call on a throw-away copy, on the net's own device; its
    error is the one raised. Either way the net's tensors, train/eval flags and hooks are
    the same afterwards (``run`` must remove any hook it adds).
    """
    stand_ins = {f"net.{name}": (nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                                 if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
                 for name, t in chain(net.named_parameters(), net.named_buffers())}
    try:
        with torch.no_grad(), eval_mode(net):
            return torch.func.functional_call(_Call(net, run), stand_ins, (torch.zeros(shape, device="meta"),))
    except Exception:
        pass
    twin = copy_module(net)
    with torch.no_grad(), eval_mode(twin):
        return run(twin, torch.zeros(shape, device=module_device(twin)))


def input_channels(net: nn.Module, default: int = 3) -> int:
    """The channel count the net takes: timm's ``in_chans``, else its first convolution's (a patch embedding is
    one), else ``default``."""
    declared = getattr(net, "in_chans", None)  # timm's; also right for stems that reshape first (TResNet)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    for m in net.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            if m.in_channels > 0:  # lazy convolutions do not know theirs yet
                return m.in_channels
    return default


def size_hint(net: nn.Module, image_size: int) -> str:
    """Advice for a net built for one input size (a ViT, most timm transformers) run at another; else ''."""
    if isinstance(getattr(net, "image_size", None), int) and net.image_size != image_size:  # torchvision's ViT
        return (f"; this net is built for {net.image_size}x{net.image_size} images: build it with "
                f"image_size={image_size} (e.g. models.vit_b_16(image_size={image_size})) or set "
                f"image_size={net.image_size}")
    built = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if built is None:
        cfg = getattr(net, "pretrained_cfg", None)
        built = cfg.get("input_size", (None,))[1:] if isinstance(cfg, dict) else None
    if not built or tuple(built) == (image_size, image_size):
        return ""
    if getattr(net, "dynamic_img_size", None) is False:
        return (f"; timm built this net for {built[0]}x{built[1]} images: create it with dynamic_img_size=True "
                f"(or img_size={image_size})")
    return (f"; timm built this net for {built[0]}x{built[1]} images: if it needs that size, create it "
            f"with img_size={image_size}, or set image_size={built[1]}")


def with_context(error: Exception, message: str) -> Exception:
    """The exception to raise for ``error`` with ``message``, of ``error``'s own type: a new one caused by
    ``error`` where the type takes a message alone, else ``error`` itself with ``message`` as a note (PEP 678)."""
    try:
        new = type(error)(message)
    except Exception:  # a type with a constructor of its own (required arguments)
        new = None
    if new is not None:
        new.__cause__ = error
        return new
    error.add_note(message)
    return error


@contextlib.contextmanager
def private_rng(device: torch.device | str | None = None, seed: int | None = None) -> Iterator[None]:
    """A private random stream inside: the CPU's generator and, on a CUDA ``device``, that device's are restored
    afterwards, so the code inside neither consumes nor depends on the caller's draws; ``seed`` seeds it."""
    device = torch.device(device if device is not None else "cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


_STAY_FROZEN = ("their statistics stay frozen. Call learner.train() (or net.train()) before training")


def warn_if_frozen(net: nn.Module, who: str = "the Learner is training", effect: str = _STAY_FROZEN,
                   stacklevel: int = 2) -> bool:
    """Warn if BatchNorm or dropout layers of ``net`` are in eval mode as training starts; True if it warned.

    ``who`` says who trains, ``effect`` what becomes of those layers (by default: they stay
    frozen); ``stacklevel`` counts from the caller, as ``warnings.warn``'s does.
    """
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    frozen = [name or type(net).__name__ for name, m in net.named_modules() if isinstance(m, kinds) and not m.training]
    if frozen:
        warnings.warn(f"{who}, but {len(frozen)} BatchNorm/dropout layer(s) of the net are in eval mode (e.g. "
                      f"{frozen[0]!r}): {effect}; to freeze BatchNorm on purpose, use "
                      "torchvision.ops.FrozenBatchNorm2d", RuntimeWarning, stacklevel=stacklevel + 1)
    return bool(frozen)
