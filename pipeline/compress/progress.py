"""Periodic one-line progress reports on stderr that read well in non-TTY logs."""

from __future__ import annotations

import logging
import time

from pipeline.compress.shard_committer import RunTotals

log = logging.getLogger(__name__)


class ProgressReporter:
    def __init__(self, total_shards: int, interval_s: float, prefix: str = "compress") -> None:
        self.total_shards = total_shards
        self.interval_s = interval_s
        self.prefix = prefix
        self.started = time.monotonic()
        self.last = 0.0

    def update(self, totals: RunTotals, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        kept = 100.0 * totals.tokens_kept / totals.tokens_full if totals.tokens_full else 0.0
        log.info(
            f"[{self.prefix}] shards {totals.shards_processed}/{self.total_shards} | images {totals.images} "
            f"({totals.images / elapsed:.1f}/s) | kept tokens {kept:.1f}% | quarantined {totals.quarantined} "
            f"| {elapsed:.0f}s"
        )
