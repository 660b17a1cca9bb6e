"""A compress output's committed files as its manifest lists them: checked, opened, and rows decoded to samples."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tarfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import stable_hash
from pipeline.output.format import (
    CARD_NAME,
    PASSTHROUGH_COLUMNS,
    SCALE_NUMPY,
    SCALES_COLUMN,
    STORAGE_NUMPY,
    TORCH_DTYPES,
    card_format_metadata,
    decode_tokens,
    decode_wds_sample,
    dequantize,
    is_quantized,
    passthrough_columns,
    read_format_metadata,
    stored_tokens,
)
from pipeline.output.manifest import MANIFEST_NAME, read_manifest
from pipeline.storage import filesystem_for, is_local

READ_COLUMNS = ("key", "n_tokens", "tokens", "positions", "grid_rows", "grid_cols")


def token_columns(dtype: str) -> tuple[str, ...]:
    """The columns a sample is read from: :data:`READ_COLUMNS`, plus the per-token scales of a quantized dtype."""
    return (*READ_COLUMNS, SCALES_COLUMN) if is_quantized(dtype) else READ_COLUMNS


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
    kind: str = "parquet"  # or "webdataset" (tars)


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
    tars = [m["path"].endswith(".tar") for m in manifest]
    files = [DataFile(f"{output_dir}/{m['path']}", m["rows"], m["bytes"]) for m in manifest]
    _check_files_present(files, storage_options, output_dir)
    fingerprint = stable_hash([[m["path"], m["rows"]] for m in manifest])
    if any(tars):
        if not all(tars):
            raise ValueError(f"{output_dir}/{MANIFEST_NAME} mixes WebDataset tars and Parquet files")
        meta = json.loads(next(iter_tar_samples(files[0].url, storage_options, output_dir, [0]))[1]["json"])
        card = _read_card(output_dir, storage_options)
        if card is not None:  # outputs before dataset.json describe themselves only by dtype, dim and side
            meta |= card_format_metadata(card)
        schema = pa.schema([pa.field(name, pa.string()) for name in PASSTHROUGH_COLUMNS])
        return CommittedOutput(output_dir, files, schema, meta, fingerprint, kind="webdataset")
    with open_parquet(files[0].url, storage_options, output_dir) as parquet:
        schema = parquet.schema_arrow
    missing = [name for name in READ_COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(f"{files[0].url}: not an atr data file (missing columns {', '.join(missing)})")
    return CommittedOutput(output_dir, files, schema, read_format_metadata(schema), fingerprint)


def _read_card(output_dir: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    fs, path = filesystem_for(f"{output_dir}/{CARD_NAME}", dict(storage_options))
    try:
        with fs.open(path, "rb") as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def output_dir_of(path_or_manifest: str) -> str:
    path = path_or_manifest.rstrip("/")
    return path.rsplit("/", 1)[0] if path.endswith("/" + MANIFEST_NAME) else path


def passthrough_to_read(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    available = [name for name in passthrough_columns(schema) if name in schema.names]
    if columns is None:
        return ["caption"] if "caption" in available else []
    unknown = [name for name in columns if name not in available]
    if unknown:
        raise ValueError(f"columns {unknown} are not stored; passthrough columns here: {available}")
    return list(columns)


@contextlib.contextmanager
def open_parquet(url: str, storage_options: Mapping[str, Any], output_dir: str) -> Iterator[pq.ParquetFile]:
    """``ParquetFile`` over fsspec (memory-mapped for local paths); a missing file is named in the error."""
    fs, path = filesystem_for(url, dict(storage_options))
    handle = None
    try:
        handle = None if isinstance(fs, LocalFileSystem) else fs.open(path, "rb")
        # Memory-mapped locally: a row group's column chunks are read from the page cache without a copy into
        # freshly allocated (page-faulting) buffers, half the time of a read (26 vs 50 ms per 128 MB group).
        parquet = pq.ParquetFile(path, memory_map=True) if handle is None else pq.ParquetFile(handle)
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


def _offsets(array: pa.Array) -> np.ndarray:
    """A binary or list array's int32 offsets as int64, read from its buffer (``Array.to_numpy`` would import
    pandas: 0.15 s of a loader's first batch)."""
    return np.frombuffer(array.buffers()[1], np.int32, len(array) + 1, array.offset * 4).astype(np.int64)


