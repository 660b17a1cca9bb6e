"""Input shards: list them (:func:`list_shards`) and stream their samples (:func:`iter_shard`).

Readers never stop on bad input: a sample they cannot use becomes a :class:`Quarantined` record with a
reason, and damage that ends a shard early becomes one record keyed :data:`REST_OF_SHARD`.
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.config import InputConfig
from pipeline.sources.folder_reader import read_folder_shard
from pipeline.sources.listing import InputListing, dataset_root, list_input, list_shards
from pipeline.sources.parquet_reader import read_parquet_shard
from pipeline.sources.samples import (
    REST_OF_SHARD,
    Quarantined,
    RawSample,
    ShardRef,
    drop_duplicate_keys,
)
from pipeline.sources.tar_reader import read_tar_shard

__all__ = ["REST_OF_SHARD", "InputListing", "Quarantined", "RawSample", "ShardRef", "dataset_root", "iter_shard",
           "list_input", "list_shards"]

_READERS = {"webdataset": read_tar_shard, "parquet": read_parquet_shard, "folder": read_folder_shard}


def iter_shard(shard: ShardRef, cfg: InputConfig, storage_options: dict[str, Any]) -> Iterator[RawSample | Quarantined]:
    """The shard's samples in stored order, one in memory at a time; a key's first occurrence wins."""
    return drop_duplicate_keys(_READERS[shard.format](shard, cfg, storage_options))
