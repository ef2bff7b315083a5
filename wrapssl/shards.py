"""Temporary re-export; removed at integration. Tar shards live in wrapssl.data (shards, shard_files, shard_writer)."""
from .data.shard_files import INDEX_NAME, SHARD_SUFFIXES, ShardError, expand_braces, is_shard_spec, shard_paths  # noqa
from .data.shard_writer import reading_pattern, write_shards  # noqa: F401
from .data.shards import IMAGE_MEMBERS, TarShards  # noqa: F401
