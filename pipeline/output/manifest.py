"""The manifest: one row per committed data file of the visible shards, the index every reader starts from.

Rebuilt from the commit markers at the end of each run; readers never glob ``data/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import JobError, stable_hash
from pipeline.output.commit import CommittedShard, WrittenFile, marker_name
from pipeline.storage import filesystem_for, url_for, write_bytes

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("shard_id", pa.string()),
    ("path", pa.string()),  # relative to the cfg_hash directory
    ("rows", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("source_fingerprint", pa.string()),
    ("attempt", pa.string()),
])


class IncompleteOutputError(FileNotFoundError):
    """An output directory without a manifest: no run has finished there."""


def current_shards(committed: dict[tuple[str, str], CommittedShard], fingerprints: dict[str, str],
                   keep_removed: bool = True) -> list[CommittedShard]:
    """One marker per shard: the one matching the input's current fingerprint.

    Mirror semantics (``keep_removed=False``): only shards of the current input (``fingerprints``) that have a
    marker for their current fingerprint; a removed input drops out, a changed one shows only its new version.
    ``keep_removed=True`` (append-only) also keeps, for a shard whose current version has no marker (its input
    is gone, or ``fingerprints`` does not know it), its newest marker.
    """
    by_shard: dict[str, CommittedShard] = {}
    for (shard_id, fingerprint), shard in sorted(committed.items()):
        current = fingerprints.get(shard_id)
        if current == fingerprint:
            by_shard[shard_id] = shard
        elif keep_removed:
            best = by_shard.get(shard_id)
            if best is None or (best.source_fingerprint != current and shard.committed_at > best.committed_at):
                by_shard[shard_id] = shard
    return [by_shard[s] for s in sorted(by_shard)]


def manifest_table(shards: list[CommittedShard]) -> pa.Table:
    rows = [
        {"shard_id": s.shard_id, "path": f.path, "rows": f.rows, "bytes": f.bytes, "sha256": f.sha256,
         "source_fingerprint": s.source_fingerprint, "attempt": s.attempt}
        for s in shards
        for f in sorted(s.files, key=lambda f: f.path)
    ]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def write_manifest(output_dir: str, shards: list[CommittedShard], storage_options: dict) -> None:
    """Deterministic bytes for the same committed set, so a rerun with nothing new leaves it byte-identical."""
    buffer = io.BytesIO()
    pq.write_table(manifest_table(shards), buffer, compression="zstd")
    write_bytes(f"{output_dir}/{MANIFEST_NAME}", buffer.getvalue(), storage_options)


def read_manifest(output_dir: str, storage_options: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The committed data files of one output (``{output}/{encoder}/{cfg_hash}``), in manifest order."""
    url = f"{output_dir.rstrip('/')}/{MANIFEST_NAME}"
    fs, path = filesystem_for(url, dict(storage_options or {}))
    try:
        with fs.open(path, "rb") as handle:  # ParquetFile: read_table would import pyarrow.dataset (and pandas)
            table = pq.ParquetFile(handle).read()
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"incomplete output: no {MANIFEST_NAME} in {output_dir} — the compress job has not finished a run"
        ) from None
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{url}: not an atr manifest (missing columns {', '.join(missing)})")
    return table.select(MANIFEST_SCHEMA.names).to_pylist()


# ------------------------------------------------------------------------------------ keys across shards

KEY_INDEX_NAME = "_key_index.parquet"  # a cache of each visible shard's key hashes, rewritten by each run
HIDDEN_TAG = ".hidden-"  # in the name of a copy of a data file without the keys another shard holds


@dataclass(frozen=True)
class DuplicateKey:
    key: str
    kept_in: str  # shard id, first in shard-id order
    also_in: str


