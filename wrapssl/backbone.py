"""A backbone that describes itself: weights with their metadata (safetensors), loading, and one Embedder.

A run writes ``backbone.safetensors`` whose header carries what every later tool needs (architecture,
representation layer, image size, channels, normalisation, classes, wrapssl version), and
``backbone.pt`` (the bare state dict, for ``net.load_state_dict(torch.load(...))``). ``load_backbone``
reads the metadata; runs written before it existed fall back on the metrics.json beside them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .encoder import ClassifierInput, Encoder, LayerSpec
from .nnutil import eval_mode, input_channels

__all__ = ["BackboneInfo", "Backbone", "Embedder", "Classifier", "save_backbone", "read_backbone_info", "load_backbone", "random_init",
           "layer_to_json", "layer_from_json"]

FORMAT = "wrapssl.backbone"
FORMAT_VERSION = 1
BACKBONE = "backbone.pt"
BACKBONE_SAFETENSORS = "backbone.safetensors"


def layer_to_json(layer: Any) -> Any:
    """A hidden-layer spec as JSON: a name, an index, {"classifier_input": ...}, or None (a callable)."""
    if isinstance(layer, ClassifierInput):
        return {"classifier_input": layer.classifier, "dropouts": list(layer.dropouts)}
    if isinstance(layer, (str, int)) and not isinstance(layer, bool):
        return layer
    return None  # a callable (timm's pre-logits among them) is found again from the net


def layer_from_json(value: Any) -> LayerSpec | None:
    """The inverse of ``layer_to_json`` (None: let the net's pre-logits be found again)."""
    if isinstance(value, dict) and "classifier_input" in value:
        return ClassifierInput(str(value["classifier_input"]), tuple(value.get("dropouts") or ()))
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    return None


@dataclass
class BackboneInfo:
    """What a saved backbone is: enough to rebuild it, embed with it and fine-tune it without guessing."""

    arch: str | None = None            # a name for ``build_arch`` (None: the user's own class)
    net_class: str | None = None       # the net's Python class, for messages
    hidden_layer: Any = None           # ``layer_to_json`` of the representation layer
    image_size: int | None = None
    channels: int = 3
    mean: list[float] | None = None    # the normalisation the net was trained with (None: none)
    std: list[float] | None = None
    num_classes: int | None = None     # outputs of the net's own classifier, as built
    classes: list[str] = field(default_factory=list)  # names of the labels, where the data had them
    version: str = ""                  # the wrapssl that wrote it

    def to_metadata(self) -> dict[str, str]:
        """The safetensors header's metadata: string to string."""
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        meta.update({k: json.dumps(v) for k, v in asdict(self).items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "BackboneInfo":
        """Read ``to_metadata``'s output; unknown keys are ignored, so newer files still load."""
        known = cls.__dataclass_fields__
        values = {}
        for k, v in meta.items():
            if k in known:
                try:
                    values[k] = json.loads(v)
                except json.JSONDecodeError:
                    values[k] = v
        return cls(**values)

    @property
    def layer(self) -> LayerSpec | None:
        return layer_from_json(self.hidden_layer)

    @property
    def normalize(self) -> tuple[list[float], list[float]] | None:
        return (list(self.mean), list(self.std)) if self.mean is not None and self.std is not None else None


def _plain_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The net's state dict on the CPU, contiguous; tensors sharing memory are copied apart (safetensors)."""
    out, seen = {}, set()
    for k, v in net.state_dict().items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def save_backbone(net: nn.Module, folder: str | os.PathLike, info: BackboneInfo,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``backbone.safetensors`` (weights + ``info``) and ``backbone.pt`` into ``folder``, each atomically;
    returns the safetensors path. ``state``: the net's weights when ``net`` holds only shards (FSDP)."""
    from safetensors.torch import save

    from .version import __version__
    from .files import atomic_open, atomic_save, write_failure

    folder = Path(folder)
    info.version = info.version or __version__
    info.net_class = info.net_class or type(net).__name__
    state = _plain_state(net) if state is None else {k: v.contiguous() for k, v in state.items()}
    path = folder / BACKBONE_SAFETENSORS
    try:
        with atomic_open(path, "wb") as f:
            f.write(save(state, metadata=info.to_metadata()))
    except OSError as e:
        raise write_failure(path, e) from e
    atomic_save(state, folder / BACKBONE)
    return path


def _safetensors_meta(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file (None when it has none or is not one)."""
    try:
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt") as f:
            return f.metadata()
    except Exception:
        return None


def _weights_file(source: Path) -> Path:
    """The weights a source names: a run folder's backbone, or the file itself."""
    if source.is_dir():
        for name in (BACKBONE_SAFETENSORS, BACKBONE):
            if (source / name).is_file():
                return source / name
        raise FileNotFoundError(f"{source} holds no {BACKBONE_SAFETENSORS} or {BACKBONE}; pass a run folder of "
                                "`wrapssl train`, a backbone file or a checkpoint-N.pt")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or folder; pass a run folder, a backbone file or a "
                                "checkpoint-N.pt")
    return source


def _legacy_info(folder: Path) -> BackboneInfo | None:
    """What a run written before self-describing backbones recorded in its metrics.json (None: nothing)."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    args = record.get("args") or {}
    if not args.get("arch"):
        return None
    stats = args.get("normalize")
    if isinstance(stats, (list, tuple)) and len(stats) == 2:
        mean, std = list(stats[0]), list(stats[1])
    else:  # the app then trained with the Learner's default, ImageNet's statistics
        from .augment.inputs import IMAGENET_MEAN, IMAGENET_STD
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    layer = args.get("hidden_layer")
    return BackboneInfo(arch=args["arch"], hidden_layer=layer,
                        image_size=args.get("image_size"), channels=int(args.get("channels") or 0) or 3,
                        mean=mean, std=std, classes=list(record.get("classes") or []))


def read_backbone_info(source: str | os.PathLike) -> BackboneInfo | None:
    """The metadata of a backbone (a run folder, a backbone file or a checkpoint), None when nothing says it.

    Looked up in order: the file's own safetensors header; ``backbone.safetensors`` beside a
    ``backbone.pt`` or checkpoint; the ``metrics.json`` of runs written before the header existed.
    """
    source = Path(source).expanduser()
    path = _weights_file(source)
    for candidate in (path, path.with_name(BACKBONE_SAFETENSORS)):
        if candidate.suffix == ".safetensors" and candidate.is_file():
            meta = _safetensors_meta(candidate)
            if meta and meta.get("format") == FORMAT:
                return BackboneInfo.from_metadata(meta)
    return _legacy_info(path.parent)


def _guess_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Input channels (first 4-D weight) and classes (last 2-D weight) of a state dict without metadata."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 4]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return (int(convs[0].shape[1]) if convs else 3), (int(linears[-1].shape[0]) if linears else 10)


@dataclass
class Backbone:
    """A loaded backbone: the net with its weights, its representation layer, its description, its folder."""

    net: nn.Module
    hidden_layer: LayerSpec
    info: BackboneInfo
    folder: Path

    def embedder(self) -> "Embedder":
        """An ``Embedder`` with this backbone's layer and normalisation."""
        return Embedder(self.net, self.hidden_layer, normalize=self.info.normalize, channels=self.info.channels)


def load_backbone(source: str | os.PathLike, arch: str | None = None, hidden_layer: LayerSpec | None = None,
                  image_size: int | None = None) -> Backbone:
    """The net saved at ``source`` (run folder, backbone file or checkpoint), rebuilt from its metadata.

    ``arch``, ``hidden_layer`` and ``image_size`` override what the file says; a file that says
    nothing (a bare state dict) needs ``arch``. Raises FileNotFoundError or ValueError with the fix.
    """
    from .archs import build_arch, load_weights, read_state_dict

    path = _weights_file(Path(source).expanduser())
    info = read_backbone_info(path) or BackboneInfo()
    state = read_state_dict(path)
    channels, classes = _guess_shape(state)
    if arch is not None and arch != info.arch:  # another architecture: nothing else recorded applies to it
        info = BackboneInfo(arch=arch, image_size=info.image_size, mean=info.mean, std=info.std,
                            classes=info.classes)
    if not info.arch:
        raise ValueError(f"{path} does not say which architecture it is (no wrapssl metadata, no metrics.json "
                         "beside it); pass --arch (e.g. --arch small_resnet or --arch resnet18)")
    info.num_classes = info.num_classes or classes
    info.channels = channels  # the weights say it for certain
    info.image_size = image_size or info.image_size
    try:
        net, default_layer = build_arch(info.arch, channels=info.channels, num_classes=info.num_classes,
                                        image_size=info.image_size)
        load_weights(net, path)  # its message names the file and the keys that do not fit
    except ValueError as e:
        raise ValueError(f"{e} (built as arch {info.arch!r})") from e
    layer = hidden_layer if hidden_layer is not None else (info.layer or default_layer)
    info.hidden_layer = layer_to_json(layer)
    return Backbone(net, layer, info, path.parent)


def random_init(backbone: Backbone, seed: int = 0) -> nn.Module:
    """The backbone's architecture at the random start its run had with ``seed`` (as `wrapssl train` builds it)."""
    from .archs import build_arch

    info = backbone.info
    torch.manual_seed(int(seed))
    net, _ = build_arch(info.arch, channels=info.channels, num_classes=info.num_classes or 1,
                        image_size=info.image_size)
    return net


class Embedder(nn.Module):
    """Images → representations: the net up to its hidden layer, in eval mode, without gradients.

    Takes uint8 (0-255) or float images in [0, 1], grey repeated for RGB nets, normalised with
    ``normalize`` (ImageNet's by default, as a Learner trains; a ``Normalize`` module is used as
    it is); calling it is ``embed``, so an Embedder goes wherever a Learner's ``embed`` does
    (``embed_dataset``, the CLI, ``health.embedding_health``); ``features`` is the same with
    gradients, for training on top (``finetune.Classifier``). ``Learner.embed`` is one, over the
    Learner's own hooked encoder.

    ``net``: the net, hooked here at ``hidden_layer`` (None: its pre-logits) and pooled with
    ``pooling``, fed images in ``channels_last`` memory format as ``Encoder`` takes it (False:
    contiguous); or an ``Encoder`` already hooked (shared: ``close`` leaves its hook to its
    owner). ``resize``: resize images to ``image_size`` first (the Learner's views are that size).
    """

    def __init__(self, net: nn.Module, hidden_layer: LayerSpec | None = None,
                 normalize: tuple[Sequence[float], Sequence[float]] | None | str | nn.Module = "imagenet",
                 channels: int | None = None, image_size: int = 224, *, pooling: str = "mean",
                 channels_last: bool | None = False, resize: bool = False):
        super().__init__()
        from .augment import normalization
        from .augment.inputs import IMAGENET_MEAN, IMAGENET_STD

        shared = isinstance(net, Encoder)
        if shared and hidden_layer is not None:
            raise ValueError("an Encoder is hooked at its own layer already: pass hidden_layer=None with it")
        self.channels = channels or input_channels(net.net if shared else net)
        self.image_size, self.resize, self._owns_encoder = image_size, bool(resize), not shared
        if not shared and hidden_layer is None:
            from .prelogits import find_pre_logits
            hidden_layer = find_pre_logits(net, self.channels, image_size)
        self.encoder = net if shared else Encoder(net, hidden_layer, pooling, channels_last=channels_last)
        if isinstance(normalize, nn.Module):
            self.normalize = normalize
        else:
            stats = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else normalize
            self.normalize = normalization(self.channels, stats)  # type: ignore[arg-type]

    @property
    def net(self) -> nn.Module:
        return self.encoder.net

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] with the net's channel count → (B, D): normalised, in the net's memory format,
        through the hooked encoder; an error of the net is raised again, of its own type, with what it got."""
        return self.encoder.run(self.encoder.input_format(self.normalize.to(x.device)(x)), self.channels)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The representations (B, D) of ``images`` as the net is now (its train/eval mode, with gradients)."""
        from .augment import resize, to_float

        x = to_float(images, self.channels)
        return self.encode(resize(x, self.image_size) if self.resize else x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representations (B, D) of ``images``, in eval mode, without gradients."""
        with torch.no_grad(), eval_mode(self.encoder):
            return self.features(images)

    def close(self) -> None:
        """Remove the hook from the net (the net works as before); a shared Encoder is its owner's to close."""
        if self._owns_encoder:
            self.encoder.close()

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Classifier(Embedder):
    """A backbone up to its representation, and a linear head: images in [0, 1] or uint8 → logits.

    The net's own classifier (past the hidden layer) never runs; the head replaces it. ``embed`` and
    ``features`` give the representation, as an ``Embedder``'s.
    """

    def __init__(self, net: nn.Module, hidden_layer: LayerSpec, num_classes: int,
                 normalize: tuple[Sequence[float], Sequence[float]] | None, image_size: int,
                 channels: int | None = None):
        super().__init__(net, hidden_layer, normalize, channels, image_size)
        self.image_size = image_size
        self.head = nn.Linear(self.encoder.probe_width(self.channels, image_size), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
