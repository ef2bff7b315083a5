"""Learner: wraps a user's net into a self-supervised objective. Knows no method by name."""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .augment import IMAGENET_MEAN, IMAGENET_STD, Views, normalization, runs_on_grey, set_crop_scale, to_float
from .backbone import Embedder
from .checks import positive_int
from .ema import EMA, cosine_momentum, make_target
from .encoder import Encoder, LayerSpec
from .methods import Method, get_method
from .methods.base import NEEDS, EncoderSpec
from .nnutil import input_channels, warn_if_frozen
from .prelogits import find_pre_logits
from .teacher import Teacher, build_teacher
from .vit import vit_tokens


FLOAT_INPUTS = ("unit", "standardized", "auto")


def standardized_to_unit(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                         only_outside_unit: bool = False) -> torch.Tensor:
    """Float images standardised with (mean, std) mapped back to [0, 1]: ``x·std + mean``, clamped.

    With ``only_outside_unit``, a batch already inside [0, 1] is taken as plain images and
    returned as it is (one host sync); a batch outside it is taken as standardised.
    """
    if only_outside_unit:
        lo, hi = torch.aminmax(images.detach())
        if lo >= 0 and hi <= 1:
            return images
    return torch.addcmul(mean, images, std).clamp_(0.0, 1.0)


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

    >>> learner = Learner(net, image_size=224, method="byol")
    >>> loss = learner(images); loss.backward(); opt.step()
    >>> learner.update_moving_average()

    Args:
        net: any vision network taking (B, C, H, W) images. It is trained in place.
        image_size: side of the square views (the crops resize to it).
        hidden_layer: where the representation is taken. ``None`` (default): the net's own
            pre-logits, the input of its final classifier (a Linear, or a 1x1 convolution),
            taken by a hook; the classifier and any dropout right before it never run. timm
            nets: ``forward_head(forward_features(x), pre_logits=True)``. A net without a
            classifier: its output. Otherwise a dotted name from ``net.named_modules()`` (its
            output), an int index into ``net.children()`` (negative allowed, ``-1`` = the net's
            own output) or a callable ``f(net, x) -> features``. The net stops computing after
            it. ``learner.hidden_layer`` shows what was chosen.
        method: a registered method name (see ``wrapssl.available_methods()``) or a
            ``Method`` instance. Extra keyword arguments go to the method.
        pooling: how hidden outputs become vectors: ``"mean"`` (feature maps over space,
            tokens over tokens), ``"cls"`` (first token), ``"none"`` (flatten).
        channels: the channel count the net takes; default: read from its first convolution
            (a patch embedding is one). Any count works; grey images are repeated for RGB nets.
        augment_fn, augment_fn2: replace the default views with callables on float
            images in [0,1] (``augment_fn2`` defaults to ``augment_fn``).
        views: a full ``Views`` recipe (overrides augment_fn and the method's default).
        crop_scale: (min, max) area fractions of the default views' global random crops
            (default: the method's, mostly (0.08, 1.0)); raise the minimum for small images.
            Local crops of multi-crop methods keep their own range.
        normalize: (mean, std) applied after augmentation and in ``embed``, one value per
            channel; None to skip. ImageNet's by default, which serves RGB and (averaged) grey
            nets; other channel counts need their own, e.g. from
            ``wrapssl.augment.estimate_normalization(images)``.
        float_input: how float images are read. ``"unit"`` (default): they must lie in [0, 1]
            (an error otherwise). ``"standardized"``: they are ``(x - mean) / std`` with the
            ``normalize`` statistics, mapped back to [0, 1] (``x * std + mean``, clamped) before
            the views. ``"auto"``: a batch inside [0, 1] is read as ``"unit"``, any other as
            ``"standardized"`` (what ``wrapssl.BYOL`` does, for byol-pytorch code that feeds
            ``torch.randn`` or normalised images). uint8 images are always 0-255.
        feature_layout: "NCHW" or "NHWC" for 4-D hidden outputs; default: found from their shape
            (timm's Swin gives (B, H, W, C)); an error asks for it when the shape cannot tell.
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

    def __init__(self, net: nn.Module, image_size: int, hidden_layer: LayerSpec | None = None,
                 method: str | Method = "byol", *, pooling: str = "mean", channels: int | None = None,
                 augment_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 augment_fn2: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 views: Views | None = None, crop_scale: tuple[float, float] | None = None,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = (IMAGENET_MEAN, IMAGENET_STD),
                 float_input: str = "unit", feature_layout: str | None = None,
                 moving_average_decay: float | None = None, total_steps: int | None = None,
                 compile: bool | dict = False, channels_last: bool | None = None, **method_kwargs):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        positive_int(image_size, "image_size (the side of the square views)")
        channels = input_channels(net) if channels is None else positive_int(channels, "channels")
        if float_input not in FLOAT_INPUTS:
            raise ValueError(f"float_input must be one of {FLOAT_INPUTS}, got {float_input!r}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True/False or a dict of torch.compile options, got {compile!r}")
        positive_int(total_steps, "total_steps (optimiser steps)", allow_none=True)
        if views is not None and augment_fn is not None:
            raise ValueError("pass either views or augment_fn/augment_fn2, not both")
        if crop_scale is not None and (views is not None or augment_fn is not None):
            raise ValueError("crop_scale sets the crops of the method's default views; with your own views or "
                             "augment_fn set the scale there, e.g. views=byol_views(image_size, scale=(0.25, 1.0))")
        self.image_size, self.channels, self.total_steps = image_size, channels, total_steps
        self.float_input = float_input
        self.normalize = normalization(channels, normalize)
        self.step = 0  # optimiser steps taken, advanced by update_moving_average()
        self._mode_checked = False  # the first training forward warns about a net left in eval mode

        self.method = get_method(method, **method_kwargs)
        self.momentum = self.method.momentum if moving_average_decay is None else float(moving_average_decay)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"moving_average_decay must lie in [0, 1], got {self.momentum}")

        # the target's copy of the net is taken before our hook is attached to the net
        target_net = make_target(net) if self.method.uses_target else None
        self.hidden_layer = find_pre_logits(net, channels, image_size) if hidden_layer is None else hidden_layer
        self.encoder = Encoder(net, self.hidden_layer, pooling, feature_layout, channels_last)
        self.__dict__["teacher"] = None  # a frozen teacher, when the method needs one: never a submodule
        try:
            self.feature_dim = self.encoder.probe_width(channels, image_size)
            self.method.setup(self._serve(net))
            # the one way images become representations (embed, return_embedding, evaluation, health)
            self.__dict__["embedder"] = Embedder(self.encoder, normalize=self.normalize, channels=channels,
                                                 image_size=image_size, resize=True)

            if views is None:
                views = (Views([augment_fn, augment_fn2 or augment_fn]) if augment_fn is not None
                         else self.method.default_views(image_size, channels))
            if crop_scale is not None:
                set_crop_scale(views, crop_scale)  # global views only
            self.views = views

            # The EMA target: encoder + projector, created here once and visibly.
            self.target_encoder: Encoder | None = None
            self.target_projector: nn.Module | None = None
            self._ema: EMA | None = None
            if target_net is not None:
                self.target_encoder = Encoder(target_net, self.hidden_layer, pooling, self.encoder.layout, False)
                self.target_projector = make_target(self.method.projector)
                self._ema = EMA(nn.ModuleList([net, self.method.projector]),
                                nn.ModuleList([target_net, self.target_projector]))
            if compile:  # in place on our Encoder wrappers: state_dict keys and the user's net are unchanged
                options = compile if isinstance(compile, dict) else {}
                for encoder in (self.encoder, self.target_encoder):
                    if encoder is not None:
                        encoder.compile(**options)
        except BaseException:
            self.close()  # a failed constructor leaves the user's net (and a teacher) unhooked
            raise

    embedder: Embedder  # images → representations through the Learner's own hooked encoder (un-augmented)
    teacher: Teacher | None  # the frozen teacher the method asked for, if it did

    def _serve(self, net: nn.Module) -> EncoderSpec:
        """What the method declared in ``needs``, built here: token access to the user's ViT, a frozen teacher."""
        name = getattr(self.method, "name", type(self.method).__name__)
        needs = set(self.method.needs)
        if needs - set(NEEDS):
            raise ValueError(f"method {name!r} needs {sorted(needs - set(NEEDS))}, which the Learner cannot serve; "
                             f"it serves {', '.join(NEEDS)}")
        tokens = vit_tokens(net, self.image_size, name) if "tokens" in needs else None
        if "teacher" in needs:
            if self.method.teacher_request is None:
                raise ValueError(f"method {name!r} needs a teacher but sets no teacher_request")
            self.__dict__["teacher"] = build_teacher(self.method.teacher_request, self.channels, self.image_size,
                                                     net)
        return EncoderSpec(self.feature_dim, self.image_size, self.channels, tokens, self.teacher)

    @property
    def net(self) -> nn.Module:
        """The user's network (trained in place)."""
        return self.encoder.net

    @property
    def ema(self) -> EMA | None:
        """The EMA of the target network (None for methods without one)."""
        return self._ema

    @property
    def current_momentum(self) -> float:
        """The EMA momentum the next ``update_moving_average()`` will use."""
        return cosine_momentum(self.momentum, self.step, self.total_steps)

    def _unstandardize(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised float images mapped back to [0, 1] as ``float_input`` says; others as they are."""
        if self.float_input == "unit" or not isinstance(images, torch.Tensor) or not images.is_floating_point():
            return images
        return standardized_to_unit(images, self.normalize.mean, self.normalize.std,
                                    only_outside_unit=self.float_input == "auto")

    @staticmethod
    @contextlib.contextmanager
    def _naming_float_input(images: torch.Tensor) -> Iterator[None]:
        """Inside, an error for float images outside [0, 1] (``to_float``'s) also names ``float_input``."""
        try:
            yield
        except ValueError as e:
            if isinstance(images, torch.Tensor) and images.is_floating_point() and images.numel() \
                    and torch.isfinite(images).all() and not 0 <= images.min() <= images.max() <= 1:
                raise ValueError(f"{e}; for images standardised with the normalisation statistics, pass "
                                 "Learner(float_input='standardized')") from None
            raise

    def _run(self, encoder: Encoder, batch: torch.Tensor) -> torch.Tensor:
        """``encoder(batch)``; an error of the net is raised again with what the Learner gave it."""
        return encoder.run(batch, self.channels, "views", " (Learner's channels= and image_size=)")

    def _encode_online(self, batches: list[tuple[torch.Tensor, int]]) -> list:
        """The method's online output for each view (a tensor, or a tuple of them), one pass per batch of
        same-sized views."""
        out: list = []
        for batch, n in batches:
            result = self.method.online(partial(self._run, self.encoder), batch)
            out.extend(zip(*(r.chunk(n) for r in result)) if isinstance(result, tuple) else result.chunk(n))
        return out

    def _encode_target(self, batches: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """The EMA target's projections of each view, one pass per batch of same-sized views."""
        out: list[torch.Tensor] = []
        for batch, n in batches:
            out.extend(self.target_projector(self._run(self.target_encoder, batch)).chunk(n))
        return out

    def forward(self, images: torch.Tensor, return_embedding: bool = False,
                return_projection: bool = True):
        """The loss for a batch of images; with ``return_embedding``, ``(projection, embedding)``."""
        if return_embedding:
            images = self._unstandardize(images)
            with self._naming_float_input(images):
                emb = self.embedder.features(images)
            return (self.method.projector(emb), emb) if return_projection else emb
        if self.training and not self._mode_checked:
            self._mode_checked = True  # warned once at most
            warn_if_frozen(self.net, stacklevel=2)
        images = self._unstandardize(images)
        # grey images for a 3-channel net go through the views at one channel when the recipe allows it
        grey = (self.channels == 3 and isinstance(images, torch.Tensor) and images.ndim == 4
                and images.shape[1] == 1 and runs_on_grey(self.views))
        with self._naming_float_input(images):
            x = to_float(images, 1 if grey else self.channels)
        if self.training and x.shape[0] < 2:
            raise ValueError(f"training needs a batch of at least 2 images (batch norm and the losses "
                             f"compare samples), got {x.shape[0]}; increase batch_size or use drop_last=True")
        with torch.autocast(x.device.type, enabled=False):  # augment in float32 under mixed precision too
            views = self.views(x)
            if grey:
                views = [v.expand(-1, self.channels, -1, -1) for v in views]
            batches = _same_size_batches([self.normalize(v) for v in views])
        batches = [(self.encoder.input_format(b), n) for b, n in batches]  # outside: it reads the autocast state
        self.method.begin_step(self.step)
        with torch.no_grad():  # a teacher the method owns sees the views before normalisation
            target = self.method.targets(views[:self.views.n_global])
        del x, views  # from here on only the batched views are kept: less memory while the net runs
        if target is None and self.target_encoder is not None:  # first, so its transient activations are freed
            with torch.no_grad():                                # before the online pass builds its graph
                target = self._encode_target(_first_views(batches, self.views.n_global))
        online = self._encode_online(batches)
        return self.method(online, target, step=self.step)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation (B, D) of un-augmented images (``self.embedder``); no gradient, BN statistics
        untouched."""
        images = self._unstandardize(images)
        with self._naming_float_input(images):
            return self.embedder.embed(images)

    def update_moving_average(self, momentum: float | None = None) -> None:
        """One EMA step of the target at ``momentum`` (None: ``current_momentum``, the cosine schedule; a no-op
        for methods without a target); advances the step count by one."""
        if self._ema is not None:
            self._ema.update(self.current_momentum if momentum is None else momentum)
        self.step += 1

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        """Remove every hook; ``net(x)`` then behaves exactly as before wrapping."""
        self.encoder.close()
        if getattr(self, "target_encoder", None) is not None:
            self.target_encoder.close()
        if self.teacher is not None:
            self.teacher.close()
        self.method.close()

    def __enter__(self) -> "Learner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
