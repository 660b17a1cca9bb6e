"""The stored form of kept tokens: Parquet rows (plus a WebDataset variant), and the output's dataset card.

Plain Arrow types only, so any Parquet reader can use the files. A row's ``tokens`` is the sample's kept tokens,
row-major ``[n_kept, dim]``, little-endian in the stored dtype (bfloat16 as raw 2-byte words, float8_e4m3 as
raw bytes); the quantized dtypes (``int8``, ``float8_e4m3``) add ``token_scales``, one float32 per kept token
(value = stored * scale). ``positions`` is each kept token's flat index in the image's full token sequence,
ascending; ``scores`` (optional) holds the selector's keep score of each kept token as float16, aligned with
``positions``. What the bytes mean (dtype, dim, side, encoder, selector, ``cfg_hash``) lives once per file in the
schema metadata under ``b"atr"``, and once per output in ``dataset.json`` (:func:`dataset_card`), which readers
that drop schema metadata (HF ``datasets``, Ray Data, DuckDB) can still use. See docs/format.md.
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
# bfloat16 and float8 have no numpy dtype: they are stored and shipped as their raw words.
STORAGE_NUMPY = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4"),
                 "int8": np.dtype("i1")}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):
    STORAGE_NUMPY["float8_e4m3"] = np.dtype("u1")
    TORCH_DTYPES["float8_e4m3"] = torch.float8_e4m3fn
# Quantized dtypes: per-token absmax scaling to the format's largest finite value, one float32 scale per token.
QUANTIZED_MAX = {"int8": 127.0, "float8_e4m3": 448.0}
SCALE_NUMPY = np.dtype("<f4")
SCALES_COLUMN = "token_scales"
# numpy raw-word views of the dtypes numpy has no type for: how readers other than atr rebuild the values.
RAW_WORDS = {"bfloat16": "uint16 words, the top half of a float32: (word.astype(uint32) << 16).view(float32)",
             "float8_e4m3": "uint8 bytes of float8 e4m3fn (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, "
                            "no infinities; torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn)"}
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
    """The core columns, ``token_scales`` after ``scores`` for a quantized dtype (only then: the float outputs'
    bytes do not change), and the passthrough strings."""
    clash = set(passthrough) & {*CORE_COLUMNS, SCALES_COLUMN}
    if clash:
        raise ValueError(f"passthrough columns {sorted(clash)} clash with the core columns")
    fields = list(CORE_FIELDS)
    if is_quantized(meta["dtype"]):
        fields.insert(fields.index(next(f for f in fields if f.name == "scores")) + 1,
                      pa.field(SCALES_COLUMN, pa.binary()))
    fields += [pa.field(name, pa.string()) for name in passthrough]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()})


def passthrough_columns(schema: pa.Schema) -> list[str]:
    return [name for name in schema.names if name not in CORE_COLUMNS and name != SCALES_COLUMN]


# --------------------------------------------------------------------------------------------- rows


def is_quantized(dtype: str) -> bool:
    return dtype in QUANTIZED_MAX


def quantize(tokens: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[..., D]`` floats -> (values in ``dtype``'s torch type, float32 per-token scales or None), on the
    tokens' device. Quantized dtypes scale each token by its absmax so the largest magnitude maps to the
    format's largest finite value (int8: 127, float8_e4m3: 448); an all-zero token gets scale 0."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
    if not is_quantized(dtype):
        return tokens.to(TORCH_DTYPES[dtype]), None
    limit = QUANTIZED_MAX[dtype]
    wide = tokens.float()
    scales = wide.abs().amax(-1) / limit
    scaled = (wide / scales.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp(-limit, limit)
    values = scaled.round().to(torch.int8) if dtype == "int8" else scaled.to(TORCH_DTYPES[dtype])
    return values, scales


def storage_view(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in ``dtype``'s torch type -> numpy in the stored dtype (no copy; raw words where numpy has
    no such type)."""
    if dtype == "bfloat16":
        values = values.view(torch.int16)
    elif dtype == "float8_e4m3":
        values = values.view(torch.uint8)
    return values.numpy().view(STORAGE_NUMPY[dtype])


def token_record_bytes(dtype: str, dim: int) -> int:
    """Bytes per token between the encode and write stages: the stored values, then its float32 scale for a
    quantized dtype (the write stage splits them into ``tokens`` and ``token_scales``)."""
    return dim * STORAGE_NUMPY[dtype].itemsize + (SCALE_NUMPY.itemsize if is_quantized(dtype) else 0)