def key_hashes(keys: list[str]) -> np.ndarray:
    """64-bit hashes: 8 bytes of memory per key, so the whole visible dataset's keys fit one array."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def shard_keys(output_dir: str, shard: CommittedShard, storage_options: dict) -> list[str]:
    """The keys of a committed shard, read from its data files (the key column; a tar's ``.json`` members)."""
    fs, root = filesystem_for(output_dir, storage_options)
    keys: list[str] = []
    for file in shard.files:
        if file.path.endswith(".parquet"):  # the key column's pages only (range reads), not the tokens
            with fs.open(f"{root}/{file.path}", "rb") as handle:
                keys.extend(pq.read_table(handle, columns=["key"]).column("key").to_pylist())
        else:
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/{file.path}"))) as tar:
                keys.extend(json.loads(tar.extractfile(m).read())["key"] for m in tar if m.name.endswith(".json"))
    return keys


def _read_key_index(output_dir: str, storage_options: dict) -> dict[tuple[str, str], np.ndarray]:
    fs, path = filesystem_for(f"{output_dir}/{KEY_INDEX_NAME}", storage_options)
    try:
        table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    except FileNotFoundError:
        return {}
    except Exception as exc:  # noqa: BLE001 - a cache that does not read is rebuilt
        log.warning(f"[manifest] key index {url_for(fs, path)} does not read ({exc}); rebuilding it")
        return {}
    return {(row["shard_id"], row["source_fingerprint"]): np.frombuffer(row["hashes"], dtype=np.uint64)
            for row in table.to_pylist()}


def find_duplicate_keys(output_dir: str, shards: list[CommittedShard], storage_options: dict) -> list[DuplicateKey]:
    """Keys that more than one of ``shards`` holds, each named with the first shard (in the given order) and
    another one. Costs 8 bytes of memory per key; reads the key column only of shards the key index does not
    hold yet (new or changed since the last run) and, to confirm a hash match, of the shards it involves."""
    cached = _read_key_index(output_dir, storage_options)
    hashes = []
    for shard in shards:
        found = cached.get((shard.shard_id, shard.source_fingerprint))
        hashes.append(found if found is not None else key_hashes(shard_keys(output_dir, shard, storage_options)))
    if set(cached) != {(s.shard_id, s.source_fingerprint) for s in shards}:  # unchanged nights write nothing
        write_key_index(output_dir, shards, hashes, storage_options)
    if not shards:
        return []
    every = np.concatenate(hashes)
    owner = np.repeat(np.arange(len(shards)), [len(h) for h in hashes])
    ordered = np.sort(every)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return []
    involved = sorted(set(owner[np.isin(every, repeated)].tolist()))
    first: dict[str, str] = {}
    duplicates = []
    for index in involved:  # in shard order, so the first holder of a key is the one that keeps it
        shard = shards[index]
        for key in shard_keys(output_dir, shard, storage_options):
            holder = first.setdefault(key, shard.shard_id)
            if holder != shard.shard_id:
                duplicates.append(DuplicateKey(key, holder, shard.shard_id))
    return duplicates


def write_key_index(output_dir: str, shards: list[CommittedShard], hashes: list[np.ndarray],
                     storage_options: dict) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"shard_id": [s.shard_id for s in shards],
                             "source_fingerprint": [s.source_fingerprint for s in shards],
                             "hashes": pa.array([h.tobytes() for h in hashes], pa.binary())}), buffer,
                   compression="zstd")
    write_bytes(f"{output_dir}/{KEY_INDEX_NAME}", buffer.getvalue(), storage_options)


def hide_keys(output_dir: str, shard: CommittedShard, keys: set[str], storage_options: dict) -> CommittedShard:
    """A copy of ``shard`` whose data files are copies without ``keys`` (written once, named by what they
    leave out); the marker and the original files stay as they are."""
    fs, root = filesystem_for(output_dir, storage_options)
    files = []
    for file in shard.files:
        if not file.path.endswith(".parquet"):
            raise JobError("output.on_duplicate_key=keep_first needs output.format=parquet; "
                           "remove the duplicate keys from the input or set output.on_duplicate_key=error")
        table = pq.read_table(io.BytesIO(fs.cat_file(f"{root}/{file.path}")))
        mask = pc.invert(pc.is_in(table.column("key"), value_set=pa.array(sorted(keys), pa.string())))
        kept = table.filter(mask)
        path = f"{file.path[: -len('.parquet')]}{HIDDEN_TAG}{stable_hash(sorted(keys), 10)}.parquet"
        out = io.BytesIO()
        pq.write_table(kept, out, compression="zstd")  # the schema (and its format metadata) as it was
        data = out.getvalue()
        if not fs.exists(f"{root}/{path}"):
            write_bytes(f"{output_dir}/{path}", data, storage_options)
        size = fs.info(f"{root}/{path}")["size"]
        files.append(WrittenFile(path=path, rows=kept.num_rows, bytes=int(size),
                                 sha256=hashlib.sha256(fs.cat_file(f"{root}/{path}")).hexdigest()))
    return dataclasses.replace(shard, files=files, rows=sum(f.rows for f in files))


# ------------------------------------------------------------------------ retired (superseded) markers

RETIRED_NAME = "_retired.json"  # {marker name: when a run first left it out of the manifest}


def read_retired(output_dir: str, storage_options: dict) -> dict[str, float]:
    fs, path = filesystem_for(f"{output_dir}/{RETIRED_NAME}", storage_options)
    try:
        return {str(k): float(v) for k, v in json.loads(fs.cat_file(path)).items()}
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning(f"[manifest] {url_for(fs, path)} does not parse; superseded markers count from now")
        return {}


def record_retired(output_dir: str, marker_names: list[str], visible: list[CommittedShard],
                   storage_options: dict, now: float | None = None) -> dict[str, float]:
    """Note when each marker the manifest no longer shows dropped out, so ``jobs.gc`` starts its grace period
    then (not at the data file's age: a reader may still hold yesterday's manifest)."""
    now = time.time() if now is None else now
    shown = {marker_name(s.shard_id, s.source_fingerprint) for s in visible}
    before = read_retired(output_dir, storage_options)
    retired = {name: before.get(name, now) for name in sorted(marker_names) if name not in shown}
    if retired != before:
        write_bytes(f"{output_dir}/{RETIRED_NAME}", json.dumps(retired, indent=1, sort_keys=True).encode(),
                    storage_options)
    return retired
