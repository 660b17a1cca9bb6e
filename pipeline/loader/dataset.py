"""A resumable torch ``IterableDataset`` over a compress output, read in the order of :mod:`pipeline.loader.order`.

Resume. The state counts, per worker of this rank, the samples the training loop has received. A resumed worker
recomputes its order, drops the first ``consumed`` indices, and reads only row groups that still hold rows it
owes (the shuffle buffer is refilled from those rows alone), so nothing is repeated or skipped. With DataLoader
workers that count is kept by :class:`pipeline.loader.dataloader.PrunedTokenLoader`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.loader.order import Progress, file_order, shuffle_buffer_order, split_range, stream_pieces
from pipeline.loader.reading import READ_COLUMNS, SampleDecoder, committed_output, open_parquet, passthrough_to_read
from pipeline.output.format import FORMAT_FIELDS, read_format_metadata

STATE_VERSION = 1
T = TypeVar("T")


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Run ``items`` in a background thread, at most ``depth`` ahead; its errors re-raise here."""
    slots: queue.Queue = queue.Queue(depth)
    stopped = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stopped.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((False, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="atr-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            has_item, value = slots.get()
            if not has_item:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stopped.set()
        thread.join()


def _distributed_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


class PrunedTokenDataset(IterableDataset):
    """Samples of a compress output (its directory or its ``manifest.parquet``), local or ``s3://``.

    Each sample: ``key``, ``tokens`` ``[n_kept, D]`` (float32, or ``tokens_dtype``: a bfloat16 model can take
    bfloat16 and skip a conversion and half the bytes), ``positions`` int64 ``[n_kept]``, ``n_tokens``,
    ``grid`` ``(rows, cols)``, ``side`` and the requested passthrough ``columns`` (default: ``caption`` when
    stored). Rank and world size come from the arguments, else from ``torch.distributed`` at construction.
    Resume exactly with :meth:`state_dict` / :meth:`load_state_dict`; with DataLoader workers iterate through
    :class:`PrunedTokenLoader`, which counts what the training loop received.
    """

    def __init__(
        self,
        path_or_manifest: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1024,
        columns: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        batch_rows: int = 256,
        tokens_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if shuffle_buffer < 1 or batch_rows < 1:
            raise ValueError("shuffle_buffer and batch_rows must be at least 1")
        self.storage_options = dict(storage_options or {})
        self.seed, self.shuffle, self.shuffle_buffer, self.batch_rows = seed, shuffle, shuffle_buffer, batch_rows
        self.rank, self.world_size = _distributed_rank_world(rank, world_size)
        output = committed_output(path_or_manifest, self.storage_options)
        self.output_dir, self.files, self.schema, self.meta = output.output_dir, output.files, output.schema, output.meta
        self.data_fingerprint = output.fingerprint
        self.total_rows = sum(f.rows for f in self.files)
        self.columns = passthrough_to_read(self.schema, columns)
        self.decoder = SampleDecoder(
            self.meta["dtype"], self.meta["dim"], self.meta["side"], tuple(self.columns), tokens_dtype
        )
        self.epoch = 0
        self.progress: Progress | None = None
        self._counted_by_loader = False

    # ----------------------------------------------------------------------------------------- epochs and state

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch, self.progress = epoch, None

    def stream_sizes(self, workers_per_rank: int) -> list[int]:
        parts = self.world_size * workers_per_rank
        first = self.rank * workers_per_rank
        return [hi - lo for lo, hi in (split_range(self.total_rows, parts, first + w) for w in range(workers_per_rank))]

    def progress_for(self, workers_per_rank: int) -> Progress:
        """This epoch's progress for ``workers_per_rank`` streams; refuses a state saved with another count."""
        sizes = self.stream_sizes(workers_per_rank)
        if self.progress is None:
            return Progress(sizes, [0] * workers_per_rank)
        if len(self.progress.consumed) != workers_per_rank:
            raise ValueError(
                f"loader state was saved with {len(self.progress.consumed)} worker(s) per rank, but this loader "
                f"runs {workers_per_rank}; resume with the same num_workers (0 and 1 both mean one)"
            )
        if any(c > s for c, s in zip(self.progress.consumed, sizes)):
            raise ValueError("loader state counts more samples than the workers' shares hold; wrong output?")
        return dataclasses.replace(self.progress, sizes=sizes)

    def begin_iteration(self, workers_per_rank: int) -> Progress:
        """Main process, before workers start: move past a finished epoch, then fix the progress to count into."""
        progress = self.progress_for(workers_per_rank)
        if progress.complete:
            self.epoch += 1
            progress = Progress(progress.sizes, [0] * workers_per_rank)
        self.progress = progress
        return progress

    def state_dict(self) -> dict[str, Any]:
        progress = self.progress
        return {
            "version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "world_size": self.world_size,
            "rank": self.rank, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
            "data": self.data_fingerprint,
            "workers_per_rank": len(progress.consumed) if progress else None,
            "consumed": list(progress.consumed) if progress else [],
            "next_worker": progress.next_worker if progress else 0,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        current = self.state_dict()
        for name in ("seed", "world_size", "rank", "shuffle", "shuffle_buffer", "data"):
            if state.get(name) != current[name]:
                what = "the output's files" if name == "data" else f"{name}={current[name]!r}"
                raise ValueError(
                    f"loader state has {name}={state.get(name)!r}, but this dataset has {what}; "
                    "resume with the same output, seed, shuffle settings, rank and world size"
                )
        consumed = [int(c) for c in state.get("consumed") or []]
        if any(c < 0 for c in consumed) or (consumed and len(consumed) != state.get("workers_per_rank")):
            raise ValueError("loader state has an invalid 'consumed' list")
        self.epoch = int(state["epoch"])
        self.progress = None
        if consumed:
            self.progress = Progress([0] * len(consumed), consumed, int(state.get("next_worker", 0)) % len(consumed))
            self.progress = self.progress_for(len(consumed))

    # ----------------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None and not self._counted_by_loader:
            progress = self.begin_iteration(1)
            for sample in self._worker_samples(0, progress):
                progress.record(1)
                yield sample
            return
        workers = info.num_workers if info else 1
        yield from self._worker_samples(info.id if info else 0, self.progress_for(workers))

    def _worker_samples(self, worker_id: int, progress: Progress) -> Iterator[dict[str, Any]]:
        workers = len(progress.sizes)
        stream = (worker_id + progress.next_worker) % workers
        global_stream = self.rank * workers + stream
        start, stop = split_range(self.total_rows, self.world_size * workers, global_stream)
        files_in_order = file_order(len(self.files), self.seed, self.epoch, self.shuffle)
        pieces = stream_pieces(self.files, files_in_order, start, stop)
        n, skip = stop - start, progress.consumed[stream]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, global_stream])
            order = shuffle_buffer_order(n, self.shuffle_buffer, rng)
        else:
            order = np.arange(n)
        if skip >= n:
            return
        needed = np.ones(n, dtype=bool)
        needed[order[:skip]] = False
        pending: dict[int, tuple] = {}
        with contextlib.closing(self._read_rows(pieces, needed, copy=self.shuffle and self.shuffle_buffer > 1)) as rows:
            for index in order[skip:].tolist():
                while index not in pending:
                    at, row = next(rows)
                    pending[at] = row
                yield self.decoder.sample(pending.pop(index))

    def _read_rows(
        self, pieces: list[tuple[int, int, int]], needed: np.ndarray, copy: bool
    ) -> Iterator[tuple[int, tuple]]:
        """``(stream index, row)`` for each needed row, in stream order; Parquet is read one batch ahead in a
        thread (pyarrow releases the GIL), so reading overlaps decoding and collation."""
        for indices, batch, take in prefetch(self._read_batches(pieces, needed)):
            yield from zip(indices, self.decoder.rows(batch, take, copy))

    def _read_batches(
        self, pieces: list[tuple[int, int, int]], needed: np.ndarray
    ) -> Iterator[tuple[list[int], pa.RecordBatch, np.ndarray]]:
        """Record batches holding needed rows, with those rows' stream indices and positions in the batch.

        Row groups without a needed row (all consumed before a resume) are not read.
        """
        offset = 0
        for index, lo, hi in pieces:
            piece_needed = needed[offset:offset + hi - lo]
            if piece_needed.any():
                file = self.files[index]
                with open_parquet(file.url, self.storage_options, self.output_dir) as parquet:
                    self._check_same_format(file.url, parquet.schema_arrow)
                    if parquet.metadata.num_rows != file.rows:
                        raise ValueError(f"data file {file.url} holds {parquet.metadata.num_rows} rows, the "
                                         f"manifest says {file.rows}: it was changed after the commit")
                    group_start = 0
                    for group in range(parquet.metadata.num_row_groups):
                        group_rows = parquet.metadata.row_group(group).num_rows
                        first, last = max(lo, group_start), min(hi, group_start + group_rows)
                        if first < last and piece_needed[first - lo:last - lo].any():
                            batch_start = group_start
                            for batch in parquet.iter_batches(self.batch_rows, row_groups=[group],
                                                              columns=self._read_columns, use_threads=False):
                                rows = np.arange(max(first, batch_start), min(last, batch_start + batch.num_rows))
                                rows = rows[piece_needed[rows - lo]]
                                if len(rows):
                                    yield (offset + rows - lo).tolist(), batch, rows - batch_start
                                batch_start += batch.num_rows
                        group_start += group_rows
            offset += hi - lo

    @property
    def _read_columns(self) -> list[str]:
        return [*READ_COLUMNS, *self.columns]

    def _check_same_format(self, url: str, schema: pa.Schema) -> None:
        meta = read_format_metadata(schema)
        differing = [name for name in FORMAT_FIELDS if meta.get(name) != self.meta.get(name)]
        if differing:
            details = ", ".join(f"{name} {meta.get(name)!r} vs {self.meta.get(name)!r}" for name in differing)
            raise ValueError(
                f"{url}: its atr metadata differs from {self.files[0].url} ({details}); the manifest mixes outputs "
                "of different configs"
            )
        for name in self._read_columns:
            if name not in schema.names or schema.field(name).type != self.schema.field(name).type:
                found = schema.field(name).type if name in schema.names else "missing"
                raise ValueError(f"{url}: column {name!r} is {found}, expected {self.schema.field(name).type}")
