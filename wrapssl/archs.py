"""Backbones by name (a small CPU-friendly ResNet, any torchvision classifier, timm models) and local weights."""
from __future__ import annotations

import difflib
import fnmatch
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torchvision import models
from torchvision.models.resnet import BasicBlock

from .checks import optional_import, positive_int
from .encoder import LayerSpec
from .nnutil import input_channels
from .prelogits import find_pre_logits

__all__ = ["SmallResNet", "build_arch", "available_archs", "adapt_input_channels", "read_state_dict",
           "load_weights"]

# Inception-style nets: their auxiliary heads only cost compute and unused parameters when pretraining.
_NO_AUX = ("googlenet", "inception_v3")
# Where other trainers keep the net's weights inside a checkpoint dict.
_STATE_KEYS = ("state_dict", "model", "module", "net", "model_state_dict")


class SmallResNet(nn.Module):
    """A narrow ResNet for 28-64 px images on CPU: a strided 3x3 stem, no max-pool, BasicBlocks, global pool, BN-neck.

    ``widths`` are the channels of the stages (each after the first halves the
    resolution); ``blocks`` the BasicBlocks per stage. ``stem_stride`` 2 (the
    default) halves the image in the first convolution: on 28 px Fashion-MNIST a
    step costs about a fifth of stride 1, and the net trained with labels scores
    the same (90.7% test accuracy). ``neck`` adds a BatchNorm1d on the pooled
    features, the classifier's input and so the pre-logits the Learner trains:
    it raised kNN by about 2 points in our SimCLR runs (benchmarks/RESULTS.md, section 6). The
    default (16, 32, 64, 128) x 1 has 0.3 M parameters and a 128-d representation.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64, 128),
                 blocks: Sequence[int] = (1, 1, 1, 1), stem_stride: int = 2, neck: bool = True):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths {tuple(widths)} and blocks {tuple(blocks)} must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], widths[0]
        for i, (out, n) in enumerate(zip(widths, blocks)):
            stages.append(self._stage(width, out, n, stride=1 if i == 0 else 2))
            width = out
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.BatchNorm1d(width) if neck else nn.Identity()
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(width: int, out: int, n: int, stride: int) -> nn.Sequential:
        """``n`` BasicBlocks from ``width`` to ``out`` channels, the first one striding."""
        down = None
        if stride != 1 or width != out:
            down = nn.Sequential(nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        return nn.Sequential(BasicBlock(width, out, stride, down), *(BasicBlock(out, out) for _ in range(n - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.neck(torch.flatten(self.avgpool(x), 1)))


def available_archs() -> list[str]:
    """Names ``build_arch`` accepts without timm: "small_resnet" and torchvision's classification models."""
    return ["small_resnet", *models.list_models(module=models)]


def _first_conv(net: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """(name, module) of the net's first Conv2d, the one its images meet (a patch embedding is one)."""
    return next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)


