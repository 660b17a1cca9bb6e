"""When each stage of a run was busy, for benchmarks and profiling; free unless a recorder is installed.

    with recording() as timeline:
        run_compress(cfg)
    timeline.summary()   # per stage: spans, items, busy seconds, first start and last end

Stages run in threads of one process (the local executor), so the recorder is process-wide.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Span:
    stage: str
    start: float  # time.perf_counter()
    end: float
    items: int
    thread: str


class Timeline:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)

    def summary(self, origin: float | None = None) -> dict[str, dict[str, Any]]:
        """Per stage: spans, items, busy seconds (summed over threads), first start and last end after ``origin``."""
        if not self.spans:
            return {}
        origin = min(s.start for s in self.spans) if origin is None else origin
        stages: dict[str, dict[str, Any]] = {}
        for span in sorted(self.spans, key=lambda s: s.start):
            entry = stages.setdefault(span.stage, {"spans": 0, "items": 0, "busy_s": 0.0,
                                                   "first_start_s": span.start - origin, "last_end_s": 0.0})
            entry["spans"] += 1
            entry["items"] += span.items
            entry["busy_s"] += span.end - span.start
            entry["last_end_s"] = max(entry["last_end_s"], span.end - origin)
        return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
                for name, entry in stages.items()}


_active: Timeline | None = None


@contextlib.contextmanager
def recording() -> Iterator[Timeline]:
    global _active
    previous, _active = _active, Timeline()
    try:
        yield _active
    finally:
        _active = previous


def record(stage: str, start: float, items: int = 0) -> None:
    """A span of ``stage`` from ``start`` (``time.perf_counter()``) to now, when a recorder is installed."""
    timeline = _active
    if timeline is not None:
        timeline.add(Span(stage, start, time.perf_counter(), items, threading.current_thread().name))
