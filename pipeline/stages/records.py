"""What flows between the compress stages: row and record schemas and their kinds.

Rows are flat dicts of plain values (bytes, ints, strings), so Ray can move them as Arrow. The decode stage
emits :data:`SAMPLE`, :data:`QUARANTINE` and one closing :data:`END` row per shard (how many rows the shard
produced, ``total``, how many input samples they stand for, ``samples``, and its source); a quarantine row's
``samples`` is how many samples it stands for (a whole shard's or a damaged range's record stands for several;
null counts as one); the encode stage turns samples into kept tokens and passes the others on; the write
stage returns one :data:`DATA` or :data:`QUARANTINE` record per file it wrote and passes each :data:`END` on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator

import pyarrow as pa

SAMPLE = "sample"  # an image: decoded tiles (or JPEG bytes), then its kept tokens
QUARANTINE = "quarantine"  # a sample that cannot be used, with its reason; also the record of its written file
END = "end"  # closes a shard: its row count, source URL and fingerprint
DATA = "data"  # the record of a written data file

DECODED_SCHEMA = pa.schema([
    ("kind", pa.string()), ("shard_id", pa.string()), ("key", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("pixels", pa.binary()), ("n_tiles", pa.int32()),
    ("grid_rows", pa.int32()), ("grid_cols", pa.int32()), ("caption", pa.string()), ("json", pa.string()),
    ("reason", pa.string()), ("total", pa.int64()), ("source_url", pa.string()), ("source_fingerprint", pa.string()),
    ("image", pa.binary()), ("samples", pa.int64()), ("source_bytes", pa.int64()),
])
ENCODED_SCHEMA = pa.schema(
    [f for f in DECODED_SCHEMA if f.name not in ("pixels", "n_tiles", "image")]
    + [pa.field("n_tokens", pa.int32()), pa.field("n_kept", pa.int32()), pa.field("tokens", pa.binary()),
       pa.field("positions", pa.binary()), pa.field("scores", pa.binary())]
)
RECORD_SCHEMA = pa.schema([
    ("kind", pa.string()), ("shard_id", pa.string()), ("path", pa.string()), ("rows", pa.int64()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("tokens_full", pa.int64()), ("tokens_kept", pa.int64()),
    ("kept_counts", pa.string()), ("total", pa.int64()), ("source_url", pa.string()),
    ("source_fingerprint", pa.string()), ("samples", pa.int64()),
])


def quarantined_samples(row: dict[str, Any]) -> int:
    """How many input samples a quarantine row stands for (null, unknown: one)."""
    return 1 if row.get("samples") is None else int(row["samples"])


def decoded_row(**values: Any) -> dict[str, Any]:
    return {name: values.get(name) for name in DECODED_SCHEMA.names}


def batches(rows: Iterable[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive rows, cut after every ``batch_size`` samples (other rows ride along)."""
    batch: list[dict[str, Any]] = []
    samples = 0
    for row in rows:
        batch.append(row)
        samples += row["kind"] == SAMPLE
        if samples == batch_size:
            yield batch
            batch, samples = [], 0
    if batch:
        yield batch


@dataclass
class EncodedCounts:
    """What the encode stage has done: for live progress, not for accounting (a retried call counts twice)."""

    images: int = 0
    tokens_full: int = 0
    tokens_kept: int = 0
    source_bytes: int = 0  # the encoded images' bytes as read from the input

    def add(self, other: EncodedCounts) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
