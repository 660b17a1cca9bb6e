"""Training-side readers of a compress output: a resumable torch ``IterableDataset`` and a Ray Data path.

Order. Each epoch the manifest's files are permuted with ``(seed, epoch)`` and concatenated; the ``N`` rows are
cut into ``world_size * num_workers`` contiguous, balanced ranges (sizes differ by at most one), one per global
worker ``rank * num_workers + worker_id``. A worker streams its range row group by row group and passes it
through a bounded shuffle buffer seeded by ``(seed, epoch, global worker)``. The buffer runs on row *indices*
first, so a worker's whole output order is a pure function of the manifest's row counts and those numbers.

Resume. The state counts, per worker of this rank, the samples the training loop has received. A resumed worker
recomputes its order, drops the first ``consumed`` indices, and reads only row groups that still hold rows it
owes (the shuffle buffer is refilled from those rows alone), so nothing is repeated or skipped.

Counting with DataLoader workers (:class:`PrunedTokenLoader`). With ``in_order=True`` a torch DataLoader hands
out batches round-robin over its workers in worker-id order starting at worker 0, skipping a worker once it has
yielded all its batches. The loader replays that rule on each batch it yields (counting ``len(batch["keys"])``
samples), so it knows which worker produced it. A resumed iterator starts its round-robin at the worker that was
due next: DataLoader worker ``i`` serves worker stream ``(i + next_worker) % num_workers``, which makes the
resumed sequence identical to the uninterrupted one. Iterating the dataset directly in the main process
(no workers) counts each yielded sample itself.

Ranks' shares differ by at most ``num_workers`` samples, so their batch counts may differ by one at the end of
an epoch; DDP training should stop each epoch at the shortest rank's step count (or use ``join``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import posixpath
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import stable_hash
from pipeline.loader.collate import TokenBudgetBatcher, pack_collate, pad_collate
from pipeline.output.format import (
    FORMAT_FIELDS,
    MANIFEST_NAME,
    decode_tokens,
    passthrough_columns,
    read_format_metadata,
    read_manifest,
)
from pipeline.storage import filesystem_for

STATE_VERSION = 1
T = TypeVar("T")
READ_COLUMNS = ("key", "n_tokens", "tokens", "positions", "grid_rows", "grid_cols")


@dataclass(frozen=True)
class DataFile:
    url: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class CommittedOutput:
    """What the manifest lists, checked to be present, plus the format every file must share."""

    output_dir: str
    files: list[DataFile]
    schema: pa.Schema
    meta: dict[str, Any]
    fingerprint: str  # of the listed files and their row counts


def data_file_urls(path_or_manifest: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The committed data files of an output, in manifest order: for ``output.format=webdataset``,
    ``webdataset.WebDataset(urls).map(decode_wds_sample)`` streams them (local paths; ``pipe:`` URLs for S3)."""
    output_dir = output_dir_of(path_or_manifest)
    return [f"{output_dir}/{m['path']}" for m in read_manifest(output_dir, dict(storage_options or {}))]


