"""Tar shards as a training dataset (TarShards): streamed, dealt to ranks and workers, shuffled, resumable.

Shards follow the WebDataset layout; each is read in order and its samples pass through a shuffle buffer.

The image of a sample is the member with an image extension (jpg, jpeg, png, webp, bmp); ``.cls`` holds
an integer label (kNN labels; -1 without one). The files, patterns and the tar reader: ``shard_files``.

Epochs have a known length (the samples per shard, from ``shards.json`` or the headers). Each epoch the
shards are shuffled (seed, epoch) and dealt to the readers, ``ranks x workers`` of
them, round robin; each reader streams its shards through a shuffle buffer of raw samples and yields
exactly ``per_reader`` samples, whole batches, cycling through its shards if it holds fewer. So every rank
gets the same number of batches, and an epoch is ``readers x per_reader`` samples: every sample once when
the shards hold equal counts and their number is a multiple of the readers, otherwise a few samples twice
and as many not at all in that epoch (the next epoch deals the shards anew).

Resume: from the (epoch, samples in epoch) of a checkpoint each reader knows how many samples it had yielded
(the DataLoader takes batches from its workers in turn) and restarts at that position of its shard list,
skipping the earlier members by their tar headers, with an empty buffer. Exact up to the buffer: at most
``shuffle_buffer`` samples per reader are seen again and as many are left out in the epoch of the
interruption; later epochs are the uninterrupted run's.
"""
from __future__ import annotations

import bisect
import io
import os
import random
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..checks import int_at_least
from .adapters import TensorImages
from .decode import MAX_PIXELS, _pair, _pil_limit_off, _pil_to_tensor, _source_channels
from .folders import UnreadableDataError, warn_once
from .shard_files import _READ_ERRORS, ShardError, _count, _counts, _tar_samples, _unreadable_shard, shard_paths


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp")
_CHANNEL_PEEK = 32  # samples whose headers decide grey or colour


def _image_member(members: dict[str, bytes]) -> str | None:
    """The extension of the sample's image member, if it has one."""
    return next((ext for ext in members if ext.rsplit(".", 1)[-1] in IMAGE_MEMBERS), None)


