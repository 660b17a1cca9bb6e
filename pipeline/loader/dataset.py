"""A resumable torch ``IterableDataset`` over a compress output, read in the order of :mod:`pipeline.loader.order`.

Reading. A worker reads the row groups holding its positions whole, one ahead in a thread (pyarrow releases the
GIL), and keeps a row group only while its shuffle window still owes one of its rows; a sample is views into its
row group (tokens in the stored dtype are not copied until collation).

Resume. The state counts, per worker of this rank, the samples the training loop has received, and records the
set of positions they were. A resumed worker with the same settings recomputes its order, drops the first
``consumed`` indices, and reads only row groups that still hold rows it owes, so nothing is repeated or skipped.
With another world size or worker count, pass every old rank's state (a list): their union is split anew. With
DataLoader workers the count is kept by :class:`pipeline.loader.dataloader.PrunedTokenLoader`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.loader.order import Progress, decode_mask, encode_mask, file_order, split_range, window_order
from pipeline.loader.reading import (
    LocalCache,
    RowChunk,
    SampleDecoder,
    TarChunk,
    committed_output,
    iter_tar_samples,
    open_parquet,
    passthrough_to_read,
    token_columns,
)
from pipeline.output.format import FORMAT_FIELDS, TORCH_DTYPES, is_quantized, read_format_metadata

STATE_VERSION = 3  # 3: shuffle windows end where a data file does
DEFAULT_BUFFER_BYTES = 128 << 20
T = TypeVar("T")


def prefetch(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Run ``items`` in a background thread, at most ``depth`` items ahead *including the one being made* (the
    next row group is read only once the consumer took the previous one); its errors re-raise here."""
    slots: queue.Queue = queue.Queue()
    credits = threading.Semaphore(depth)
    stopped = threading.Event()

    def wait_credit() -> bool:
        while not stopped.is_set():
            if credits.acquire(timeout=0.05):
                return True
        return False

    def produce() -> None:
        try:
            iterator = iter(items)
            while wait_credit():
                try:
                    item = next(iterator)
                except StopIteration:
                    slots.put((False, None))
                    return
                slots.put((True, item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            slots.put((False, exc))
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
            credits.release()
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

    Each sample: ``key``, ``tokens`` ``[n_kept, D]`` (float32, or ``tokens_dtype``; ``None`` keeps the stored
    dtype, which reads without a copy and halves what crosses to the training loop: cast on the device; for int8
    and float8_e4m3 the raw values and their float32 ``token_scales`` ``[n_kept]``, dequantized on the device by
    :func:`pipeline.output.format.dequantize`, as :mod:`pipeline.vlm.feed` does),
    ``positions`` int64 ``[n_kept]``, ``n_tokens``, ``grid`` ``(rows, cols)``, ``side`` and the requested
    passthrough ``columns`` (default: ``caption`` when stored). Rank and world size come from the arguments, else
    from ``torch.distributed`` at construction.

    The shuffle window holds about ``shuffle_buffer_bytes`` of stored rows (the manifest's mean row size), at most
    ``shuffle_buffer`` rows when given; a worker holds one window plus the row group it reads ahead. With
    ``cache_dir``, remote data files are copied there whole on first read (at most ``cache_bytes`` in all, least
    recently used first out) and read locally after.
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
        shuffle_buffer: int | None = None,
        shuffle_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        columns: Sequence[str] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        tokens_dtype: torch.dtype | None = torch.float32,
        cache_dir: str | None = None,
        cache_bytes: int = 64 << 30,
    ) -> None:
        super().__init__()
        if (shuffle_buffer is not None and shuffle_buffer < 1) or shuffle_buffer_bytes < 1:
            raise ValueError("shuffle_buffer and shuffle_buffer_bytes must be at least 1")
        self.storage_options = dict(storage_options or {})
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = _distributed_rank_world(rank, world_size)
        output = committed_output(path_or_manifest, self.storage_options)
        self.output_dir, self.files, self.schema, self.meta = output.output_dir, output.files, output.schema, output.meta
        self.data_fingerprint, self.kind = output.fingerprint, output.kind
        self.cache = LocalCache(cache_dir, cache_bytes) if cache_dir else None
        self.total_rows = sum(f.rows for f in self.files)
        row_bytes = max(1, sum(f.bytes for f in self.files) // max(1, self.total_rows))
        window = max(1, shuffle_buffer_bytes // row_bytes)
        self.shuffle_buffer = min(window, shuffle_buffer) if shuffle_buffer is not None else window
        self.columns = passthrough_to_read(self.schema, columns)
        if tokens_dtype is None and not is_quantized(self.meta["dtype"]):
            tokens_dtype = TORCH_DTYPES[self.meta["dtype"]]
        self.decoder = SampleDecoder(
            self.meta["dtype"], self.meta["dim"], self.meta["side"], tuple(self.columns), tokens_dtype
        )
        self.epoch = 0
        self.progress: Progress | None = None
        self.base: np.ndarray | None = None  # positions of this epoch emitted before the current split
        self._counted_by_loader = False
        self._elastic_base: np.ndarray | None = None  # every old rank's emitted set, after loading all their states

    # ----------------------------------------------------------------------------------------- epochs and order

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order; a new epoch starts from its beginning."""
        if epoch != self.epoch:
            self.epoch, self.progress, self.base, self._elastic_base = epoch, None, None, None

    def _remaining(self) -> np.ndarray:
        positions = np.arange(self.total_rows, dtype=np.int64)
        return positions if self.base is None else positions[~self.base]

    def _base_tag(self) -> int:
        return 0 if self.base is None else zlib.crc32(np.packbits(self.base).tobytes())

    def stream_positions(self, workers_per_rank: int, stream: int, remaining: np.ndarray | None = None) -> np.ndarray:
        """Canonical positions of worker stream ``stream`` of this rank, in its emission order."""
        remaining = self._remaining() if remaining is None else remaining
        global_stream = self.rank * workers_per_rank + stream
        lo, hi = split_range(len(remaining), self.world_size * workers_per_rank, global_stream)
        positions = remaining[lo:hi]
        if not self.shuffle:
            return positions
        rng = np.random.default_rng([self.seed, self.epoch, self._base_tag(), global_stream])
        files = np.searchsorted(self._file_starts(), positions, side="right")
        breaks = (np.flatnonzero(np.diff(files)) + 1).tolist()
        return positions[window_order(len(positions), self.shuffle_buffer, rng, breaks)]

    def _file_starts(self) -> np.ndarray:
        """The canonical position of each file's first row, in this epoch's file order."""
        order = file_order(len(self.files), self.seed, self.epoch, self.shuffle)
        return np.concatenate([[0], np.cumsum([self.files[i].rows for i in order])]).astype(np.int64)

    def stream_sizes(self, workers_per_rank: int) -> list[int]:
        parts, first, n = self.world_size * workers_per_rank, self.rank * workers_per_rank, len(self._remaining())
        return [hi - lo for lo, hi in (split_range(n, parts, first + w) for w in range(workers_per_rank))]

    def progress_for(self, workers_per_rank: int) -> Progress:
        """This epoch's progress for ``workers_per_rank`` streams; refuses a state saved with another count."""
        if self.progress is not None and len(self.progress.consumed) != workers_per_rank and \
                self._elastic_base is not None:
            self._rebase(self._elastic_base)
        sizes = self.stream_sizes(workers_per_rank)
        if self.progress is None:
            return Progress(sizes, [0] * workers_per_rank)
        if len(self.progress.consumed) != workers_per_rank:
            raise ValueError(
                f"loader state was saved with {len(self.progress.consumed)} worker(s) per rank, but this loader "
                f"runs {workers_per_rank}; to change the worker count or world size, load the states of every "
                "rank of the saved run (a list) and the rest of the epoch is split anew"
            )
        if any(c > s for c, s in zip(self.progress.consumed, sizes)):
            raise ValueError("loader state counts more samples than the workers' shares hold; wrong output?")
        return dataclasses.replace(self.progress, sizes=sizes)

    def begin_iteration(self, workers_per_rank: int) -> Progress:
        """Main process, before workers start: move past a finished epoch, then fix the progress to count into."""
        progress = self.progress_for(workers_per_rank)
        if progress.complete:
            self.epoch, self.base, self._elastic_base = self.epoch + 1, None, None
            progress = Progress(self.stream_sizes(workers_per_rank), [0] * workers_per_rank)
        self.progress = progress
        return progress

    def emitted(self) -> np.ndarray:
        """This epoch's positions the training loop received from this rank (and, after an elastic resume, from
        every rank before it), as a bool mask."""
        mask = np.zeros(self.total_rows, dtype=bool) if self.base is None else self.base.copy()
        progress = self.progress
        if progress is not None:
            remaining = self._remaining()
            for stream, count in enumerate(progress.consumed):
                if count:
                    mask[self.stream_positions(len(progress.consumed), stream, remaining)[:count]] = True
        return mask

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        progress = self.progress
        return {
            "version": STATE_VERSION, "seed": self.seed, "epoch": self.epoch, "world_size": self.world_size,
            "rank": self.rank, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
            "data": self.data_fingerprint, "rows": self.total_rows,
            "workers_per_rank": len(progress.consumed) if progress else None,
            "consumed": list(progress.consumed) if progress else [],
            "next_worker": progress.next_worker if progress else 0,
            "base": None if self.base is None else encode_mask(self.base),
            "emitted": encode_mask(self.emitted()),
        }

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Resume from this rank's state (same world size and workers), or from the states of every rank of the
        saved run (a list, any world size and workers: the epoch's remaining samples are split over this run)."""
        states = [state] if isinstance(state, Mapping) else list(state)
        if not states:
            raise ValueError("no loader state to load")
        current = self.state_dict()
        for saved in states:
            if saved.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {saved.get('version')!r}; this code reads {STATE_VERSION}")
            for name in ("seed", "shuffle", "shuffle_buffer", "data", "epoch"):
                expected = states[0][name] if name == "epoch" else current[name]
                if saved.get(name) != expected:
                    what = "the output's files" if name == "data" else f"{name}={expected!r}"
                    raise ValueError(
                        f"loader state has {name}={saved.get(name)!r}, but this dataset has {what}; "
                        "resume with the same output, seed and shuffle settings (and states of one epoch)"
                    )
        old_world = int(states[0]["world_size"])
        if any(int(s["world_size"]) != old_world for s in states):
            raise ValueError("loader states from runs of different world sizes")
        ranks = sorted(int(s["rank"]) for s in states)
        union = None
        if ranks == list(range(old_world)):
            union = np.zeros(self.total_rows, dtype=bool)
            for saved in states:
                union |= decode_mask(saved["emitted"], self.total_rows)
        self.epoch = int(states[0]["epoch"])
        if old_world == self.world_size:
            own = [s for s in states if s["rank"] == self.rank]
            if not own:
                raise ValueError(f"loader state is rank {ranks}'s; this is rank {self.rank}")
            self._load_own(own[0])
            self._elastic_base = union  # taken if this run has another worker count
            return
        if union is None:
            raise ValueError(
                f"loader state has world_size={old_world}, this run has world_size={self.world_size}: load the "
                f"states of all {old_world} ranks of the saved run (a list, got ranks {ranks}) to resume elastically"
            )
        self._rebase(union)

    def _rebase(self, emitted: np.ndarray) -> None:
        """Split what ``emitted`` leaves of the epoch over this run's workers (elastic resume)."""
        self.base, self.progress, self._elastic_base = (emitted if emitted.any() else None), None, None

    def _load_own(self, state: Mapping[str, Any]) -> None:
        consumed = [int(c) for c in state.get("consumed") or []]
        if any(c < 0 for c in consumed) or (consumed and len(consumed) != state.get("workers_per_rank")):
            raise ValueError("loader state has an invalid 'consumed' list")
        self.base = None if state.get("base") is None else decode_mask(state["base"], self.total_rows)
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
        wanted = self.stream_positions(workers, stream)[progress.consumed[stream]:]
        if not len(wanted):
            return
        pending: dict[int, tuple[RowChunk, int]] = {}
        chunks = prefetch(self._read_chunks(np.sort(wanted)), depth=1)
        try:
            for position in wanted.tolist():
                while position not in pending:
                    positions, chunk, rows = next(chunks)
                    pending.update(zip(positions, ((chunk, row) for row in rows)))
                chunk, row = pending.pop(position)
                yield chunk.sample(row)
        finally:
            chunks.close()

    def _read_chunks(self, needed: np.ndarray) -> Iterator[tuple[list[int], RowChunk, list[int]]]:
        """``(positions, chunk, rows in chunk)`` for each row group holding a needed position, in stream order.

        ``needed`` is sorted; row groups without a needed row (consumed before a resume, or another worker's) are
        not read, and each one read is read whole, once.
        """
        order = file_order(len(self.files), self.seed, self.epoch, self.shuffle)
        starts = self._file_starts()
        file_of = np.searchsorted(starts, needed, side="right") - 1
        for slot in np.unique(file_of).tolist():
            file = self.files[order[slot]]
            rows = needed[file_of == slot] - starts[slot]
            url = file.url if self.cache is None else self.cache.path_for(file, self.storage_options, self.output_dir)
            if self.kind == "webdataset":
                yield from self._read_tar(url, rows, int(starts[slot]))
                continue
            with open_parquet(url, self.storage_options, self.output_dir) as parquet:
                self._check_same_format(file.url, parquet.schema_arrow)
                if parquet.metadata.num_rows != file.rows:
                    raise ValueError(f"data file {file.url} holds {parquet.metadata.num_rows} rows, the "
                                     f"manifest says {file.rows}: it was changed after the commit")
                group_start = 0
                for group in range(parquet.metadata.num_row_groups):
                    group_rows = parquet.metadata.row_group(group).num_rows
                    lo, hi = np.searchsorted(rows, [group_start, group_start + group_rows])
                    if lo < hi:
                        table = parquet.read_row_group(group, columns=self._read_columns, use_threads=False)
                        batch = table.combine_chunks().to_batches()[0]
                        in_group = rows[lo:hi]
                        yield ((in_group + starts[slot]).tolist(), self.decoder.chunk(batch),
                               (in_group - group_start).tolist())
                    group_start += group_rows

    def _read_tar(self, url: str, rows: np.ndarray, start: int, chunk_rows: int = 32):
        """A tar's needed samples in chunks of ``chunk_rows`` (a tar has no row groups; its members stream)."""
        positions, members = [], []
        for row, sample in iter_tar_samples(url, self.storage_options, self.output_dir, rows.tolist()):
            positions.append(start + row)
            members.append(sample)
            if len(members) == chunk_rows:
                yield positions, TarChunk(self.decoder, members), list(range(len(members)))
                positions, members = [], []
        if members:
            yield positions, TarChunk(self.decoder, members), list(range(len(members)))

    @property
    def _read_columns(self) -> list[str]:
        return [*token_columns(self.meta["dtype"]), *self.columns]

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