def tokens_to_storage(tokens: torch.Tensor | np.ndarray, dtype: str) -> np.ndarray:
    """``[..., D]`` floats -> little-endian numpy in the stored dtype (bfloat16 as uint16 words): the
    encode stage's row bytes. For a quantized dtype, uint8 ``[..., D + 4]``: each token's values followed by
    its float32 scale (:func:`split_scales` separates them)."""
    values, scales = quantize(torch.as_tensor(tokens).detach(), dtype)
    return join_scales(storage_view(values.cpu(), dtype), None if scales is None else scales.cpu().numpy())


def join_scales(values: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Stored values ``[..., D]`` (+ per-token scales) -> the encode stage's row layout (see above)."""
    if scales is None:
        return values
    scale_bytes = np.ascontiguousarray(scales, dtype=SCALE_NUMPY).view(np.uint8).reshape(*values.shape[:-1], 4)
    return np.concatenate([values.view(np.uint8), scale_bytes], axis=-1)


def split_scales(record_bytes: np.ndarray, dtype: str, dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The encode stage's token bytes (uint8, whole tokens) -> (stored value bytes, scale bytes or None)."""
    if not is_quantized(dtype):
        return record_bytes, None
    per_token = record_bytes.reshape(-1, token_record_bytes(dtype, dim))
    values_width = dim * STORAGE_NUMPY[dtype].itemsize
    return (np.ascontiguousarray(per_token[:, :values_width]).reshape(-1),
            np.ascontiguousarray(per_token[:, values_width:]).reshape(-1))


def _aligned(binary: Any, itemsize: int) -> tuple[np.ndarray, bool]:
    raw = np.frombuffer(binary, dtype=np.uint8)
    copied = raw.size > 0 and (not raw.flags.writeable or raw.ctypes.data % itemsize != 0)
    if copied:
        raw = raw.copy()  # torch wants writable, aligned memory; copying float16 beats numpy's slow widening
    return raw, copied


def stored_tokens(binary: Any, dtype: str, dim: int) -> torch.Tensor:
    """Stored token bytes -> ``[n_kept, dim]`` in the stored torch dtype (int8, float8_e4m3fn, bfloat16, ...),
    values not rescaled: what a loader ships to the device before :func:`dequantize` there. May share memory
    with ``binary`` when that is writable and aligned."""
    return _stored(binary, dtype, dim)[0]


def _stored(binary: Any, dtype: str, dim: int) -> tuple[torch.Tensor, bool]:
    """:func:`stored_tokens`, and whether its memory is a copy of ``binary``'s."""
    itemsize = STORAGE_NUMPY[dtype].itemsize
    raw, copied = _aligned(binary, itemsize)
    if raw.size % (dim * itemsize):
        raise ValueError(f"{raw.size} bytes are not a whole number of {dim}-dim {dtype} tokens")
    if raw.size == 0:
        return torch.empty(0, dim, dtype=TORCH_DTYPES[dtype]), True
    return torch.from_numpy(raw).view(TORCH_DTYPES[dtype]).view(-1, dim), copied


def token_scales(binary: Any, n_kept: int | None = None) -> torch.Tensor:
    """A row's ``token_scales`` bytes -> float32 ``[n_kept]``."""
    raw, _ = _aligned(binary, SCALE_NUMPY.itemsize)
    scales = torch.from_numpy(raw).view(torch.float32) if raw.size else torch.empty(0)
    if n_kept is not None and len(scales) != n_kept:
        raise ValueError(f"{len(scales)} token scales for {n_kept} tokens")
    return scales


def dequantize(stored: torch.Tensor, scales: torch.Tensor | None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored values ``[n, dim]`` (any device) and their per-token scales -> ``out_dtype`` values."""
    if scales is None:
        return stored.to(out_dtype)
    wide = stored.to(torch.float32)  # a new tensor: int8 / float8 values are never float32 already
    return wide.mul_(scales.to(stored.device, torch.float32).unsqueeze(-1)).to(out_dtype)


def decode_tokens(binary: Any, dtype: str, dim: int, out_dtype: torch.dtype = torch.float32,
                  scales: Any = None) -> torch.Tensor:
    """Stored token bytes (bytes, memoryview, ``pa.Buffer``, numpy) -> a new ``[n_kept, dim]`` tensor.

    ``scales``: the row's ``token_scales`` bytes, required for the quantized dtypes (int8, float8_e4m3).
    """
    if is_quantized(dtype) and scales is None:
        raise ValueError(f"dtype {dtype} needs the row's {SCALES_COLUMN} to decode its tokens")
    stored, copied = _stored(binary, dtype, dim)
    if is_quantized(dtype):
        return dequantize(stored, token_scales(scales, len(stored)), out_dtype)
    if stored.dtype == out_dtype:
        return stored if copied else stored.clone()
    return stored.to(out_dtype)


def decode_row_tokens(row: Mapping[str, Any], meta: Mapping[str, Any],
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One stored row (a mapping with ``tokens`` and, when quantized, ``token_scales``) -> ``[n_kept, dim]``,
    read with the output's format metadata (``dtype``, ``dim``), from the schema or from ``dataset.json``."""
    return decode_tokens(row["tokens"], meta["dtype"], meta["dim"], out_dtype, row.get(SCALES_COLUMN))


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
    scale_data: np.ndarray | None = None,
) -> pa.Table:
    """One table from per-row columns plus the concatenated token bytes and positions (no per-token loop);
    ``scale_data``: the concatenated float32 token scales of a quantized dtype (one per position)."""
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
        if scale_data is not None:
            item = SCALE_NUMPY.itemsize
            arrays[SCALES_COLUMN] = binary_array(scale_data[pos_lo * item:position_ends[stop - 1] * item],
                                                 position_lengths[start:stop] * item)
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
    ``grid_cols``, ``tokens`` (stored-dtype bytes, each token's float32 scale after its values when quantized:
    :func:`tokens_to_storage`), ``positions`` (int32 little-endian bytes), ``scores`` (float16 bytes or None)
    and the passthrough strings (``caption``, ``json``; None when absent).
    """
    schema = row_schema(meta, PASSTHROUGH_COLUMNS)
    if not samples:
        return schema.empty_table()
    dtype, dim = meta["dtype"], meta["dim"]
    token_blobs = [s["tokens"] for s in samples]
    position_blobs = [s["positions"] for s in samples]
    n_kept = np.array([s["n_kept"] for s in samples], dtype=np.int64)
    token_lengths = np.array([len(b) for b in token_blobs], dtype=np.int64)
    if not np.array_equal(token_lengths, n_kept * token_record_bytes(dtype, dim)):
        raise ValueError(f"token bytes do not match n_kept x dim={dim} in {dtype}")
    position_values = np.frombuffer(b"".join(position_blobs), dtype="<i4")
    position_lengths = np.array([len(b) // 4 for b in position_blobs], dtype=np.int64)
    columns = {
        "key": [s["key"] for s in samples],
        "source_shard": [s["shard_id"] for s in samples],
        **{name: [s[name] for s in samples] for name in ("width", "height", "n_tokens", "n_kept", "grid_rows",
                                                           "grid_cols", *PASSTHROUGH_COLUMNS)},
    }
    token_data, scale_data = split_scales(np.frombuffer(b"".join(token_blobs), dtype=np.uint8), dtype, dim)
    token_lengths = n_kept * dim * STORAGE_NUMPY[dtype].itemsize
    scores = [s.get("scores") for s in samples]
    return _assemble(schema, columns, token_data, token_lengths, position_values, position_lengths, scores,
                     scale_data)


def encode_quarantine_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"key": r["key"], "source_shard": r["shard_id"], "reason": r["reason"], "samples": r.get("samples", 1)}
         for r in rows],
        schema=QUARANTINE_SCHEMA,
    )


# --------------------------------------------------------------------------------------------- Parquet files

# Float16 features barely compress (zstd saves ~8%) yet cost readers 3-4x the CPU; they are stored raw.
RAW_COLUMNS = frozenset({"tokens", "scores", SCALES_COLUMN})


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


def wds_tokens_member(dtype: str) -> str:
    """The member suffix holding a sample's tokens: ``tokens.npy`` where numpy has the dtype (float16, float32,
    int8), else a raw little-endian blob named after the dtype (``tokens.bfloat16``, ``tokens.float8_e4m3``),
    which ``webdataset``'s ``.decode()`` leaves as bytes instead of returning silently wrong uint16 arrays."""
    return "tokens.npy" if dtype not in RAW_WORDS else f"tokens.{dtype}"


def sample_to_wds(row: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """One stored row (as written by :func:`encode_sample_table`) -> a WebDataset sample.

    Members: the tokens (:func:`wds_tokens_member`, ``[n_kept, dim]``), ``{key}.token_scales.npy`` (float32
    ``[n_kept]``, quantized dtypes only), ``{key}.positions.npy`` (int32), optional ``{key}.scores.npy``
    (float16) and ``{key}.json`` (the other fields plus the dtype, dim, side and the tokens' member name).
    """
    dtype, dim = meta["dtype"], meta["dim"]
    values, scales = split_scales(np.frombuffer(row["tokens"], dtype=np.uint8), dtype, dim)
    tokens = values.view(STORAGE_NUMPY[dtype]).reshape(-1, dim)
    positions = row["positions"]
    positions = np.frombuffer(positions, dtype="<i4") if isinstance(positions, bytes) else np.asarray(positions, "<i4")
    member = wds_tokens_member(dtype)
    info = {name: row[name] for name in ("width", "height", "n_tokens", "n_kept", "grid_rows", "grid_cols")}
    info |= {"key": row["key"], "source_shard": row.get("shard_id", row.get("source_shard")), "dtype": dtype,
             "dim": dim, "side": meta["side"], "tokens_member": member}
    info |= {name: row.get(name) for name in PASSTHROUGH_COLUMNS}
    sample = {"__key__": wds_member_key(row["key"]),
              member: _npy_bytes(tokens) if member.endswith(".npy") else tokens.tobytes()}
    if scales is not None:
        sample[f"{SCALES_COLUMN}.npy"] = _npy_bytes(scales.view(SCALE_NUMPY))
    sample |= {"positions.npy": _npy_bytes(positions), "json": json.dumps(info, sort_keys=True).encode()}
    if row.get("scores") is not None:
        sample["scores.npy"] = _npy_bytes(np.frombuffer(row["scores"], dtype="<f2"))
    return sample


def decode_wds_sample(sample: Mapping[str, Any], out_dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """A WebDataset sample written by :func:`sample_to_wds` -> the loader's sample dict (float32 tokens; with
    ``out_dtype=None`` the stored values, and ``token_scales`` when quantized); also reads the tars of earlier
    versions (bfloat16 as uint16 words in ``tokens.npy``)."""
    info = json.loads(sample["json"])
    dtype = info["dtype"]
    member = info.get("tokens_member", "tokens.npy")
    stored = _npy_array(sample[member]) if member.endswith(".npy") else sample[member]
    scales = sample.get(f"{SCALES_COLUMN}.npy")
    scales = None if scales is None else _npy_array(scales)
    if out_dtype is None:
        tokens = stored_tokens(stored, dtype, info["dim"])
        raw = {} if scales is None else {SCALES_COLUMN: token_scales(scales, len(tokens))}
    else:
        tokens, raw = decode_tokens(stored, dtype, info["dim"], out_dtype, scales), {}
    return {
        "key": info.get("key", sample["__key__"]),
        "tokens": tokens,
        **raw,
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


# --------------------------------------------------------------------------------------------- dataset card

CARD_NAME = "dataset.json"  # at the output root, {output}/{encoder}/{cfg_hash}/dataset.json
CARD_VERSION = 1


def dataset_card(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The output's self-description for any reader, from the run's resolved config (``_config.json``).

    Built from ``cfg_hash`` and the fingerprint payload only (what ``cfg_hash`` covers), so every run of one
    output writes the same bytes. Schema metadata is lost by HF ``datasets``, Ray Data and SQL engines; this
    card is not, and says how to rebuild every array from the plain columns (docs/format.md).
    """
    payload, config = resolved["fingerprint"], resolved.get("config", {})

    def section(name: str) -> dict[str, Any]:  # the hashed values win; the full config fills what they omit
        return {**config.get(name, {}), **payload.get(name, {})}

    encoder, selector, output = section("encoder"), section("selector"), section("output")
    dtype, dim = output["dtype"], int(encoder["hidden_size"])
    side = int(encoder["image_size"]) // int(encoder["patch_size"])
    parquet = output["format"] == "parquet"
    quantized = is_quantized(dtype)
    tokens = {
        ("column" if parquet else "member"): "tokens" if parquet else f"{{key}}.{wds_tokens_member(dtype)}",
        "dtype": dtype,
        "numpy_dtype": STORAGE_NUMPY[dtype].str,
        "raw_words": RAW_WORDS.get(dtype),
        "shape": ["n_kept", dim],
        "layout": "row-major [n_kept, dim], little-endian; token i of the row is the image's token positions[i]",
        "scales": None if not quantized else {
            ("column" if parquet else "member"): SCALES_COLUMN if parquet else f"{{key}}.{SCALES_COLUMN}.npy",
            "numpy_dtype": SCALE_NUMPY.str, "shape": ["n_kept"],
            "dequantize": "value[i, :] = stored[i, :] * scale[i] (per-token absmax: "
                          f"scale = max|x| / {QUANTIZED_MAX[dtype]:g})",
        },
    }
    return {
        "card_version": CARD_VERSION,
        "cfg_hash": resolved["cfg_hash"],
        "schema_version": payload.get("schema_version"),
        "format": output["format"],
        "dtype": dtype,
        "dim": dim,
        "side": side,
        "tokens_per_tile": side * side,
        "encoder": {
            "name": encoder["name"], "family": encoder["family"], "model_id": encoder["pretrained"],
            "fingerprint": payload.get("encoder_fingerprint"), "image_size": encoder["image_size"],
            "patch_size": encoder["patch_size"], "select_layer": encoder["select_layer"],
            "select_feature": encoder["select_feature"], "resize_mode": encoder["resize_mode"],
            "image_mean": encoder["image_mean"], "image_std": encoder["image_std"],
            "anyres": encoder["anyres"],
            "image_grid_pinpoints": encoder["image_grid_pinpoints"] if encoder["anyres"] else None,
        },
        "selector": {
            "method": selector["method"], "fingerprint": selector.get("fingerprint"),
            "mode": None if selector["method"] == "none" else selector.get("mode"),
            "param": selector.get("param"), "min_tokens": selector.get("min_tokens"),
            "store_scores": selector.get("store_scores"),
        },
        "files": {
            "manifest": "manifest.parquet: one row per committed data file (shard_id, path, rows, bytes, sha256)",
            "data": "data/: committed files only (attempts are written under _staging/ and moved here on commit); "
                    "a glob of data/*.parquet" + ("" if parquet else " (*.tar)") + " sees the manifest's rows, "
                    "except for a crashed or lost commit's file until `jobs.gc` removes it",
        },
        "tokens": tokens,
        "positions": {
            ("column" if parquet else "member"): "positions" if parquet else "{key}.positions.npy",
            "dtype": "int32", "shape": ["n_kept"],
            "meaning": f"each kept token's index in the image's full sequence of n_tokens tokens, ascending; tile t "
                       f"holds indices t*{side * side} .. (t+1)*{side * side}-1, each tile's {side}x{side} patches "
                       "row-major",
        },
        "grid": {
            "columns": ["grid_rows", "grid_cols"],
            "meaning": "(0, 0): one tile; anyres (LLaVA-NeXT): tile 0 is the whole image downscaled, then the "
                       "rows x cols grid of tiles row-major; n_tokens = tiles * tokens_per_tile",
        },
        "scores": {
            ("column" if parquet else "member"): "scores" if parquet else "{key}.scores.npy",
            "dtype": "float16", "shape": ["n_kept"], "meaning": "the selector's keep score per kept token; null "
                                                                  "unless selector.store_scores",
        },
    }


def card_format_metadata(card: Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`format_metadata` fields a reader needs, from ``dataset.json`` (a WebDataset tar has no schema to
    carry them; its samples' JSON has only dtype, dim and side)."""
    encoder, selector = card["encoder"], card["selector"]
    return {
        "schema_version": card["schema_version"], "encoder": encoder["name"],
        "encoder_fingerprint": encoder["fingerprint"], "select_layer": encoder["select_layer"],
        "dtype": card["dtype"], "dim": card["dim"], "side": card["side"], "selector": selector["method"],
        "selector_fingerprint": selector["fingerprint"], "mode": selector["mode"],
        "params": {"param": selector["param"], "min_tokens": selector["min_tokens"]}, "cfg_hash": card["cfg_hash"],
    }


def card_bytes(card: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(card), indent=1, sort_keys=True).encode()
