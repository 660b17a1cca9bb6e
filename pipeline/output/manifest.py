"""The manifest: one row per committed data file of the visible shards, the index every reader starts from.

Rebuilt from the commit markers at the end of each run; readers never glob ``data/``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.output.commit import CommittedShard
from pipeline.storage import filesystem_for, write_bytes

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


def current_shards(committed: dict[tuple[str, str], CommittedShard], fingerprints: dict[str, str]) -> list[CommittedShard]:
    """One marker per shard: the one matching the input's current fingerprint, else (input gone) the newest."""
    by_shard: dict[str, CommittedShard] = {}
    for (shard_id, fingerprint), shard in sorted(committed.items()):
        best = by_shard.get(shard_id)
        if best is None or fingerprints.get(shard_id) == fingerprint or (
            fingerprints.get(shard_id) != best.source_fingerprint and shard.committed_at > best.committed_at
        ):
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
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        raise IncompleteOutputError(
            f"incomplete output: no {MANIFEST_NAME} in {output_dir} — the compress job has not finished a run"
        ) from None
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{url}: not an atr manifest (missing columns {', '.join(missing)})")
    return table.select(MANIFEST_SCHEMA.names).to_pylist()
