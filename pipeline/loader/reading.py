"""A compress output's committed files as its manifest lists them: checked, opened, and rows decoded to samples."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import stable_hash
from pipeline.output.format import decode_tokens, passthrough_columns, read_format_metadata
from pipeline.output.manifest import MANIFEST_NAME, read_manifest
from pipeline.storage import filesystem_for

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
    with open_parquet(files[0].url, storage_options, output_dir) as parquet:
        schema = parquet.schema_arrow
    missing = [name for name in READ_COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(f"{files[0].url}: not an atr data file (missing columns {', '.join(missing)})")
    fingerprint = stable_hash([[m["path"], m["rows"]] for m in manifest])
    return CommittedOutput(output_dir, files, schema, read_format_metadata(schema), fingerprint)


def output_dir_of(path_or_manifest: str) -> str:
    path = path_or_manifest.rstrip("/")
    return path.rsplit("/", 1)[0] if path.endswith("/" + MANIFEST_NAME) else path


def passthrough_to_read(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    available = passthrough_columns(schema)
    if columns is None:
        return ["caption"] if "caption" in available else []
    unknown = [name for name in columns if name not in available]
    if unknown:
        raise ValueError(f"columns {unknown} are not stored; passthrough columns here: {available}")
    return list(columns)


@contextlib.contextmanager
def open_parquet(url: str, storage_options: Mapping[str, Any], output_dir: str) -> Iterator[pq.ParquetFile]:
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
