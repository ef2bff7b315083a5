"""What a run of the training app trains on and is judged by: the pretraining set, the kNN memory and queries.

From --data: a built-in set (its recipe's pretraining split; kNN memory from "train", queries from "test"), a
folder (one image in five a query when it has class subfolders) or tar shards (their first labelled samples).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset, Subset

from . import recipes
from .data import dataset_name, load_dataset
from .data.shard_files import is_shard_spec
from .data.shards import TarShards

# kNN sets read from tar shards by default: the first samples in shard order (a stream has no random access)
SHARD_KNN = (10_000, 2_500)


@dataclass
class RunData:
    """What a run trains on and is judged by: kNN memory and queries are None without labels."""

    train: Dataset
    memory: Dataset | None
    queries: Dataset | None
    classes: list[str]
    channels: int = 3  # of the images, as the data holds them


def data_name(spec: str) -> str:
    """A short name for the data: the built-in's name or the folder's (for tar shards, their folder's)."""
    if is_shard_spec(spec):
        return Path(spec.split(",")[0]).expanduser().resolve().parent.name or "shards"
    return dataset_name(spec) or Path(spec).expanduser().resolve().name or "data"


def _cap(ds: Dataset, n: int | None) -> Dataset:
    """The first n items of ds (all when n is None)."""
    return ds if n is None or n >= len(ds) else Subset(ds, range(n))


def load_data(args: argparse.Namespace) -> RunData:
    """The pretraining set and the labelled kNN memory and queries, from --data; missing files exit with advice."""
    name = dataset_name(args.data)
    try:
        if name is not None:
            def split(which: str) -> Dataset:
                return load_dataset(name, args.image_size, root=args.data_root, split=which)
            labelled = split("train")
            pretrain = recipes.pretrain_split(name)
            train = labelled if pretrain == "train" else split(pretrain)
            return RunData(train, _cap(labelled, args.knn_train), _cap(split("test"), args.knn_test),
                           list(labelled.classes), _channels(train))
        folder = load_dataset(args.data, args.image_size, max_pixels=args.max_pixels or None)
        if isinstance(folder, TarShards):
            return _shard_data(folder, args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from None
    if not folder.classes:
        print(f"note: {args.data} has no labels (no class subfolders); training without the kNN report")
        return RunData(folder, None, None, [], _channels(folder))
    # one image in five is a kNN query; pretraining sees every image (labels are never used for it)
    queries = [i for i in range(len(folder)) if i % 5 == 0 and folder.labels[i] >= 0]
    memory = [i for i in range(len(folder)) if i % 5 != 0 and folder.labels[i] >= 0]
    return RunData(folder, Subset(folder, memory[:args.knn_train]), _cap(Subset(folder, queries), args.knn_test),
                   list(folder.classes), _channels(folder))


def _shard_data(shards: TarShards, args: argparse.Namespace) -> RunData:
    """Tar shards to pretrain on; kNN memory and queries are their first labelled samples (.cls) in shard order,
    one in five a query, 10,000 and 2,500 at most unless --knn-train and --knn-test say otherwise."""
    memory_n, query_n = args.knn_train or SHARD_KNN[0], args.knn_test or SHARD_KNN[1]
    head = shards.head(memory_n + query_n)
    labelled = [i for i, y in enumerate(head.labels) if y >= 0]
    if not labelled:
        print(f"note: the first samples of {args.data} have no labels (.cls members); training without the kNN "
              "report")
        return RunData(shards, None, None, [], shards.channels)
    classes = list(shards.classes) or [str(c) for c in range(max(head.labels[i] for i in labelled) + 1)]
    queries = [i for k, i in enumerate(labelled) if k % 5 == 0][:query_n]
    memory = [i for k, i in enumerate(labelled) if k % 5 != 0][:memory_n]
    print(f"kNN report: memory and queries are the first {len(memory)} and {len(queries)} labelled samples of the "
          "shards (--knn-train, --knn-test)")
    return RunData(shards, Subset(head, memory), Subset(head, queries), classes, shards.channels)


def _channels(ds: Dataset) -> int:
    """The channel count of the data set's images (a folder says it; otherwise its first image does)."""
    return int(getattr(ds, "channels", None) or ds[0][0].shape[0])
