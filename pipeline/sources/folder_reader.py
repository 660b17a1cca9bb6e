"""Folder shards: each image file is a sample keyed by its path without suffix; same-key .txt/.json are sidecars."""

from __future__ import annotations

import itertools
import posixpath
from typing import Any, Iterator

from fsspec import AbstractFileSystem

from pipeline.config import InputConfig
from pipeline.sources.samples import (
    Oversized,
    Quarantined,
    RawSample,
    ShardRef,
    sample_from_members,
)
from pipeline.storage import filesystem_for

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
SIDECAR_EXTENSIONS = ("txt", "json")


def split_member(name: str) -> tuple[str, str]:
    """(key, lower-case extension) of a member path relative to the folder."""
    key, _, ext = name.rpartition(".")
    return key, ext.lower()


def read_folder_shard(
    shard: ShardRef, cfg: InputConfig, storage_options: dict[str, Any]
) -> Iterator[RawSample | Quarantined]:
    fs, root = filesystem_for(shard.url, storage_options)
    for key, names in itertools.groupby(shard.members, key=lambda name: split_member(name)[0]):
        names = list(names)
        images = [name for name in names if split_member(name)[1] in IMAGE_EXTENSIONS]
        files = [name for name in names if name not in images[1:]]
        try:
            members = {
                split_member(name)[1]: _read(fs, posixpath.join(root, name), cfg.max_member_bytes) for name in files
            }
        except FileNotFoundError as exc:
            yield Quarantined(key, shard.shard_id, f"missing file: removed after listing ({exc})")
        else:
            yield sample_from_members(shard.shard_id, key, members, IMAGE_EXTENSIONS, cfg.max_member_bytes)
        for _ in images[1:]:
            yield Quarantined(key, shard.shard_id, "duplicate key")


def _read(fs: AbstractFileSystem, path: str, max_bytes: int) -> bytes | Oversized:
    data = fs.cat_file(path, start=0, end=max_bytes + 1)  # one ranged GET on object stores
    return Oversized(fs.size(path)) if len(data) > max_bytes else data
