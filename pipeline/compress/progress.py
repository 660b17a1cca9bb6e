"""Live progress of a compress run: one line per interval on stderr, readable in non-TTY logs, and a last one.

The encode stage counts what it encodes (in this process, or in Ray actors through a counter actor that the
Ray executor polls), so a line comes every interval even while no shard has committed yet.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from pipeline.compress.shard_committer import RunTotals
from pipeline.stages.records import EncodedCounts

log = logging.getLogger(__name__)


class LiveProgress:
    """What the encode stage has done so far, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = EncodedCounts()

    def add(self, counts: EncodedCounts) -> None:
        with self._lock:
            self._counts.add(counts)

    def replace(self, counts: EncodedCounts) -> None:
        with self._lock:
            self._counts = dataclasses.replace(counts)

    def snapshot(self) -> EncodedCounts:
        with self._lock:
            return dataclasses.replace(self._counts)


class ProgressReporter:
    """While open, logs a line every ``interval_s`` from a thread of its own; on close, the run's last line."""

    def __init__(self, total_shards: int, total_bytes: int, interval_s: float, live: LiveProgress,
                 totals: RunTotals) -> None:
        self.total_shards = total_shards
        self.total_bytes = total_bytes
        self.interval_s = interval_s
        self.live = live
        self.totals = totals
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, name="progress", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        log.info(self.line(final=True))

    def _report(self) -> None:
        while not self._stop.wait(self.interval_s):
            log.info(self.line())

    def line(self, final: bool = False) -> str:
        live, totals = self.live.snapshot(), self.totals
        elapsed = max(time.monotonic() - self.started, 1e-9)
        images = totals.images if final else live.images
        tokens_full, tokens_kept = ((totals.tokens_full, totals.tokens_kept) if final
                                    else (live.tokens_full, live.tokens_kept))
        kept = 100.0 * tokens_kept / tokens_full if tokens_full else 0.0
        return (f"[compress] shards {totals.shards_processed}/{self.total_shards} | images {images} "
                f"({images / elapsed:.1f}/s) | kept tokens {kept:.1f}% | quarantined {totals.quarantined} "
                f"| {elapsed:.0f}s | {'done' if final else 'ETA ' + self.eta(live, elapsed)}")

    def eta(self, live: EncodedCounts, elapsed: float) -> str:
        """The input bytes left at the rate images' bytes have been encoded (a shard's container overhead and its
        quarantined samples make it a slight over-estimate)."""
        if not live.source_bytes:
            return "?"
        remaining = max(self.total_bytes - live.source_bytes, 0)
        return f"{remaining / (live.source_bytes / elapsed):.0f}s"