@dataclass(frozen=True)
class SampleDecoder:
    """Stored rows -> sample dicts, sliced from Arrow buffers with numpy (no per-token Python work)."""

    dtype: str
    dim: int
    side: int
    columns: tuple[str, ...]  # passthrough
    tokens_dtype: torch.dtype | None = torch.float32  # None: as stored, with token_scales when quantized

    def chunk(self, batch: pa.RecordBatch) -> RowChunk:
        """A row group's rows, decoded once per group, so a sample is a few views (no copy per sample)."""
        tokens = batch.column("tokens")
        token_offsets = _offsets(tokens)
        token_data = np.frombuffer(tokens.buffers()[2], np.uint8)
        view = None
        stored = TORCH_DTYPES.get(self.dtype)
        if stored is not None and self.dtype in STORAGE_NUMPY:
            # Plain float storage: the tokens are a view of the Arrow buffer (read-only; a sample in another dtype
            # is converted from it, one in the stored dtype is copied only by collation), kept alive by the chunk.
            itemsize = STORAGE_NUMPY[self.dtype].itemsize
            record = itemsize * self.dim
            first, last = int(token_offsets[0]), int(token_offsets[-1])
            if first % itemsize == 0 and (last - first) % record == 0:
                raw = token_data[first:last].view(STORAGE_NUMPY[self.dtype])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # not writable: nothing writes into it
                    view = torch.from_numpy(raw).view(stored).view(-1, self.dim)
                token_offsets = (token_offsets - first) // record
        scales = scale_offsets = None
        if is_quantized(self.dtype):  # one float32 per kept token, aligned with the token rows
            column = batch.column(SCALES_COLUMN)
            offsets = _offsets(column)
            data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
            scales = torch.from_numpy(data.view(SCALE_NUMPY).copy())  # 4 bytes a token: copied, aligned
            scale_offsets = (offsets - offsets[0]) // SCALE_NUMPY.itemsize
        positions = batch.column("positions")
        values = positions.values  # the whole child array: the offsets index it absolutely
        return RowChunk(
            decoder=self,
            scales=scales,
            scale_offsets=scale_offsets,
            keys=batch.column("key").to_pylist(),
            token_offsets=token_offsets,
            token_data=token_data,
            token_view=view,
            position_offsets=_offsets(positions),
            position_values=torch.from_numpy(
                np.frombuffer(values.buffers()[1], np.int32, len(values), values.offset * 4).astype(np.int64)),
            n_tokens=batch.column("n_tokens").to_pylist(),
            grids=list(zip(batch.column("grid_rows").to_pylist(), batch.column("grid_cols").to_pylist())),
            passthrough=[batch.column(name).to_pylist() for name in self.columns],
        )

    def samples(self, table: pa.Table) -> list[dict[str, Any]]:
        return [chunk.sample(i) for batch in table.to_batches() for chunk in [self.chunk(batch)]
                for i in range(batch.num_rows)]


@dataclass
class RowChunk:
    """One row group's rows; :meth:`sample` builds a sample dict from views into them."""

    decoder: SampleDecoder
    keys: list[str]
    token_offsets: np.ndarray  # token rows of ``token_view`` when set, else bytes of ``token_data``
    token_data: np.ndarray
    token_view: torch.Tensor | None
    scales: torch.Tensor | None  # quantized dtypes: float32 per token, rows ``scale_offsets``
    scale_offsets: np.ndarray | None
    position_offsets: np.ndarray
    position_values: torch.Tensor
    n_tokens: list[int]
    grids: list[tuple[int, int]]
    passthrough: list[list[Any]]

    def sample(self, i: int) -> dict[str, Any]:
        decoder = self.decoder
        lo, hi = int(self.token_offsets[i]), int(self.token_offsets[i + 1])
        scales = None
        if self.scales is not None:
            scales = self.scales[int(self.scale_offsets[i]):int(self.scale_offsets[i + 1])]
        raw = decoder.tokens_dtype is None  # the stored values, and a quantized dtype's scales beside them
        if self.token_view is not None:
            tokens = self.token_view[lo:hi]
            if scales is not None and not raw:
                tokens = dequantize(tokens, scales, decoder.tokens_dtype)
            elif not raw and tokens.dtype != decoder.tokens_dtype:
                tokens = tokens.to(decoder.tokens_dtype)
        elif raw:
            tokens = stored_tokens(self.token_data[lo:hi], decoder.dtype, decoder.dim)
        else:
            tokens = decode_tokens(self.token_data[lo:hi], decoder.dtype, decoder.dim, decoder.tokens_dtype,
                                   None if scales is None else scales.numpy())
        return {
            "key": self.keys[i],
            "tokens": tokens,
            **({SCALES_COLUMN: scales} if raw and scales is not None else {}),
            "positions": self.position_values[int(self.position_offsets[i]):int(self.position_offsets[i + 1])],
            "n_tokens": self.n_tokens[i],
            "grid": self.grids[i],
            "side": decoder.side,
            **{name: values[i] for name, values in zip(decoder.columns, self.passthrough)},
        }


