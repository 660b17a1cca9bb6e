"""The stored form of kept tokens: Parquet rows (plus a WebDataset variant) and the output's manifest.

Plain Arrow types only, so any Parquet reader can use the files. A row's ``tokens`` is the sample's kept tokens,
row-major ``[n_kept, dim]``, little-endian in the stored dtype (bfloat16 as raw 2-byte words); ``positions`` is
each kept token's flat index in the image's full token sequence, ascending; ``scores`` (optional) holds the
selector's keep score of each kept token as float16, aligned with ``positions``. What the bytes mean (dtype, dim,
side, encoder, selector, ``cfg_hash``) lives once per file in the schema metadata under ``b"atr"``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import SCHEMA_VERSION

METADATA_KEY = b"atr"
# bfloat16 has no numpy dtype: it is stored and shipped as its raw 16-bit words.
STORAGE_NUMPY = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PASSTHROUGH_COLUMNS = ("caption", "json")
FORMAT_FIELDS = (
    "schema_version", "encoder", "encoder_fingerprint", "select_layer", "dtype", "dim", "side",
    "selector", "selector_fingerprint", "mode", "params", "cfg_hash",
)

CORE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_shard", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("n_tokens", pa.int32()),
    pa.field("n_kept", pa.int32()),
    pa.field("tokens", pa.binary()),
    pa.field("positions", pa.list_(pa.int32())),
    pa.field("scores", pa.binary()),
    pa.field("grid_rows", pa.int32()),
    pa.field("grid_cols", pa.int32()),
]
CORE_COLUMNS = tuple(f.name for f in CORE_FIELDS)

QUARANTINE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_shard", pa.string()),
    ("reason", pa.string()),
    ("samples", pa.int64()),  # how many input samples the row stands for: 1, more for a "*" row, null: unknown
])

# Arrow's binary type has 32-bit offsets; larger batches are split into several record batches.
MAX_BINARY_BYTES = 2**31 - 1


# --------------------------------------------------------------------------------------------- metadata


def format_metadata(
    *,
    encoder: str,
    encoder_fingerprint: str,
    select_layer: int,
    dtype: str,
    dim: int,
    side: int,
    selector: str,
    selector_fingerprint: str,
    mode: str | None,
    params: Mapping[str, Any],
    cfg_hash: str,
    schema_version: int = SCHEMA_VERSION,
) -> dict[str, Any]:
    """The JSON-able description stored under ``b"atr"`` in every data file's schema."""
    if dtype not in STORAGE_NUMPY:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(STORAGE_NUMPY)}")
    if dim <= 0 or side <= 0:
        raise ValueError(f"dim and side must be positive, got dim={dim}, side={side}")
    return {
        "schema_version": int(schema_version), "encoder": encoder, "encoder_fingerprint": encoder_fingerprint,
        "select_layer": int(select_layer), "dtype": dtype, "dim": int(dim), "side": int(side),
        "selector": selector, "selector_fingerprint": selector_fingerprint, "mode": mode, "params": dict(params),
        "cfg_hash": cfg_hash,
    }


def read_format_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not an atr output file: its schema has no b'atr' metadata")
    meta = json.loads(raw)
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(
            f"output schema_version {meta['schema_version']} is newer than this code reads ({SCHEMA_VERSION}); "
            "upgrade atr"
        )
    missing = [name for name in FORMAT_FIELDS if name not in meta]
    if missing:
        raise ValueError(f"atr metadata lacks {', '.join(missing)}")
    return meta


def row_schema(meta: Mapping[str, Any], passthrough: Sequence[str] = PASSTHROUGH_COLUMNS) -> pa.Schema:
    clash = set(passthrough) & set(CORE_COLUMNS)
    if clash:
        raise ValueError(f"passthrough columns {sorted(clash)} clash with the core columns")
    fields = CORE_FIELDS + [pa.field(name, pa.string()) for name in passthrough]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()})


def passthrough_columns(schema: pa.Schema) -> list[str]:
    return [name for name in schema.names if name not in CORE_COLUMNS]


# --------------------------------------------------------------------------------------------- rows


