"""The commit protocol: a shard counts only once its marker exists.

Data files are written under attempt-unique names below ``_staging/`` by any worker, where no glob of
``data/`` sees them; only the driver calls :func:`commit_shard`, which moves the attempt's files to their final
names (``_staging/data/x`` -> ``data/x``: a rename locally, a server-side copy then a delete of the staged
object on S3), then creates ``_committed/{shard_id}.{source}.json`` if absent, naming the final paths, so a
marker never names a file that does not exist. A marker holding this attempt's own bytes (its PUT landed but
the response was lost) is this attempt's commit; only another attempt's marker makes this one a loser, which
then deletes its own files (a loser that sees the winner's marker before moving anything moves nothing). A
crash between the move and the marker leaves an unreferenced file in ``data/`` that ``jobs.gc`` collects.
A marker that does not parse is never trusted: readers skip it with one warning naming it, and the next
commit of its shard moves it to ``_committed/_corrupt/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

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
# Attempt files: written under attempt-unique names in STAGING_DIR/{DATA_DIR,QUARANTINE_DIR}/, moved to
# {DATA_DIR,QUARANTINE_DIR}/ by the commit, visible to readers only once a marker references them.
DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"
STAGING_DIR = "_staging"


def staged_path(final: str) -> str:
    """Where an attempt writes the file that its commit moves to ``final`` (both relative to the output)."""
    return f"{STAGING_DIR}/{final}"


def final_path(path: str) -> str:
    """The committed name of a (possibly staged) attempt file."""
    return path[len(STAGING_DIR) + 1:] if path.startswith(STAGING_DIR + "/") else path


@dataclass
class IndexedMarker:
    shard: CommittedShard
    version: str  # of the marker object when its body was read: a rewritten (torn) marker is read again
    body: bytes = b""  # the JSON it was parsed from, so the index is rewritten without re-serialising 100k shards


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


def marker_name(shard_id: str, fingerprint: str) -> str:
    """The name, under ``_committed/``, of the marker of ``shard_id`` read from a source with ``fingerprint``."""
    return f"{shard_id}.{source_tag(fingerprint)}.json"


def marker_url(output_dir: str, shard_id: str, fingerprint: str) -> str:
    return f"{output_dir}/{COMMITTED_DIR}/{marker_name(shard_id, fingerprint)}"


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
    """Move the shard's staged files to their final names, then create its marker (naming those) if absent.
    False means another attempt won: this attempt's files are removed, staged or moved."""
    url = marker_url(output_dir, shard.shard_id, shard.source_fingerprint)
    attempt_paths = [f.path for f in shard.files + shard.quarantine_files]
    if _won_by_another(url, shard.attempt, storage_options):  # the common race: move nothing into data/
        delete_files(output_dir, attempt_paths, storage_options)
        return False
    shard = dataclasses.replace(
        shard, committed_at=shard.committed_at or time.time(),
        files=promote_files(output_dir, shard.files, storage_options),
        quarantine_files=promote_files(output_dir, shard.quarantine_files, storage_options),
    )
    payload = json.dumps(dataclasses.asdict(shard), sort_keys=True, indent=1).encode()
    if create_exclusive(url, payload, storage_options):
        return True
    if set_aside_if_corrupt(url, storage_options) and create_exclusive(url, payload, storage_options):
        return True
    delete_files(output_dir, sorted({*attempt_paths, *map(final_path, attempt_paths)}), storage_options)
    return False


def _won_by_another(url: str, attempt: str, storage_options: dict) -> bool:
    """Whether a marker of another attempt already stands at ``url`` (one GET, a 404 in the common case)."""
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache(path)
    try:
        existing = parse_marker(fs.cat_file(path))
    except FileNotFoundError:
        return False
    return existing is not None and existing.attempt != attempt


def promote_files(output_dir: str, files: list[WrittenFile], storage_options: dict) -> list[WrittenFile]:
    """Each staged file moved to its final name (files already there are left as they are); returns the files
    under their final names, every one durable there before this returns.

    Locally a rename in one filesystem (atomic), then the folders fsynced; on an object store a server-side
    copy (the object appears whole) and a delete of the staged object. Redoing a move that completed (the
    staged file gone, the final one there) is a no-op, so a retried commit never fails on it.
    """
    fs, root = filesystem_for(output_dir, storage_options)
    local = isinstance(fs, LocalFileSystem)
    moved, folders = [], set()
    for file in files:
        final = final_path(file.path)
        if final == file.path:
            moved.append(file)
            continue
        source, target = f"{root}/{file.path}", f"{root}/{final}"
        if local:
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            try:
                os.rename(source, target)
            except FileNotFoundError:
                if not os.path.exists(target):
                    raise
            folders.update({posixpath.dirname(source), posixpath.dirname(target)})
        else:
            try:
                fs.copy(source, target)
            except FileNotFoundError:
                fs.invalidate_cache(target)
                if not fs.exists(target):
                    raise
            try:
                fs.rm(source)
            except FileNotFoundError:
                pass
        moved.append(dataclasses.replace(file, path=final))
    for folder in sorted(folders):
        _fsync_folder(folder)
    return moved


def _fsync_folder(folder: str) -> None:
    """A rename is durable once both folders are fsynced; the marker must not outlive its file's name."""
    if not os.path.isdir(folder):
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dataset_card(output_dir: str, storage_options: dict, resolved: dict[str, Any]) -> None:
    """Write ``{output_dir}/dataset.json`` from the run's resolved config unless it already holds the same
    bytes. Every run of one output writes identical bytes, so concurrent runs cannot disagree."""
    from pipeline.output.format import CARD_NAME, card_bytes, dataset_card  # torch: not for jobs.gc --help

    fs, root = filesystem_for(output_dir, storage_options)
    data = card_bytes(dataset_card(resolved))
    path = f"{root}/{CARD_NAME}"
    fs.invalidate_cache(path)
    try:
        if fs.cat_file(path) == data:
            return
    except FileNotFoundError:
        pass
    write_bytes(url_for(fs, path), data, storage_options)


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
        found[posixpath.basename(path)] = IndexedMarker(shard, missing[path], data)
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
            index[row["name"]] = IndexedMarker(shard, row["version"], row["body"])
    return index


def write_marker_index(output_dir: str, markers: dict[str, IndexedMarker], storage_options: dict) -> None:
    names = sorted(markers)
    bodies = [markers[n].body or json.dumps(dataclasses.asdict(markers[n].shard), sort_keys=True).encode()
              for n in names]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"name": pa.array(names, pa.string()),
                             "version": pa.array([markers[n].version for n in names], pa.string()),
                             "body": pa.array(bodies, pa.binary())}), buffer, compression="zstd")
    write_bytes(marker_index_url(output_dir), buffer.getvalue(), storage_options)
