"""The commit protocol: a shard counts only once its marker exists.

Data files are written under attempt-unique names by any worker; only the driver calls :func:`commit_shard`,
which creates ``_committed/{shard_id}.{source}.json`` if absent. A marker holding this attempt's own bytes
(its PUT landed but the response was lost) is this attempt's commit; only another attempt's marker makes
this one a loser, which then deletes its own files. A marker that does not parse is never trusted: readers
skip it with one warning naming it, and the next commit of its shard moves it to ``_committed/_corrupt/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import (
    create_exclusive,
    filesystem_for,
    object_fingerprint,
    read_many,
    url_for,
    write_bytes,
)

log = logging.getLogger(__name__)

COMMITTED_DIR = "_committed"
CORRUPT_DIR = "_corrupt"  # under COMMITTED_DIR: markers that did not parse, kept for a human to look at
# Attempt files: written under attempt-unique names, visible only once a marker references them.
DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"


@dataclass
class IndexedMarker:
    shard: CommittedShard
    version: str  # of the marker object when its body was read: a rewritten (torn) marker is read again


@dataclass
class WrittenFile:
    path: str  # relative to the output dir
    rows: int
    bytes: int
    sha256: str


@dataclass
class CommittedShard:
    shard_id: str
    source_url: str
    source_fingerprint: str
    attempt: str
    files: list[WrittenFile] = field(default_factory=list)
    quarantine_files: list[WrittenFile] = field(default_factory=list)
    rows: int = 0
    quarantined: int = 0
    tokens_full: int = 0
    tokens_kept: int = 0
    kept_histogram: dict[str, int] = field(default_factory=dict)
    committed_at: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommittedShard:
        data = dict(data)
        data["files"] = [WrittenFile(**f) for f in data.get("files", [])]
        data["quarantine_files"] = [WrittenFile(**f) for f in data.get("quarantine_files", [])]
        return cls(**data)


def source_tag(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:10]


def marker_url(output_dir: str, shard_id: str, fingerprint: str) -> str:
    return f"{output_dir}/{COMMITTED_DIR}/{shard_id}.{source_tag(fingerprint)}.json"


def parse_marker(data: bytes) -> CommittedShard | None:
    """The marker's shard, or None when the bytes are not a marker (torn, empty, foreign)."""
    try:
        shard = CommittedShard.from_json(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return shard if shard.shard_id and shard.attempt else None


def marker_listing(fs, root: str) -> dict[str, tuple[str, str]]:
    """{name: (path, version)} of the markers directly under ``root`` (not those set aside in ``_corrupt/``),
    from one listing; the version (ETag, else size and mtime) changes whenever the object is rewritten."""
    if not fs.exists(root):
        return {}
    return {posixpath.basename(p): (p, object_fingerprint(info))
            for p, info in fs.find(root, maxdepth=1, detail=True).items() if p.endswith(".json")}


def list_committed(output_dir: str, storage_options: dict) -> dict[tuple[str, str], CommittedShard]:
    """All markers that parse, keyed by (shard_id, source fingerprint), every body read (concurrently) rather
    than taken from the index: what gc and audits use. A marker that does not parse is skipped, named."""
    return by_source(load_markers(output_dir, storage_options, known={}))


def commit_shard(output_dir: str, shard: CommittedShard, storage_options: dict) -> bool:
    """Create the shard's marker if absent. False means another attempt won: this attempt's files are removed."""
    shard = dataclasses.replace(shard, committed_at=shard.committed_at or time.time())
    payload = json.dumps(dataclasses.asdict(shard), sort_keys=True, indent=1).encode()
    url = marker_url(output_dir, shard.shard_id, shard.source_fingerprint)
    if create_exclusive(url, payload, storage_options):
        return True
    if set_aside_if_corrupt(url, storage_options) and create_exclusive(url, payload, storage_options):
        return True
    delete_files(output_dir, [f.path for f in shard.files + shard.quarantine_files], storage_options)
    return False


def set_aside_if_corrupt(url: str, storage_options: dict) -> bool:
    """Move the marker at ``url`` to ``_committed/_corrupt/`` if it does not parse; True if it was moved."""
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache(path)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return True  # set aside by someone else meanwhile: the name is free again
    if parse_marker(data) is not None:
        return False
    directory, name = posixpath.split(path)
    aside = f"{directory}/{CORRUPT_DIR}/{name}.{int(time.time())}"
    log.warning(f"[commit] marker {url} does not parse ({len(data)} bytes): moved to {url_for(fs, aside)}")
    fs.makedirs(posixpath.dirname(aside), exist_ok=True)
    fs.pipe_file(aside, data)
    fs.rm(path)
    return True


def delete_files(output_dir: str, relative_paths: list[str], storage_options: dict) -> None:
    fs, root = filesystem_for(output_dir, storage_options)
    for relative in relative_paths:
        path = f"{root}/{relative}"
        if fs.exists(path):
            fs.rm(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- the marker index

MARKER_INDEX = "_committed_index.parquet"  # beside _committed/: a cache of the marker bodies, never the truth


def marker_index_url(output_dir: str) -> str:
    return f"{output_dir}/{MARKER_INDEX}"


def load_markers(output_dir: str, storage_options: dict,
                 known: dict[str, IndexedMarker] | None = None) -> dict[str, IndexedMarker]:
    """{marker name: shard} of every marker that parses, at object-store cost: one listing of ``_committed/``
    (a request per 1,000 names), one read of the marker index, and concurrent reads of only the markers
    neither the index nor ``known`` holds (new since the last run: this run's commits, a concurrent run's).

    The listing decides which markers exist; the index only saves reading their bodies. A marker that does
    not parse is skipped with a warning naming it, so its shard is redone. ``jobs.gc repair=true`` rebuilds
    the index from every marker body.
    """
    fs, root = filesystem_for(f"{output_dir}/{COMMITTED_DIR}", storage_options)
    fs.invalidate_cache(root)
    listed = marker_listing(fs, root)
    cached = dict(known) if known is not None else read_marker_index(output_dir, storage_options)
    found = {name: m for name, m in cached.items() if name in listed and listed[name][1] == m.version}
    missing = {listed[name][0]: listed[name][1] for name in sorted(listed) if name not in found}
    for path, data in read_many(fs, list(missing)).items():
        shard = parse_marker(data)
        if shard is None:
            log.warning(f"[commit] ignoring a marker that does not parse: {url_for(fs, path)} "
                        f"({len(data)} bytes); its shard is redone and the marker set aside at the next commit")
            continue
        found[posixpath.basename(path)] = IndexedMarker(shard, missing[path])
    return found


def by_source(markers: dict[str, IndexedMarker]) -> dict[tuple[str, str], CommittedShard]:
    return {(m.shard.shard_id, m.shard.source_fingerprint): m.shard for m in markers.values()}


def read_marker_index(output_dir: str, storage_options: dict) -> dict[str, IndexedMarker]:
    """The index's {marker name: shard}; empty when there is none or it cannot be read (then every marker
    is read, as a full rebuild would)."""
    fs, path = filesystem_for(marker_index_url(output_dir), storage_options)
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
        rows = table.select(["name", "version", "body"]).to_pylist()
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - a cache that does not read is rebuilt, never trusted
        log.warning(f"[commit] marker index {url_for(fs, path)} does not read ({exc}); reading every marker")
        return {}
    index = {}
    for row in rows:
        shard = parse_marker(row["body"])
        if shard is not None:
            index[row["name"]] = IndexedMarker(shard, row["version"])
    return index


def write_marker_index(output_dir: str, markers: dict[str, IndexedMarker], storage_options: dict) -> None:
    names = sorted(markers)
    bodies = [json.dumps(dataclasses.asdict(markers[n].shard), sort_keys=True).encode() for n in names]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"name": pa.array(names, pa.string()),
                             "version": pa.array([markers[n].version for n in names], pa.string()),
                             "body": pa.array(bodies, pa.binary())}), buffer, compression="zstd")
    write_bytes(marker_index_url(output_dir), buffer.getvalue(), storage_options)
