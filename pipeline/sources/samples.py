"""What readers produce: shard references, raw samples, quarantine records, and the rules they share."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

ShardFormat = Literal["webdataset", "parquet", "folder"]

# The key of a Quarantined record that stands for every sample of the shard from the damage on.
REST_OF_SHARD = "*"

# The image file extensions every reader accepts (tar members, Parquet ``input.image_column`` choices, folder
# files), in the order a sample holding several picks its image by; sources/decode.py decodes them all.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

# Members passed through as metadata text (the last suffix of a compound extension such as "seg.json").
TEXT_SUFFIXES = frozenset({"txt", "text", "caption", "json", "jsn", "cls", "cls2", "id", "index", "inx"})


@dataclass(frozen=True)
class ShardRef:
    """One unit of work. Folder shards: ``url`` is the folder and ``members`` the files relative to it;
    ``problems`` pairs the members the listing found unusable (never to be opened) with the reason."""

    shard_id: str
    url: str
    fingerprint: str
    size: int
    format: ShardFormat
    members: tuple[str, ...] = ()
    problems: tuple[tuple[str, str], ...] = ()


@dataclass
class RawSample:
    key: str
    shard_id: str
    image: bytes | None
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class Quarantined:
    """A sample that cannot be used, or with key :data:`REST_OF_SHARD` a run of them; ``samples`` is how many
    it stands for, None where a damaged shard hides how many followed (counted as one)."""

    key: str
    shard_id: str
    reason: str
    samples: int | None = 1


@dataclass(frozen=True)
class Oversized:
    """Stands in for a member's bytes when the member was too large to read."""

    size: int


def _printable(key: str) -> str:
    """``key`` with undecodable bytes (surrogate escapes from file names) made visible and encodable."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def sample_from_members(
    shard_id: str, key: str, members: dict[str, bytes | Oversized], image_exts: tuple[str, ...], max_bytes: int
) -> RawSample | Quarantined:
    """One sample from its files keyed by lower-case extension (a WebDataset group, or a file and its sidecars)."""
    if _printable(key) != key:
        return Quarantined(_printable(key), shard_id, "invalid key: not UTF-8")
    for ext, data in members.items():
        if isinstance(data, Oversized):
            return Quarantined(key, shard_id, f"too large: {key}.{ext} is {data.size} bytes > {max_bytes}")
    image_ext = next((ext for ext in image_exts if ext in members), None)
    if image_ext is None:
        found = ", ".join(f"{key}.{ext}" for ext in sorted(members)) or "no member"
        return Quarantined(key, shard_id, f"missing image member: no {'/'.join(image_exts)} among {found}")
    image = members[image_ext]
    if not image:
        return Quarantined(key, shard_id, f"empty: zero-byte member {key}.{image_ext}")
    text = {
        ext: data.decode("utf-8", "replace")
        for ext, data in members.items()
        if ext.rsplit(".", 1)[-1] in TEXT_SUFFIXES
    }
    return RawSample(key, shard_id, image, with_caption(text))


def with_caption(meta: dict[str, str]) -> dict[str, str]:
    """Adds ``caption`` from a ``txt`` member, else from the ``caption`` field of a ``json`` member."""
    if "caption" in meta:
        return meta
    caption = meta.get("txt")
    if caption is None and "json" in meta:
        try:
            record = json.loads(meta["json"])
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict) and isinstance(record.get("caption"), str):
            caption = record["caption"]
    return meta if caption is None else {**meta, "caption": caption}


def drop_duplicate_keys(items: Iterable[RawSample | Quarantined]) -> Iterator[RawSample | Quarantined]:
    """The first occurrence of a key in a shard wins; later ones are quarantined."""
    seen: set[str] = set()
    for item in items:
        if item.key != REST_OF_SHARD:
            if item.key in seen:
                item = Quarantined(item.key, item.shard_id, "duplicate key")
            seen.add(item.key)
        yield item