def committed_output(path_or_manifest: str, storage_options: Mapping[str, Any] | None) -> CommittedOutput:
    output_dir = output_dir_of(path_or_manifest)
    storage_options = dict(storage_options or {})
    manifest = read_manifest(output_dir, storage_options)
    if not manifest:
        raise ValueError(f"{output_dir}/{MANIFEST_NAME} lists no data files")
    if any(m["path"].endswith(".tar") for m in manifest):
        raise ValueError(f"{output_dir} holds WebDataset tars (output.format=webdataset); this loader reads Parquet "
                         "outputs. Stream the tars with webdataset.WebDataset(pipeline.loader.data_file_urls(OUTPUT))"
                         ".map(pipeline.output.format.decode_wds_sample), or compress with output.format=parquet")
    files = [DataFile(f"{output_dir}/{m['path']}", m["rows"], m["bytes"]) for m in manifest]
    _check_files_present(files, storage_options, output_dir)
    with _open_parquet(files[0].url, storage_options, output_dir) as parquet:
        schema = parquet.schema_arrow
    missing = [name for name in READ_COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(f"{files[0].url}: not an atr data file (missing columns {', '.join(missing)})")
    fingerprint = stable_hash([[m["path"], m["rows"]] for m in manifest])
    return CommittedOutput(output_dir, files, schema, read_format_metadata(schema), fingerprint)


# --------------------------------------------------------------------------------------------- pure planning


def output_dir_of(path_or_manifest: str) -> str:
    path = path_or_manifest.rstrip("/")
    return path.rsplit("/", 1)[0] if path.endswith("/" + MANIFEST_NAME) else path


def split_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """Contiguous, balanced: part ``p`` of ``parts`` gets ``[p*total//parts, (p+1)*total//parts)``."""
    return part * total // parts, (part + 1) * total // parts


def file_order(n_files: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_files)
    return np.random.default_rng([seed, epoch]).permutation(n_files)


def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a bounded shuffle buffer emits stream indices ``0..n-1`` in.

    Fill the buffer with the first ``buffer_size`` items; then each new item replaces a uniformly drawn buffered
    one, which is emitted; at the end the rest leave in random order. The item emitted ``t``-th always has
    stream index ``< t + buffer_size``, which bounds the rows a reader must hold.
    """
    size = min(buffer_size, n)
    if size <= 1:
        return np.arange(n)
    buffer = list(range(size))
    order = []
    for incoming, slot in zip(range(size, n), rng.integers(0, size, n - size).tolist()):
        order.append(buffer[slot])
        buffer[slot] = incoming
    order.extend(buffer[i] for i in rng.permutation(size).tolist())
    return np.asarray(order, dtype=np.int64)


def stream_pieces(files: Sequence[DataFile], order: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
    """``(file index, first row, end row)`` pieces covering rows ``[start, stop)`` of the files in ``order``."""
    pieces, offset = [], 0
    for index in order.tolist():
        rows = files[index].rows
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            pieces.append((index, lo - offset, hi - offset))
        offset += rows
    return pieces


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


@dataclass
class Progress:
    """Samples of this epoch the training loop has received, per worker stream of this rank."""

    sizes: list[int]
    consumed: list[int]
    next_worker: int = 0

    @property
    def complete(self) -> bool:
        return self.consumed == self.sizes

    def record(self, count: int) -> None:
        """Attribute a received batch to the stream DataLoader's round-robin says produced it."""
        streams = len(self.sizes)
        for _ in range(streams):
            if self.consumed[self.next_worker] < self.sizes[self.next_worker]:
                break
            self.next_worker = (self.next_worker + 1) % streams
        stream = self.next_worker
        if self.consumed[stream] + count > self.sizes[stream]:
            raise RuntimeError(
                f"received {count} samples from worker stream {stream}, which had "
                f"{self.sizes[stream] - self.consumed[stream]} left: the DataLoader did not deliver batches in "
                "in-order round-robin (was in_order=False or the dataset wrapped?)"
            )
        self.consumed[stream] += count
        self.next_worker = (stream + 1) % streams


# --------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class SampleDecoder:
    """Stored rows -> sample dicts, sliced from Arrow buffers with numpy (no per-token Python work)."""

    dtype: str
    dim: int
    side: int
    columns: tuple[str, ...]  # passthrough
    tokens_dtype: torch.dtype = torch.float32

    def rows(self, batch: pa.RecordBatch, take: np.ndarray, copy: bool) -> Iterator[tuple]:
        """Compact row tuples; ``copy`` detaches them from the batch's buffers (rows held in a shuffle buffer)."""
        tokens = batch.column("tokens")
        token_offsets = np.frombuffer(tokens.buffers()[1], np.int32, len(tokens) + 1, tokens.offset * 4)
        token_data = np.frombuffer(tokens.buffers()[2], np.uint8)
        positions = batch.column("positions")
        position_offsets = positions.offsets.to_numpy()
        position_values = positions.values.to_numpy().astype(np.int64)  # once per batch; rows take views
        keys = batch.column("key").to_pylist()
        n_tokens = batch.column("n_tokens").to_pylist()
        grids = list(zip(batch.column("grid_rows").to_pylist(), batch.column("grid_cols").to_pylist()))
        passthrough = list(zip(*(batch.column(name).to_pylist() for name in self.columns))) or [()] * len(keys)
        for i in take.tolist():
            token_bytes = token_data[token_offsets[i]:token_offsets[i + 1]]
            yield (
                keys[i],
                token_bytes.copy() if copy else token_bytes,
                position_values[position_offsets[i]:position_offsets[i + 1]],
                n_tokens[i],
                grids[i],
                passthrough[i],
            )

    def sample(self, row: tuple) -> dict[str, Any]:
        key, token_bytes, positions, n_tokens, grid, passthrough = row
        return {
            "key": key,
            "tokens": decode_tokens(token_bytes, self.dtype, self.dim, self.tokens_dtype),
            "positions": torch.from_numpy(positions),
            "n_tokens": n_tokens,
            "grid": grid,
            "side": self.side,
            **dict(zip(self.columns, passthrough)),
        }

    def samples(self, table: pa.Table) -> list[dict[str, Any]]:
        return [
            self.sample(row)
            for batch in table.to_batches()
            for row in self.rows(batch, np.arange(batch.num_rows), copy=False)
        ]


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
        self.columns = _passthrough_to_read(self.schema, columns)
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
                with _open_parquet(file.url, self.storage_options, self.output_dir) as parquet:
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


def _passthrough_to_read(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    available = passthrough_columns(schema)
    if columns is None:
        return ["caption"] if "caption" in available else []
    unknown = [name for name in columns if name not in available]
    if unknown:
        raise ValueError(f"columns {unknown} are not stored; passthrough columns here: {available}")
    return list(columns)


@contextlib.contextmanager
def _open_parquet(url: str, storage_options: Mapping[str, Any], output_dir: str) -> Iterator[pq.ParquetFile]:
    """``ParquetFile`` over fsspec (native reads for local paths); a missing file is named in the error."""
    fs, path = filesystem_for(url, dict(storage_options))
    handle = None
    try:
        handle = None if isinstance(fs, LocalFileSystem) else fs.open(path, "rb")
        parquet = pq.ParquetFile(path if handle is None else handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {url} listed in {output_dir}/{MANIFEST_NAME} is missing") from None
    try:
        yield parquet
    finally:
        parquet.close()
        if handle is not None:
            handle.close()


def _check_files_present(files: Sequence[DataFile], storage_options: Mapping[str, Any], output_dir: str) -> None:
    """One listing per folder: every manifest file must exist with the size the manifest recorded."""
    fs, _ = filesystem_for(output_dir, dict(storage_options))
    by_folder: dict[str, list[tuple[str, DataFile]]] = {}
    for file in files:
        path = filesystem_for(file.url, dict(storage_options))[1]
        by_folder.setdefault(posixpath.dirname(path), []).append((path, file))
    for folder, entries in by_folder.items():
        fs.invalidate_cache(folder)
        listing = fs.ls(folder, detail=True) if fs.exists(folder) else []
        sizes = {info["name"].rstrip("/"): info["size"] for info in listing}
        for path, file in entries:
            if path not in sizes:
                raise FileNotFoundError(f"data file {file.url} listed in {output_dir}/{MANIFEST_NAME} is missing")
            if sizes[path] != file.bytes:
                raise ValueError(
                    f"data file {file.url} has {sizes[path]} bytes, the manifest says {file.bytes}: it was "
                    "changed after the commit"
                )


# --------------------------------------------------------------------------------------------- DataLoader


def _samples_in(batch: Any) -> int:
    if isinstance(batch, Mapping) and "keys" in batch:
        return len(batch["keys"])
    if isinstance(batch, Mapping) and "key" in batch:
        return 1
    raise TypeError("collate_fn must return a dict with 'keys' (one per sample) so the loader can count for resume")


class PrunedTokenLoader(DataLoader):
    """A DataLoader over a :class:`PrunedTokenDataset` that counts what it yields, for exact resume.

    Batches are ``batch_size`` samples (default collate :func:`pad_collate`) or, with ``max_tokens``, at most
    that many kept tokens each, packed inside the workers (default collate :func:`pack_collate`). Its
    ``state_dict()`` is the dataset's, valid after any yielded batch.
    """

    def __init__(
        self,
        dataset: PrunedTokenDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        max_samples: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep each worker's first epoch and progress; leave it off")
        if kwargs.get("in_order") is False:
            raise ValueError("in_order=False breaks the round-robin that resume relies on; leave it True")
        if batch_size is not None and max_tokens is not None:
            raise ValueError("pass batch_size or max_tokens, not both")
        if max_samples is not None and max_tokens is None:
            raise ValueError("max_samples caps token-budget batches; it needs max_tokens")
        self.pruned = dataset
        dataset._counted_by_loader = True
        if max_tokens is not None:
            source = TokenBudgetBatcher(dataset, max_tokens, collate_fn or pack_collate, max_samples)
            super().__init__(source, batch_size=None, num_workers=num_workers, **kwargs)
        else:
            collate = collate_fn or (pad_collate if batch_size is not None else None)
            super().__init__(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        progress = self.pruned.begin_iteration(max(1, self.num_workers))
        for batch in super().__iter__():
            progress.record(_samples_in(batch))
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.pruned.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.pruned.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pruned.load_state_dict(state)
        self.pruned.progress_for(max(1, self.num_workers))


# --------------------------------------------------------------------------------------------- Ray Data


def read_pruned(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    columns: Sequence[str] | None = None,
    **read_kwargs: Any,
):
    """A ``ray.data.Dataset`` of the manifest's (committed) files; pair with :func:`ray_collate_fn`."""
    import pyarrow.fs
    import ray.data

    output = committed_output(path, storage_options)
    fs, _ = filesystem_for(output.output_dir, dict(storage_options or {}))
    arrow_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    paths = [filesystem_for(f.url, dict(storage_options or {}))[1] for f in output.files]
    columns = [*READ_COLUMNS, *_passthrough_to_read(output.schema, columns)]
    return ray.data.read_parquet(paths, filesystem=arrow_fs, columns=columns, **read_kwargs)


def ray_collate_fn(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    collate: Callable[[list[dict[str, Any]]], Any] = pad_collate,
):
    """An ``iter_torch_batches(collate_fn=...)`` for :func:`read_pruned`: Arrow batches -> ``collate(samples)``."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    meta = committed_output(path, storage_options).meta

    class PrunedBatchCollate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> Any:
            columns = tuple(name for name in batch.column_names if name not in READ_COLUMNS)
            return collate(SampleDecoder(meta["dtype"], meta["dim"], meta["side"], columns).samples(batch))

    return PrunedBatchCollate()
