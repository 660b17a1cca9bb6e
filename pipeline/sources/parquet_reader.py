"""Parquet shards with an image-bytes column (img2dataset's layout, or Hugging Face's ``{bytes, path}`` struct)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.sources.samples import (
    IMAGE_EXTENSIONS,
    REST_OF_SHARD,
    Quarantined,
    RawSample,
    ShardRef,
    with_caption,
)
from pipeline.storage import open_verified

IMAGE_COLUMNS = (IMAGE_EXTENSIONS[0], "image", *IMAGE_EXTENSIONS[1:])
# Rows decoded into Python objects at a time: a few MB of images, whatever the row-group size.
BATCH_ROWS = 64
_BYTES_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary)
_SCALAR_TYPES = (
    pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
    pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
)


class _NoImageColumn(Exception):
    """The file has no usable image column; the message is the quarantine reason."""


class _TrackedFile:
    """A file whose own read errors stay apart from errors about the bytes it returned.

    pyarrow reports corrupt data as OSError, the same type a failing network read has; a read failure is
    systemic and must fail the shard, not quarantine it.
    """

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return self._f.read(size)
        except Exception as exc:
            self.error = exc
            raise

    @property
    def closed(self) -> bool:
        return self._f.closed

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True)
class _Layout:
    image: str
    key: str | None
    passthrough: list[str]

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.key, self.image, *self.passthrough) if c]


def read_parquet_shard(
    shard: ShardRef, cfg: InputConfig, storage_options: dict[str, Any]
) -> Iterator[RawSample | Quarantined]:
    with open_verified(shard.url, storage_options, shard.size, shard.fingerprint) as f:
        source = _TrackedFile(f)
        rows, total = 0, None
        try:
            parquet = pq.ParquetFile(source)
            total = parquet.metadata.num_rows
            layout = _layout(parquet.schema_arrow, cfg)
            # Row group by row group: iter_batches merges them, and damage in one would cost the rows before it.
            for row_group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(BATCH_ROWS, row_groups=[row_group], columns=layout.columns):
                    for row in batch.to_pylist():
                        yield _sample(shard.shard_id, row, rows, layout)
                        rows += 1
        except _NoImageColumn as exc:
            yield Quarantined(REST_OF_SHARD, shard.shard_id, f"{exc} ({total} rows)", samples=total)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # how pyarrow reports corrupt bytes
            if source.error is not None:
                raise source.error from exc
            # The footer, when it could be read, says how many rows the damage costs; otherwise count one.
            lost = None if total is None else max(1, total - rows)
            yield Quarantined(REST_OF_SHARD, shard.shard_id, f"corrupt parquet after row {rows}: {exc}", samples=lost)


def _layout(schema: pa.Schema, cfg: InputConfig) -> _Layout:
    names = schema.names
    candidates = (cfg.image_column,) if cfg.image_column else IMAGE_COLUMNS
    image = next((name for name in candidates if name in names), None)
    if image is None:
        raise _NoImageColumn(
            f"missing image column: none of {', '.join(candidates)} among {', '.join(names)}; set input.image_column"
        )
    image_type = schema.field(image).type
    if not (_is_bytes(image_type) or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        raise _NoImageColumn(f"missing image column: {image} has type {image_type}, expected binary or struct<bytes>")
    key = cfg.key_column if cfg.key_column in names else None
    passthrough = [f.name for f in schema if f.name not in (image, key) and _is_scalar(f.type)]
    return _Layout(image, key, passthrough)


def _sample(shard_id: str, row: dict[str, Any], index: int, layout: _Layout) -> RawSample | Quarantined:
    key = row[layout.key] if layout.key else None
    key = f"row{index}" if key is None else str(key)
    image = row[layout.image]
    if isinstance(image, dict):
        if image.get("bytes") is None and image.get("path"):
            return Quarantined(key, shard_id, f"missing image: stored by path only ({image['path']!r})")
        image = image.get("bytes")
    if image is None:
        return Quarantined(key, shard_id, f"missing image: {layout.image} is null")
    if not image:
        return Quarantined(key, shard_id, f"empty: zero-byte {layout.image}")
    meta = {name: str(row[name]) for name in layout.passthrough if row[name] is not None}
    return RawSample(key, shard_id, image, with_caption(meta))


def _is_bytes(tp: pa.DataType) -> bool:
    return any(check(tp) for check in _BYTES_TYPES)


def _is_scalar(tp: pa.DataType) -> bool:
    return any(check(tp) for check in _SCALAR_TYPES)
