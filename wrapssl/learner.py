"""Learner: wraps a user's net into a self-supervised objective. Knows no method by name."""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .augment import IMAGENET_MEAN, IMAGENET_STD, Normalize, RandomOp, Views, resize, set_crop_scale, to_float
from .ema import EMA, cosine_momentum, make_target
from .hidden import Encoder, LayerSpec
from .methods import Method, get_method


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextlib.contextmanager
def _on_meta(module: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer of ``module`` for a meta tensor; restore the originals after."""
    saved = []
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for name, t in store.items():
                if t is not None:
                    saved.append((store, name, t))
    try:
        for store, name, t in saved:
            meta = torch.empty_like(t, device="meta")
            store[name] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
        yield
    finally:
        for store, name, t in saved:
            store[name] = t


def _feature_dim(encoder: Encoder, channels: int, image_size: int) -> int:
    """Width of the pooled hidden layer, found without touching the user's net.

    A forward on the meta device costs no memory or compute and moves no
    BN statistics; nets that meta tensors cannot run through get a forward
    on a throw-away copy in eval mode instead.
    """
    x = torch.zeros(2, channels, image_size, image_size, device="meta")
    try:
        with torch.no_grad(), _on_meta(encoder):
            return encoder(x).shape[-1]
    except Exception:
        pass
    net = copy.deepcopy(encoder.net)
    probe = Encoder(net, encoder.fn or encoder.layer_name, encoder.pooling)
    device = next(iter([*net.parameters(), *net.buffers()]), torch.empty(0)).device
    try:
        with torch.no_grad(), _eval_mode(net):
            return probe(torch.zeros(x.shape, device=device)).shape[-1]
    except Exception as e:
        raise RuntimeError(f"could not run {type(net).__name__} on images of shape (2,{channels},{image_size},"
                           f"{image_size}) to find the width of its hidden layer: {e}. Check image_size, "
                           "channels and hidden_layer") from e
    finally:
        probe.close()


def normalization(channels: int, normalize: tuple[Sequence[float], Sequence[float]] | None
                  = (IMAGENET_MEAN, IMAGENET_STD)) -> Normalize:
    """The input normalisation a net of ``channels`` channels is trained with (None: identity)."""
    if normalize is None:
        return Normalize(None, None)
    mean, std = normalize
    if channels == 1 and len(mean) == 3:  # grey images: the mean of the per-channel statistics
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return Normalize(mean, std)


def _same_size_batches(views: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """Runs of consecutive same-shaped views concatenated: (batch, number of views in it), in view order."""
    batches, i = [], 0
    while i < len(views):
        j = i + 1
        while j < len(views) and views[j].shape == views[i].shape:
            j += 1
        batches.append((torch.cat(views[i:j]) if j - i > 1 else views[i], j - i))
        i = j
    return batches


def _first_views(batches: list[tuple[torch.Tensor, int]], n: int) -> list[tuple[torch.Tensor, int]]:
    """The batches of the first ``n`` views, as slices of ``batches`` (no copies)."""
    out = []
    for batch, k in batches:
        if n <= 0:
            break
        take = min(k, n)
        out.append((batch if take == k else batch[:batch.shape[0] // k * take], take))
        n -= take
    return out


class Learner(nn.Module):
    """Self-supervised pretraining of ``net`` in three lines.

    >>> learner = Learner(net, image_size=224, hidden_layer="avgpool", method="byol")
    >>> loss = learner(images); loss.backward(); opt.step()
    >>> learner.update_moving_average()

    Args:
        net: any vision network taking (B, channels, H, W) images. It is trained in place.
        image_size: side of the square views (the crops resize to it).
        hidden_layer: a dotted name from ``net.named_modules()``, an int index into
            ``net.children()`` (negative allowed, ``-1`` = the net's own output) or a
            callable ``f(net, x) -> features``. The net stops computing after it.
        method: a registered method name (see ``wrapssl.available_methods()``) or a
            ``Method`` instance. Extra keyword arguments go to the method.
        pooling: how hidden outputs become vectors: ``"mean"`` (feature maps over space,
            tokens over tokens), ``"cls"`` (first token), ``"none"`` (flatten).
        channels: the channel count the net takes; 1-channel images are repeated to it.
        augment_fn, augment_fn2: replace the default views with callables on float
            images in [0,1] (``augment_fn2`` defaults to ``augment_fn``).
        views: a full ``Views`` recipe (overrides augment_fn and the method's default).
        crop_scale: (min, max) area fractions of the default views' global random crops
            (default: the method's, mostly (0.08, 1.0)); raise the minimum for small images.
            Local crops of multi-crop methods keep their own range.
        normalize: (mean, std) applied after augmentation and in ``embed``; None to skip.
        moving_average_decay: EMA momentum at step 0 (default: the method's published one).
        total_steps: when given, momentum follows a cosine from ``moving_average_decay`` to 1.0.
        compile: ``torch.compile`` the online and target encoders (the user's net object stays
            as it is); a dict is passed to ``torch.compile`` as options (e.g. ``{"mode":
            "max-autotune"}``). The first steps are slow while it compiles; it pays off when the
            encoder traces as one graph (see benchmarks/RESULTS.md for where it helps and where not).
        channels_last: give the net its images in ``torch.channels_last`` memory format (the
            same values, laid out channel-minor), which convolutions run faster on. ``None``
            (automatic): for nets with ``Conv2d`` layers, on the CPU and under CUDA autocast
            (bf16/fp16), unless a first 2-image probe shows the net cannot take it (e.g. it
            calls ``.view`` on a feature map); then images stay contiguous. ``True``: always;
            ``False``: never. The net's own weights are not converted.
    """

    def __init__(self, net: nn.Module, image_size: int, hidden_layer: LayerSpec = -2,
                 method: str | Method = "byol", *, pooling: str = "mean", channels: int = 3,
                 augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 views: Views | None = None, crop_scale: tuple[float, float] | None = None,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
                 moving_average_decay: float | None = None, total_steps: int | None = None,
                 compile: bool | dict = False, channels_last: bool | None = None, **method_kwargs):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int (the side of the square views), got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True/False or a dict of torch.compile options, got {compile!r}")
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be None (automatic), True or False, got {channels_last!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be a positive number of optimiser steps, got {total_steps}")
        if views is not None and augment_fn is not None:
            raise ValueError("pass either views or augment_fn/augment_fn2, not both")
        if crop_scale is not None and (views is not None or augment_fn is not None):
            raise ValueError("crop_scale sets the crops of the method's default views; with your own views or "
                             "augment_fn set the scale there, e.g. views=byol_views(image_size, scale=(0.25, 1.0))")
        self.image_size, self.channels, self.total_steps = image_size, channels, total_steps
        self.step = 0  # optimiser steps taken, advanced by update_moving_average()
        self.channels_last = channels_last
        # automatic channels_last is for convolutional nets only, and only once the net is seen to accept it
        self._convolutional = any(isinstance(m, nn.Conv2d) for m in net.modules())
        self._accepts_channels_last: bool | None = None

        self.method = get_method(method, **method_kwargs)
        self.momentum = self.method.momentum if moving_average_decay is None else float(moving_average_decay)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"moving_average_decay must lie in [0, 1], got {self.momentum}")

        # the target's copy of the net is taken before our hook is attached to the net
        target_net = make_target(net) if self.method.uses_target else None
        self.encoder = Encoder(net, hidden_layer, pooling)
        try:
            self.feature_dim = _feature_dim(self.encoder, channels, image_size)
            self.method.build(self.feature_dim)

            if views is None:
                views = (Views([augment_fn, augment_fn2 or augment_fn]) if augment_fn is not None
                         else self.method.default_views(image_size, channels))
            if crop_scale is not None:
                set_crop_scale(views, crop_scale)  # global views only
            self.views = views
            self.normalize = normalization(channels, normalize)

            # The EMA target: encoder + projector, created here once and visibly.
            self.target_encoder: Encoder | None = None
            self.target_projector: nn.Module | None = None
            self._ema: EMA | None = None
            if target_net is not None:
                self.target_encoder = Encoder(target_net, hidden_layer, pooling)
                self.target_projector = make_target(self.method.projector)
                self._ema = EMA(nn.ModuleList([net, self.method.projector]),
                                nn.ModuleList([target_net, self.target_projector]))
            if compile:  # in place on our Encoder wrappers: state_dict keys and the user's net are unchanged
                options = compile if isinstance(compile, dict) else {}
                for encoder in (self.encoder, self.target_encoder):
                    if encoder is not None:
                        encoder.compile(**options)
        except BaseException:
            self.encoder.close()  # a failed constructor leaves the user's net unhooked
            raise

    @property
    def _grey_views(self) -> bool:
        """True if grey input for a 3-channel net can go through the views at one channel.

        wrapssl's own ops all take grey images (as torchvision's do), so a recipe made only of
        them gives the same views at one channel, repeated afterwards, for a third of the work.
        """
        return self.channels != 1 and all(
            isinstance(m, (RandomOp, nn.Sequential, nn.ModuleList, Views)) for m in self.views.modules())

    @property
    def net(self) -> nn.Module:
        """The user's network (trained in place)."""
        return self.encoder.net

    @property
    def current_momentum(self) -> float:
        """The EMA momentum the next ``update_moving_average()`` will use."""
        return cosine_momentum(self.momentum, self.step, self.total_steps)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Checked, resized, normalised images for an embedding (no augmentation)."""
        return self._memory_format(self.normalize(resize(to_float(images, self.channels), self.image_size)))

    def _memory_format(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` in the memory format the net gets (see ``channels_last``)."""
        if batch.ndim != 4 or self.channels_last is False:
            return batch
        if self.channels_last is None:
            device = batch.device.type
            fast = device == "cpu" or (device == "cuda" and torch.is_autocast_enabled("cuda"))
            if not self._convolutional or not fast:
                return batch
            if self._accepts_channels_last is None:
                self._accepts_channels_last = self._probe_channels_last(batch)
            if not self._accepts_channels_last:
                return batch
        return batch.contiguous(memory_format=torch.channels_last)

    def _probe_channels_last(self, batch: torch.Tensor) -> bool:
        """Whether the encoder runs on channels_last images: one uncompiled no-grad pass over 2 images
        in eval mode (no batch-norm statistics move). False also when it fails for another reason:
        the real pass then reports that error."""
        probe = batch[:2].contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad(), _eval_mode(self.encoder):
                Encoder.forward(self.encoder, probe)  # not through __call__: a compiled encoder stays uncompiled
        except RuntimeError:
            return False
        return True

    def _encode(self, encoder: Encoder, projector: nn.Module,
                batches: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Projections of each view, one forward pass per batch of same-sized views."""
        out: list[torch.Tensor] = []
        for batch, n in batches:
            try:
                h = encoder(batch)
            except RuntimeError as e:
                hint = ("; a net that reshapes feature maps with .view() needs contiguous images: pass "
                        "channels_last=False" if not batch.is_contiguous() else "")
                raise RuntimeError(f"{type(encoder.net).__name__} failed on views of shape {tuple(batch.shape)}: "
                                   f"{e}\nCheck that the net takes {self.channels}-channel images of size "
                                   f"{batch.shape[-1]} (Learner's channels= and image_size=){hint}") from e
            out.extend(projector(h).chunk(n))
        return out

    def forward(self, images: torch.Tensor, return_embedding: bool = False,
                return_projection: bool = True):
        """The loss for a batch of images; with ``return_embedding``, ``(projection, embedding)``."""
        if return_embedding:
            emb = self.encoder(self._prepare(images))
            return (self.method.projector(emb), emb) if return_projection else emb
        grey = self._grey_views and isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 1
        x = to_float(images, 1 if grey else self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(f"training needs a batch of at least 2 images (batch norm and the losses "
                             f"compare samples), got {x.shape[0]}; increase batch_size or use drop_last=True")
        with torch.autocast(x.device.type, enabled=False):  # augment in float32 under mixed precision too
            views = self.views(x)
            if grey:
                views = [v.expand(-1, self.channels, -1, -1) for v in views]
            batches = _same_size_batches([self.normalize(v) for v in views])
        batches = [(self._memory_format(b), n) for b, n in batches]  # outside: it reads the autocast state
        del x, views  # from here on only the batched views are kept: less memory while the net runs
        self.method.begin_step(self.step)
        target = None
        if self.target_encoder is not None:  # first, so its transient activations are freed before the
            with torch.no_grad():            # online pass builds its graph: a lower memory peak
                target = self._encode(self.target_encoder, self.target_projector,
                                      _first_views(batches, self.views.n_global))
        online = self._encode(self.encoder, self.method.projector, batches)
        return self.method(online, target, step=self.step)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation (B, D) of un-augmented images; no gradient, BN statistics untouched."""
        with _eval_mode(self.encoder):
            return self.encoder(self._prepare(images))

    def update_moving_average(self) -> None:
        """One EMA step of the target (a no-op for methods without one); advances the step count."""
        if self._ema is not None:
            self._ema.update(self.current_momentum)
        self.step += 1

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        """Remove every hook; ``net(x)`` then behaves exactly as before wrapping."""
        self.encoder.close()
        if self.target_encoder is not None:
            self.target_encoder.close()

    def __enter__(self) -> "Learner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