class TarShards(IterableDataset):
    """Samples of tar shards as (uint8 image (C, H, W), label) items, streamed (see the module docstring).

    ``image_size`` as for folders (None keeps the source size); ``channels`` None decides once (3 if any of
    the first 32 samples is colour, else 1). ``len()`` is the number of samples in all shards.
    ``shuffle_buffer``: raw samples each reader holds to shuffle (memory: that many encoded images per
    worker). Unreadable samples are skipped, counted in ``num_bad`` (shared by DataLoader workers) and
    listed by ``unreadable()`` with the reason; a shard that cannot be opened while training is listed whole.
    Indexing (``shards[i]``) reads sample i by scanning its shard's headers: meant for a few probe images,
    not for training.
    """

    def __init__(self, spec: str | os.PathLike | Sequence[str | os.PathLike],
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 shuffle_buffer: int = 1000, max_pixels: int | None = MAX_PIXELS) -> None:
        shuffle_buffer = int_at_least(shuffle_buffer, "shuffle_buffer", 1, what="an int >= 1 (1: no shuffling)")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
        self.paths = shard_paths(spec)
        self.spec = spec
        self.image_size, self.max_pixels, self.shuffle_buffer = _pair(image_size), max_pixels, shuffle_buffer
        self.counts, self.classes = _counts(self.paths)
        self.offsets = [0]
        for n in self.counts:
            self.offsets.append(self.offsets[-1] + n)
        if self.offsets[-1] == 0:
            raise ShardError(f"the {len(self.paths)} shard(s) of {os.fspath(spec)!r} hold no samples")
        self.channels = channels or self._peek_channels()
        # shared memory: the loop's position reaches persistent workers; bad samples found in workers count here
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._bad = torch.zeros(self.offsets[-1], dtype=torch.bool).share_memory_()
        self._bad_shards = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        self._warned = torch.zeros(1, dtype=torch.bool).share_memory_()
        self.num_processes, self.process_index, self.batch_size, self.num_workers, self.seed = 1, 0, 1, 0, 0

    # ------------------------------------------------------------------ setup

    def _peek_channels(self) -> int:
        """3 if any of the first samples is a colour image, else 1; ShardError if the first has no image."""
        try:
            for i, (_, key, members) in enumerate(_tar_samples(self.paths[0])):
                if i >= _CHANNEL_PEEK:
                    break
                ext = _image_member(members)
                if ext is None:
                    if i == 0:
                        raise ShardError(
                            f"sample {key!r} of {os.fspath(self.paths[0])} has no image member (found "
                            f"{', '.join('.' + e for e in members) or 'none'}; expected one of "
                            f"{', '.join('.' + e for e in IMAGE_MEMBERS)}); write the shards with `wrapssl shards`")
                    continue
                try:
                    with _pil_limit_off(), Image.open(io.BytesIO(members[ext])) as image:
                        if _source_channels(image) == 3:
                            return 3
                except Exception:  # unreadable samples are dealt with (and reported) when read
                    continue
        except _READ_ERRORS as e:
            raise _unreadable_shard(self.paths[0], e) from None
        return 1

    def plan(self, num_processes: int, process_index: int, batch_size: int, num_workers: int, seed: int) -> None:
        """Tell the stream how it is read: processes, this one's rank, batch per process, workers, seed."""
        readers = num_processes * max(1, num_workers)
        if readers > len(self.paths):
            raise ValueError(f"{len(self.paths)} shard(s) cannot feed {readers} readers ({num_processes} "
                             f"process(es) x {max(1, num_workers)} DataLoader worker(s)): each reader streams its own "
                             "shards. Write more, smaller shards (wrapssl shards --per-shard) or lower num_workers")
        self.num_processes, self.process_index, self.batch_size = num_processes, process_index, batch_size
        self.num_workers, self.seed = num_workers, seed
        if self.per_reader() < 1:
            raise ValueError(f"the shards hold {len(self)} samples, fewer than one batch of {batch_size} for each "
                             f"of the {readers} readers (processes x workers); lower batch_size or num_workers")

    def position(self, epoch: int, skip: int) -> None:
        """Start the next iteration at global sample ``skip`` of epoch ``epoch`` (the Trainer's counters)."""
        self._position[0], self._position[1] = int(epoch), int(skip)

    def per_reader(self) -> int:
        """Samples each reader yields per epoch (as planned): its share of all samples in whole batches."""
        readers = self.num_processes * max(1, self.num_workers)
        return len(self) // readers // self.batch_size * self.batch_size

    def __len__(self) -> int:
        return self.offsets[-1]

    # ------------------------------------------------------------------ streaming

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = int(self._position[0]), int(self._position[1])
        # batches this rank had taken; the DataLoader takes them from its workers in turn, worker 0 first
        taken = skip // (self.batch_size * self.num_processes)
        done = -(-(taken - worker) // workers) * self.batch_size if taken > worker else 0
        return self._stream(epoch, self.process_index * workers + worker, self.num_processes * workers, done)

    def _stream(self, epoch: int, reader: int, readers: int, done: int) -> Iterator[tuple[torch.Tensor, int]]:
        """The ``reader``'s samples of ``epoch`` after the first ``done``: passes over its shards, each shuffled
        through the buffer and drained at its end (so a pass never mixes with the next)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        mine = torch.randperm(len(self.paths), generator=g)[reader::readers].tolist()
        if not mine:
            raise ValueError(f"{len(self.paths)} shard(s) cannot feed {readers} readers (processes x DataLoader "
                             "workers): each reader streams its own shards; write more shards or use fewer workers")
        rng = random.Random(f"{self.seed}/{epoch}/{reader}")
        left = len(self) // readers // self.batch_size * self.batch_size - done
        start = done % max(1, sum(self.counts[s] for s in mine))
        while left > 0:
            good, read = 0, [0]
            for index, members in self._shuffled(self._pass(mine, start), rng, read):
                item = self._decode_or_mark(index, members)
                if item is not None:
                    good, left = good + 1, left - 1
                    yield item
                    if left == 0:
                        return
            if good == 0:
                what = "could be read" if read[0] else "could be opened"
                raise UnreadableDataError(f"no sample of the shards {', '.join(self.paths[s].name for s in mine)} "
                                          f"{what}; dataset.unreadable() says why")
            start = 0

    def _shuffled(self, entries: Iterator[tuple[int, dict[str, bytes]]], rng: random.Random, read: list[int]
                  ) -> Iterator[tuple[int, dict[str, bytes]]]:
        """``entries`` through a shuffle buffer: once full, each new entry lets out a random one; then it drains.
        ``read[0]`` counts the entries taken in."""
        buffer: list[tuple[int, dict[str, bytes]]] = []
        for entry in entries:
            buffer.append(entry)
            read[0] += 1
            if len(buffer) >= self.shuffle_buffer:
                yield self._pop_random(buffer, rng)
        while buffer:
            yield self._pop_random(buffer, rng)

    @staticmethod
    def _pop_random(buffer: list[tuple[int, dict[str, bytes]]], rng: random.Random) -> tuple[int, dict[str, bytes]]:
        """Remove and return a random entry of ``buffer`` (swapped to the end first: O(1))."""
        i = rng.randrange(len(buffer))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        return buffer.pop()

    def _pass(self, mine: list[int], start: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(global index, members) of the samples of the shards ``mine`` in order, from their sample ``start``."""
        for s in mine:
            if start >= self.counts[s]:
                start -= self.counts[s]
                continue
            yield from self._shard_samples(s, start)
            start = 0

    def _shard_samples(self, s: int, start: int) -> Iterator[tuple[int, dict[str, bytes]]]:
        """(global index, members) of shard ``s`` from its sample ``start``; a shard that fails is marked bad."""
        path, base = self.paths[s], self.offsets[s]
        try:
            for j, _, members in _tar_samples(path, start):
                if j >= self.counts[s]:
                    break  # the shard grew since it was counted: stay within the epoch's plan
                yield base + j, members
        except _READ_ERRORS as e:
            self._bad_shards[s] = True
            self._warn(f"shard {path.name} ({type(e).__name__}: {e})")

    def _decode_or_mark(self, index: int, members: dict[str, bytes]) -> tuple[torch.Tensor, int] | None:
        """The decoded sample, or None after marking it unreadable."""
        try:
            return self._decode(members)
        except Exception as e:  # any decoder failure: one bad sample must not end a long run
            self._bad[index] = True
            self._warn(f"{self.name(index)} ({type(e).__name__}: {e})")
            return None

    def _decode(self, members: dict[str, bytes]) -> tuple[torch.Tensor, int]:
        """(uint8 image, label) of one sample's members."""
        ext = _image_member(members)
        if ext is None:
            raise KeyError(f"no image member (found {', '.join('.' + e for e in members) or 'none'})")
        with _pil_limit_off(), Image.open(io.BytesIO(members[ext])) as image:
            pixels = image.width * image.height
            if self.max_pixels is not None and pixels > self.max_pixels:
                raise ValueError(f"{image.width}x{image.height} = {pixels:,} pixels, above the limit of "
                                 f"{self.max_pixels:,}; raise it with max_pixels= (wrapssl train --max-pixels)")
            tensor = _pil_to_tensor(image, self.channels, self.image_size)
        label = -1
        if "cls" in members:
            text = members["cls"].decode("utf-8", "replace").strip()
            label = int(text) if text.lstrip("-").isdigit() else -1
        return tensor, label

    def _warn(self, what: str) -> None:
        """Warn about the first unreadable sample or shard, in whichever process finds it."""
        warn_once(self._warned, f"unreadable data in the shards of {os.fspath(self.spec)!r}, e.g. {what}; it is "
                  "skipped. This warning is shown once; dataset.num_bad and dataset.unreadable() list them all.")

    # ------------------------------------------------------------------ random access, probes, reports

    def _locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within it) of global sample ``index``."""
        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def name(self, index: int) -> str:
        """'shard.tar/key' of global sample ``index`` (its number when the key cannot be read)."""
        s, j = self._locate(index)
        try:
            for _, key, _ in _tar_samples(self.paths[s], j, read=False):
                return f"{self.paths[s].name}/{key}"
        except _READ_ERRORS:
            pass
        return f"{self.paths[s].name}#{j}"

    def _members(self, index: int) -> dict[str, bytes]:
        """The members of global sample ``index``, read by scanning its shard's headers."""
        s, j = self._locate(index)
        for _, _, members in _tar_samples(self.paths[s], j):
            return members
        raise IndexError(f"{self.paths[s].name} holds fewer than {j + 1} samples (it changed since it was counted)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        error: Exception | None = None
        for i in range(index, index + min(n, 1000)):
            i %= n
            if self._bad[i]:
                continue
            try:
                return self._decode(self._members(i))
            except Exception as e:
                error = e
                self._bad[i] = True
        raise UnreadableDataError(f"no readable sample near {index} in {os.fspath(self.spec)!r}; last error: "
                                  f"{type(error).__name__}: {error}")

    def head(self, n: int) -> TensorImages:
        """The first ``n`` readable samples in shard order, decoded, as an in-memory dataset (probes, kNN sets)."""
        images, labels, names = [], [], []
        for s in range(len(self.paths)):
            for index, members in self._shard_samples(s, 0):
                item = self._decode_or_mark(index, members)
                if item is not None:
                    images.append(item[0])
                    labels.append(item[1])
                    names.append(self.paths[s].name + f"#{index - self.offsets[s]}")
                if len(images) >= n:
                    break
            if len(images) >= n:
                break
        if not images:
            raise UnreadableDataError(f"no sample of {os.fspath(self.spec)!r} could be read")
        out = TensorImages(torch.stack(images), labels)
        out.files, out.classes = names, list(self.classes)
        return out

    @property
    def num_bad(self) -> int:
        """Unreadable samples found so far (in any worker); a failed shard counts its samples."""
        return int(self._bad.sum()) + sum(self.counts[s] for s in self._bad_shards.nonzero().flatten().tolist())

    def unreadable(self) -> dict[str, str]:
        """{'shard.tar/key' or 'shard.tar': why} for what could not be read so far (read again here to say why)."""
        reasons = {}
        for s in self._bad_shards.nonzero().flatten().tolist():
            try:
                _count(self.paths[s])
                reasons[self.paths[s].name] = "read now, failed while training (file changed?)"
            except ShardError as e:
                reasons[self.paths[s].name] = str(e)
        for index in self._bad.nonzero().flatten().tolist():
            try:
                self._decode(self._members(index))
                why = "read now, failed while training (file changed?)"
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            reasons[self.name(index)] = why
        return reasons
