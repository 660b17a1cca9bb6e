"""Driver-side bookkeeping: gather the write records of each shard and commit it once all its rows are written."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.failpoints import maybe_fail
from pipeline.output.commit import CommittedShard, WrittenFile, commit_shard
from pipeline.stages.records import DATA, END


@dataclass
class _Pending:
    """A shard whose records are still arriving; ``shard`` gets its source fields from the ``end`` record."""

    shard: CommittedShard
    kept: Counter = field(default_factory=Counter)
    end: dict[str, Any] | None = None
    quarantine_rows: int = 0  # rows, for completeness; ``shard.quarantined`` counts the samples they stand for

    @property
    def complete(self) -> bool:
        return self.end is not None and self.shard.rows + self.quarantine_rows == self.end["total"]


@dataclass
class RunTotals:
    shards_processed: int = 0
    shards_lost_race: int = 0
    input_samples: int = 0  # what the decode stage read: images + quarantined, checked at the end of a run
    images: int = 0
    quarantined: int = 0
    tokens_full: int = 0
    tokens_kept: int = 0
    bytes_written: int = 0


class ShardCommitter:
    """The single committer. Feed it every record of the write stage, in any order."""

    def __init__(self, output_dir: str, run_id: str, storage_options: dict) -> None:
        self.output_dir = output_dir
        self.run_id = run_id
        self.storage_options = storage_options
        self.pending: dict[str, _Pending] = {}
        self.totals = RunTotals()

    def observe(self, record: dict[str, Any]) -> CommittedShard | None:
        shard_id = record["shard_id"]
        if shard_id not in self.pending:
            self.pending[shard_id] = _Pending(CommittedShard(shard_id=shard_id, source_url="", source_fingerprint="",
                                                             attempt=self.run_id))
        pending = self.pending[shard_id]
        shard = pending.shard
        kind = record["kind"]
        if kind == END:
            pending.end = record
            shard.source_url, shard.source_fingerprint = record["source_url"], record["source_fingerprint"]
        else:
            written = WrittenFile(path=record["path"], rows=int(record["rows"]), bytes=int(record["bytes"]),
                                  sha256=record["sha256"])
            self.totals.bytes_written += written.bytes
            if kind == DATA:
                shard.files.append(written)
                shard.rows += written.rows
                shard.tokens_full += int(record["tokens_full"])
                shard.tokens_kept += int(record["tokens_kept"])
                pending.kept.update(json.loads(record["kept_counts"]))
            else:
                shard.quarantine_files.append(written)
                pending.quarantine_rows += written.rows
                shard.quarantined += written.rows if record.get("samples") is None else int(record["samples"])
        return self._commit(record["shard_id"]) if pending.complete else None

    def _commit(self, shard_id: str) -> CommittedShard:
        pending = self.pending.pop(shard_id)
        shard = pending.shard
        shard.kept_histogram = {str(k): v for k, v in sorted(pending.kept.items())}
        if commit_shard(self.output_dir, shard, self.storage_options):
            totals = self.totals
            totals.shards_processed += 1
            end_samples = pending.end.get("samples")
            totals.input_samples += shard.rows + shard.quarantined if end_samples is None else int(end_samples)
            totals.images += shard.rows
            totals.quarantined += shard.quarantined
            totals.tokens_full += shard.tokens_full
            totals.tokens_kept += shard.tokens_kept
            maybe_fail("ATR_FAIL_DRIVER_AFTER_COMMITS", totals.shards_processed)
        else:
            self.totals.shards_lost_race += 1
        return shard

    def unfinished(self) -> list[str]:
        return sorted(self.pending)