def adapt_kernel(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first convolution's kernel (out, in, k, k) for ``channels`` inputs: the sum over its inputs, spread evenly.

    An image whose channels are all equal then gives the same response as before, so a
    grey or multispectral net starts as the RGB net does on grey images.
    """
    if weight.shape[1] == channels:
        return weight
    return weight.sum(dim=1, keepdim=True).div(channels).expand(-1, channels, -1, -1).contiguous()


def adapt_input_channels(net: nn.Module, channels: int) -> nn.Module:
    """Make the first Conv2d of ``net`` take ``channels`` inputs (in place; returns ``net``).

    The new kernel is ``adapt_kernel`` of the old one: for 1 channel the sum over the
    colour inputs, so the adapted net on a grey image equals the original on that image
    repeated to RGB (same initial function, one third of the stem's work); any other count
    gets the same response to an image whose channels are all equal.
    """
    channels = positive_int(channels, "channels")
    found = _first_conv(net)
    if found is None:
        raise ValueError(f"{type(net).__name__} has no Conv2d to adapt to {channels} channel(s); "
                         "adapt its first layer yourself")
    name, conv = found
    if conv.in_channels == channels:
        return net
    if conv.groups != 1:
        raise ValueError(f"{type(net).__name__}'s first convolution {name!r} is grouped; it cannot be adapted to "
                         f"{channels} channel(s): adapt the stem yourself")
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_kernel(conv.weight, channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, new)
    if isinstance(getattr(net, "in_chans", None), int):  # timm's record of the input channels, read by the Learner
        net.in_chans = channels
    return net


def _tensors_only(state: object) -> bool:
    return isinstance(state, Mapping) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (changed in place) without the prefix that DDP ("module.") or torch.compile ("_orig_mod.") put
    before every key; a prefix that only some keys have is part of their names and stays."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A net's weights from a file: a torchvision/timm state dict (.pth, .pt, .bin, .safetensors), a
    ``backbone.pt``, a wrapssl Trainer checkpoint (its online net) or another trainer's checkpoint dict."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "backbone.pt").is_file():
        path = path / "backbone.pt"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {os.fspath(path)} not found; pass a state dict file, a backbone.pt "
                                "(or the run folder holding it) or a checkpoint-N.pt")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(os.fspath(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{os.fspath(path)} is not a readable weights file ({type(e).__name__}: {e}); it must be "
                         "saved with torch.save(net.state_dict(), path) or safetensors") from e
    if isinstance(state, Mapping) and isinstance(state.get("learner"), Mapping):  # a wrapssl Trainer checkpoint
        prefix = "encoder.net."  # the Learner keeps the user's net under encoder.net
        state = {k[len(prefix):]: v for k, v in state["learner"].items() if k.startswith(prefix)}
    elif isinstance(state, Mapping) and not _tensors_only(state):
        state = next((state[k] for k in _STATE_KEYS if _tensors_only(state.get(k))), state)
    if not _tensors_only(state):
        raise ValueError(f"{os.fspath(path)} holds no state dict of a net (a mapping of names to tensors); "
                         "save one with torch.save(net.state_dict(), path)")
    return _strip_prefix(dict(state))


def _listing(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_weights(net: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                 ignore: Sequence[str] = ()) -> nn.Module:
    """Load weights into ``net`` in place (returns it) from a file (see ``read_state_dict``) or a state dict.

    Every key must match in name and shape, except keys matching a pattern of ``ignore``
    (``fnmatch`` patterns such as ``"fc.*"``, or prefixes such as ``"fc."``), which keep the
    net's own values. A first convolution saved for another channel count is adapted with
    ``adapt_kernel`` (RGB weights for a grey or multispectral net). Anything else that does
    not fit raises a ValueError that names the keys and what to do.
    """
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else _strip_prefix(dict(source))
    patterns = list(ignore)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) or (p.endswith(".") and key.startswith(p)) for p in patterns)

    own = net.state_dict()
    state = {k: v for k, v in state.items() if not ignored(k)}
    first = _first_conv(net)
    stem = f"{first[0]}.weight" if first else None
    if stem in state and stem in own and state[stem].ndim == 4 and state[stem].shape[0] == own[stem].shape[0] \
            and state[stem].shape[2:] == own[stem].shape[2:]:
        state[stem] = adapt_kernel(state[stem], own[stem].shape[1])
    # BatchNorm fills in a missing num_batches_tracked itself (files saved by old PyTorch versions lack it)
    missing = [k for k in own if k not in state and not ignored(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the state dict"
        parts = []
        if wrong:
            parts.append("shapes differ for " + _listing([f"{k} (file {tuple(state[k].shape)}, net "
                                                          f"{tuple(own[k].shape)})" for k in wrong]))
        if missing:
            parts.append(f"{len(missing)} key(s) of the net are not in the file: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of the file are not in the net: {_listing(unexpected)}")
        modules = sorted({k.rpartition(".")[0] + "." for k in [*wrong, *missing, *unexpected]})
        if len(modules) <= 2:  # a classifier for another number of classes, say
            advice = (f"Build the net to match the file (e.g. its number of classes), or pass ignore={modules!r} "
                      "to keep the net's own values there")
        else:
            advice = "The file is of another architecture or variant: check the model name"

        raise ValueError(f"the weights in {where} do not fit {type(net).__name__}: {'; '.join(parts)}. {advice}")
    net.load_state_dict(state, strict=False)  # strict is checked above, with the ignored keys left out
    return net


def _timm_checkpoint_filter(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` through the model module's ``checkpoint_filter_fn``, as timm loads its own pretrained weights
    (it converts original checkpoint layouts and resamples position embeddings to the net's image size)."""
    fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    return fn(state, net) if callable(fn) else state


def _build_timm(name: str, channels: int, num_classes: int, image_size: int | None) -> nn.Module:
    """A randomly initialised timm model, built for ``image_size`` where the model fixes its input size."""
    timm = optional_import("timm", f"architecture {name!r} needs timm: pip install timm (or pick a torchvision "
                                   "model, e.g. 'resnet18', or 'small_resnet')")
    kwargs = dict(pretrained=False, num_classes=num_classes, in_chans=channels)
    try:
        if image_size is not None:
            try:
                return timm.create_model(name, img_size=image_size, **kwargs)
            except TypeError:  # a model that takes any size has no img_size argument
                pass
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"timm does not know the model {name!r}: {e}; see timm.list_models()") from e


def _is_timm_model(name: str) -> bool:
    """True if timm is installed and knows ``name``."""
    try:
        import timm
    except ImportError:
        return False
    return name in timm.list_models()


def build_arch(name: str = "small_resnet", channels: int = 3, num_classes: int = 10,
               image_size: int | None = None, weights: str | os.PathLike | None = None,
               ignore: Sequence[str] = ()) -> tuple[nn.Module, LayerSpec]:
    """A network and its representation layer for ``Learner``: the net's pre-logits (see ``find_pre_logits``).

    ``name``: "small_resnet" (the default, for 28-64 px images on CPU), any
    ``torchvision.models.list_models()`` name, or a timm name ("timm:resnet18";
    unprefixed names that torchvision lacks also go to timm when it is installed).
    ``channels``: any count; the first convolution is adapted (``adapt_input_channels``).
    ``image_size`` is passed to models that fix it at construction (ViTs).
    ``weights``: a local file to start from (see ``load_weights``, which takes ``ignore``);
    random initialisation otherwise. Nothing is ever downloaded.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"arch name must be a non-empty string, got {name!r}")
    channels = positive_int(channels, "channels (the images' channel count)")
    num_classes = positive_int(num_classes, "num_classes")
    state = read_state_dict(weights) if weights is not None else None
    key = name.strip()
    timm_name = key[5:] if key.lower().startswith("timm:") else None
    key = key.lower().replace("-", "_")
    if timm_name is None and key != "small_resnet" and key not in models.list_models(module=models):
        if not _is_timm_model(name):
            close = difflib.get_close_matches(key, available_archs(), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown architecture {name!r}{hint} Choose 'small_resnet', a torchvision model name "
                             "(torchvision.models.list_models()), or 'timm:<name>' with timm installed")
        timm_name = name
    if timm_name is not None:
        net = _build_timm(timm_name, channels, num_classes, image_size)
        if state is not None:
            load_weights(net, _timm_checkpoint_filter(net, state), ignore)
    else:
        net = SmallResNet(channels, num_classes) if key == "small_resnet" else \
            adapt_input_channels(_build_torchvision(key, num_classes, image_size), channels)
        if state is not None:
            load_weights(net, state, ignore)
    return net, find_pre_logits(net, input_channels(net), image_size or 224)


def _build_torchvision(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    """A torchvision classification model without weights."""
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name.startswith("vit_") and image_size is not None:
        patch = int(name.rsplit("_", 1)[-1])
        if image_size % patch:
            raise ValueError(f"{name} cuts images into {patch}x{patch} patches; image_size {image_size} must be a "
                             f"multiple of {patch} (e.g. {max(patch, image_size // patch * patch)})")
        kwargs["image_size"] = image_size
    if name in _NO_AUX:
        kwargs.update(aux_logits=False, init_weights=False)
    return models.get_model(name, **kwargs)