def tokens_to_storage(tokens: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """``[..., D]`` floats -> a little-endian numpy array in the stored dtype (bfloat16 as uint16 words)."""
    tensor = torch.as_tensor(tokens).detach().to("cpu", TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        tensor = tensor.view(torch.int16)
    return tensor.numpy().view(STORAGE_NUMPY[dtype])


def decode_tokens(binary: Any, dtype: str, dim: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored token bytes (bytes, memoryview, ``pa.Buffer``, numpy) -> a new ``[n_kept, dim]`` tensor."""
    itemsize = STORAGE_NUMPY[dtype].itemsize
    raw = np.frombuffer(binary, dtype=np.uint8)
    if raw.size % (dim * itemsize):
        raise ValueError(f"{raw.size} bytes are not a whole number of {dim}-dim {dtype} tokens")
    if raw.size == 0:
        return torch.empty(0, dim, dtype=out_dtype)
    copied = not raw.flags.writeable or raw.ctypes.data % itemsize != 0
    if copied:
        raw = raw.copy()  # torch wants writable, aligned memory; copying float16 beats numpy's slow widening
    stored = torch.from_numpy(raw).view(TORCH_DTYPES[dtype])
    if stored.dtype == out_dtype:
        return (stored if copied else stored.clone()).view(-1, dim)
    return stored.to(out_dtype).view(-1, dim)


def binary_array(data: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """An Arrow binary array over ``data``'s bytes (not copied), cut into rows of ``lengths`` bytes."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))]
    )


def _list_int32(values: np.ndarray, lengths: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))


def _byte_chunks(row_bytes: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges whose token bytes each fit one Arrow binary array."""
    if row_bytes.sum() <= MAX_BINARY_BYTES:
        return [(0, len(row_bytes))]
    if row_bytes.max() > MAX_BINARY_BYTES:
        raise ValueError("one sample's tokens exceed 2 GiB; store fewer tokens per sample")
    chunks, start, total = [], 0, 0
    for i, size in enumerate(row_bytes.tolist()):
        if total + size > MAX_BINARY_BYTES:
            chunks.append((start, i))
            start, total = i, 0
        total += size
    chunks.append((start, len(row_bytes)))
    return chunks


def _assemble(
    schema: pa.Schema,
    columns: Mapping[str, Any],
    token_data: np.ndarray,
    token_lengths: np.ndarray,
    position_values: np.ndarray,
    position_lengths: np.ndarray,
    scores: list[bytes | None],
) -> pa.Table:
    """One table from per-row columns plus the concatenated token bytes and positions (no per-token loop)."""
    token_ends = np.cumsum(token_lengths)
    position_ends = np.cumsum(position_lengths)
    batches = []
    for start, stop in _byte_chunks(token_lengths):
        byte_lo = token_ends[start - 1] if start else 0
        pos_lo = position_ends[start - 1] if start else 0
        arrays = {
            "tokens": binary_array(token_data[byte_lo:token_ends[stop - 1]], token_lengths[start:stop]),
            "positions": _list_int32(
                position_values[pos_lo:position_ends[stop - 1]], position_lengths[start:stop]
            ),
            "scores": pa.array(scores[start:stop], type=pa.binary()),
        }
        for field in schema:
            if field.name not in arrays:
                values = columns[field.name]
                if field.type == pa.int32():
                    values = np.asarray(values, dtype=np.int32)
                arrays[field.name] = pa.array(values[start:stop], type=field.type)
        batches.append(pa.record_batch([arrays[name] for name in schema.names], schema=schema))
    return pa.Table.from_batches(batches, schema=schema)


def encode_sample_table(samples: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> pa.Table:
    """Rows already serialised by the encode stage -> one table.

    Each sample has ``key``, ``shard_id``, ``width``, ``height``, ``n_tokens``, ``n_kept``, ``grid_rows``,
    ``grid_cols``, ``tokens`` (stored-dtype bytes), ``positions`` (int32 little-endian bytes), ``scores``
    (float16 bytes or None) and the passthrough strings (``caption``, ``json``; None when absent).
    """
    schema = row_schema(meta, PASSTHROUGH_COLUMNS)
    if not samples:
        return schema.empty_table()
    token_blobs = [s["tokens"] for s in samples]
    position_blobs = [s["positions"] for s in samples]
    expected = np.array([s["n_kept"] for s in samples], dtype=np.int64) * meta["dim"]
    token_lengths = np.array([len(b) for b in token_blobs], dtype=np.int64)
    if not np.array_equal(token_lengths, expected * STORAGE_NUMPY[meta["dtype"]].itemsize):
        raise ValueError(f"token bytes do not match n_kept x dim={meta['dim']} in {meta['dtype']}")
    position_values = np.frombuffer(b"".join(position_blobs), dtype="<i4")
    position_lengths = np.array([len(b) // 4 for b in position_blobs], dtype=np.int64)
    columns = {
        "key": [s["key"] for s in samples],
        "source_shard": [s["shard_id"] for s in samples],
        **{name: [s[name] for s in samples] for name in ("width", "height", "n_tokens", "n_kept", "grid_rows",
                                                           "grid_cols", *PASSTHROUGH_COLUMNS)},
    }
    token_data = np.frombuffer(b"".join(token_blobs), dtype=np.uint8)
    scores = [s.get("scores") for s in samples]
    return _assemble(schema, columns, token_data, token_lengths, position_values, position_lengths, scores)


def encode_quarantine_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"key": r["key"], "source_shard": r["shard_id"], "reason": r["reason"], "samples": r.get("samples", 1)}
         for r in rows],
        schema=QUARANTINE_SCHEMA,
    )


# --------------------------------------------------------------------------------------------- Parquet files

# Float16 features barely compress (zstd saves ~8%) yet cost readers 3-4x the CPU; they are stored raw.
RAW_COLUMNS = frozenset({"tokens", "scores"})


def parquet_bytes(table: pa.Table, row_group_size: int = 1024) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(
        table, buffer, row_group_size=row_group_size,
        compression={name: "none" if name in RAW_COLUMNS else "zstd" for name in table.column_names},
        use_dictionary=[name for name in table.column_names if name not in RAW_COLUMNS],
    )
    return buffer.getvalue()


def parquet_rows(data: bytes) -> int:
    return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows


# --------------------------------------------------------------------------------------------- WebDataset output


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npy_array(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def sample_to_wds(row: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """One stored row (as written by :func:`encode_sample_table`) -> a WebDataset sample.

    Members: ``{key}.tokens.npy`` ([n_kept, dim] in the stored dtype; bfloat16 as uint16 words),
    ``{key}.positions.npy`` (int32), optional ``{key}.scores.npy`` (float16) and ``{key}.json`` (the other
    fields plus the dtype, dim and side needed to read the tokens back).
    """
    dtype, dim = meta["dtype"], meta["dim"]
    tokens = np.frombuffer(row["tokens"], dtype=STORAGE_NUMPY[dtype]).reshape(-1, dim)
    positions = row["positions"]
    positions = np.frombuffer(positions, dtype="<i4") if isinstance(positions, bytes) else np.asarray(positions, "<i4")
    info = {name: row[name] for name in ("width", "height", "n_tokens", "n_kept", "grid_rows", "grid_cols")}
    info |= {"key": row["key"], "source_shard": row.get("shard_id", row.get("source_shard")), "dtype": dtype,
             "dim": dim, "side": meta["side"]}
    info |= {name: row.get(name) for name in PASSTHROUGH_COLUMNS}
    sample = {"__key__": wds_member_key(row["key"]), "tokens.npy": _npy_bytes(tokens), "positions.npy": _npy_bytes(positions),
              "json": json.dumps(info, sort_keys=True).encode()}
    if row.get("scores") is not None:
        sample["scores.npy"] = _npy_bytes(np.frombuffer(row["scores"], dtype="<f2"))
    return sample


def decode_wds_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A WebDataset sample written by :func:`sample_to_wds` -> the loader's sample dict (float32 tokens)."""
    info = json.loads(sample["json"])
    stored = _npy_array(sample["tokens.npy"])
    return {
        "key": info.get("key", sample["__key__"]),
        "tokens": decode_tokens(stored, info["dtype"], info["dim"]),
        "positions": torch.from_numpy(_npy_array(sample["positions.npy"]).astype(np.int64)),
        "n_tokens": info["n_tokens"],
        "grid": (info["grid_rows"], info["grid_cols"]),
        "side": info["side"],
        **{name: info.get(name) for name in PASSTHROUGH_COLUMNS},
    }


_UNSAFE_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a stored sample's key, or None: the one key policy, applied by the decode stage
    before any output format sees a sample, so Parquet and WebDataset outputs keep the same rows.

    A key is a relative ``/``-separated name every output can store: UTF-8, no empty, ``.`` or ``..`` segment
    (nothing that reads as a path out of a folder), no backslash or control character. Dots are fine: the
    WebDataset writer escapes them in member names (:func:`wds_member_key`).
    """
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid key: not UTF-8"
    if not key:
        return "invalid key: empty"
    if _UNSAFE_KEY_CHARS.search(key):
        return f"invalid key: {key!r} contains a backslash or control character"
    segments = key.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return f"invalid key: {key!r} is not a relative name (an empty, '.' or '..' segment)"
    return None


def wds_member_key(key: str) -> str:
    """``key`` as a WebDataset member prefix: a member's key ends at the first ``.`` of its base name, so ``%``
    and the last segment's dots are percent-escaped; the sample's json keeps the key itself."""
    folder, _, name = key.replace("%", "%25").rpartition("/")
    return f"{folder}/{name.replace('.', '%2E')}" if folder else name.replace(".", "%2E")


def samples_to_wds_tar(samples: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> bytes:
    """Encode-stage rows -> the bytes of one WebDataset tar (deterministic: fixed mtime and order)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for row in samples:
            problem = key_problem(row["key"])
            if problem:
                raise ValueError(f"invalid key for webdataset output: {problem}")
            sample = sample_to_wds(row, meta)
            for suffix, data in sample.items():
                if suffix == "__key__":
                    continue
                member = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()
