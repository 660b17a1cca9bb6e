"""The write stage: each shard's rows of a batch -> one attempt-unique data (or quarantine) file below ``_staging/``,
and a record of it."""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from typing import Any

import pyarrow as pa

from pipeline.config import CompressConfig
from pipeline.output.commit import DATA_DIR, QUARANTINE_DIR, WrittenFile, sha256_hex, staged_path
from pipeline.output.format import (
    encode_quarantine_table,
    encode_sample_table,
    parquet_bytes,
    parquet_rows,
    samples_to_wds_tar,
)
from pipeline.stages.records import (
    DATA,
    END,
    QUARANTINE,
    RECORD_SCHEMA,
    SAMPLE,
    quarantined_samples,
)
from pipeline.storage import write_bytes


class WriteStage:
    """Writes each shard's rows in a batch as one attempt-unique part; returns one record per part or shard end."""

    def __init__(self, cfg: CompressConfig, output_dir: str, run_id: str, metadata: dict[str, Any]) -> None:
        self.cfg = cfg
        self.output_dir = output_dir
        self.run_id = run_id
        self.metadata = metadata
        self.storage_options = cfg.storage.storage_options()

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
        records: list[dict[str, Any]] = []
        for row in batch.to_pylist():
            if row["kind"] == END:
                records.append({"kind": END, "shard_id": row["shard_id"], "total": row["total"],
                                "samples": row["samples"], "source_url": row["source_url"],
                                "source_fingerprint": row["source_fingerprint"]})
            else:
                by_shard[row["shard_id"]].append(row)
        for shard_id, rows in by_shard.items():
            samples = [r for r in rows if r["kind"] == SAMPLE]
            quarantined = [r for r in rows if r["kind"] == QUARANTINE]
            if samples:
                written = self._write_samples(shard_id, samples)
                records.append({
                    "kind": DATA, "shard_id": shard_id, **written.__dict__,
                    "tokens_full": sum(r["n_tokens"] for r in samples),
                    "tokens_kept": sum(r["n_kept"] for r in samples),
                    "kept_counts": json.dumps([r["n_kept"] for r in samples]),
                })
            if quarantined:
                written = self._write_file(QUARANTINE_DIR, shard_id, "parquet", parquet_bytes(
                    encode_quarantine_table(quarantined)))
                records.append({"kind": QUARANTINE, "shard_id": shard_id, **written.__dict__,
                                "samples": sum(quarantined_samples(r) for r in quarantined)})
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)

    def _write_samples(self, shard_id: str, samples: list[dict[str, Any]]) -> WrittenFile:
        if self.cfg.output.format == "webdataset":
            return self._write_file(DATA_DIR, shard_id, "tar", samples_to_wds_tar(samples, self.metadata), rows=len(samples))
        table = encode_sample_table(samples, self.metadata)
        return self._write_file(DATA_DIR, shard_id, "parquet",
                                parquet_bytes(table, self.cfg.output.row_group_size), rows=len(samples))

    def _write_file(self, folder: str, shard_id: str, extension: str, data: bytes, rows: int | None = None) -> WrittenFile:
        """Written below ``_staging/`` (no glob of ``data/`` sees an attempt); the commit moves it to ``folder``."""
        relative = staged_path(f"{folder}/{shard_id}.{self.run_id}-{secrets.token_hex(4)}.{extension}")
        write_bytes(f"{self.output_dir}/{relative}", data, self.storage_options)  # fsynced before any commit
        return WrittenFile(path=relative, rows=rows if rows is not None else parquet_rows(data),
                           bytes=len(data), sha256=sha256_hex(data))