def iter_tar_samples(
    url: str, storage_options: Mapping[str, Any], output_dir: str, rows: Sequence[int]
) -> Iterator[tuple[int, dict[str, bytes]]]:
    """``(row, members by suffix)`` of the tar's samples at ``rows`` (sorted), in order; a tar row is a run of
    members sharing a key. Members of other rows are skipped (seeked past on a seekable file), not read."""
    fs, path = filesystem_for(url, dict(storage_options))
    wanted = iter(rows)
    target = next(wanted, None)
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {url} listed in {output_dir}/{MANIFEST_NAME} is missing") from None
    with handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        row, key, sample = -1, None, None
        for member in tar:
            if target is None:
                break
            if not member.isfile():
                continue
            stem, _, suffix = member.name.partition(".")
            if "/" in member.name:  # keys may hold "/": the suffix starts at the last name's first dot
                folder, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                stem = f"{folder}/{stem}"
            if stem != key:
                if sample is not None:
                    yield row, sample
                    target = next(wanted, None)
                row, key = row + 1, stem
                sample = {"__key__": stem} if row == target else None
            if sample is not None:
                sample[suffix] = tar.extractfile(member).read()
        if sample is not None and target is not None:
            yield row, sample


@dataclass
class TarChunk:
    """Samples of a WebDataset tar, decoded with the format's own ``decode_wds_sample``."""

    decoder: SampleDecoder
    members: list[dict[str, bytes]]

    def sample(self, i: int) -> dict[str, Any]:
        sample = decode_wds_sample(self.members[i], self.decoder.tokens_dtype)
        for name in PASSTHROUGH_COLUMNS:
            if name not in self.decoder.columns:
                sample.pop(name, None)
        return sample


@dataclass(frozen=True)
class LocalCache:
    """Whole copies of remote data files under ``directory``, at most ``max_bytes`` in all (least recently used
    copies go first), like MosaicML's ``local=``: a second epoch reads no remote data file again.

    A data file is immutable once committed (a changed file is a new attempt name and size), so a copy is named by
    its URL and size and never revalidated. Copies land by rename, so DataLoader workers can share the folder.
    """

    directory: str
    max_bytes: int

    def path_for(self, file: DataFile, storage_options: Mapping[str, Any], output_dir: str) -> str:
        if is_local(file.url):
            return file.url
        name = hashlib.sha256(f"{file.url}|{file.bytes}".encode()).hexdigest()[:24]
        path = os.path.join(self.directory, name + os.path.splitext(file.url)[1])
        try:
            if os.path.getsize(path) == file.bytes:
                os.utime(path)  # recently used
                return path
        except OSError:
            pass
        if file.bytes > self.max_bytes:
            return file.url  # larger than the whole cache: read remotely
        os.makedirs(self.directory, exist_ok=True)
        self._evict(file.bytes)
        fs, remote = filesystem_for(file.url, dict(storage_options))
        partial = f"{path}.{os.getpid()}.partial"
        try:
            fs.get_file(remote, partial)
        except FileNotFoundError:
            raise FileNotFoundError(f"data file {file.url} listed in {output_dir}/{MANIFEST_NAME} is missing") from None
        os.replace(partial, path)
        return path

    def _evict(self, incoming: int) -> None:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and not entry.name.endswith(".partial"):
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + incoming <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another worker evicted it first
                os.unlink(path)
            total -= size
