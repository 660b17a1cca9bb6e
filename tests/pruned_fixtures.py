"""Compress outputs written in the contract's layout, for loader tests and the loader benchmark.

``{root}/data/{shard}.0.parquet`` + ``_committed/{shard}.json`` + ``manifest.parquet``; returns what each key
should load as, so a test can compare exactly.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.output.format import CORE_COLUMNS, TORCH_DTYPES, encode_sample_table, format_metadata, tokens_to_storage
from pipeline.output.manifest import MANIFEST_NAME, MANIFEST_SCHEMA
from pipeline.storage import filesystem_for


def fixture_meta(dtype: str = "float16", dim: int = 8, side: int = 4, **overrides: Any) -> dict[str, Any]:
    fields = dict(
        encoder="tiny", encoder_fingerprint="enc0", select_layer=-2, dtype=dtype, dim=dim, side=side,
        selector="random", selector_fingerprint="sel0", mode="ratio", params={"ratio": 0.5}, cfg_hash="fixture",
    )
    return format_metadata(**(fields | overrides))


def stage_rows(
    meta: Mapping[str, Any],
    *,
    keys: Sequence[str],
    source_shard: str | Sequence[str],
    widths: Sequence[int],
    heights: Sequence[int],
    n_tokens: Sequence[int],
    tokens: Sequence[torch.Tensor],
    positions: Sequence[Any],
    grids: Sequence[tuple[int, int]],
    scores: Sequence[torch.Tensor] | None = None,
    passthrough: Mapping[str, Sequence[str | None]] | None = None,
) -> list[dict[str, Any]]:
    """Samples with float ``[n_kept, dim]`` tokens, serialised as the encode stage hands them to the writer."""
    shards = [source_shard] * len(keys) if isinstance(source_shard, str) else list(source_shard)
    passthrough = dict(passthrough or {})
    return [
        {"key": key, "shard_id": shards[i], "width": widths[i], "height": heights[i], "n_tokens": n_tokens[i],
         "n_kept": len(tokens[i]), "grid_rows": grids[i][0], "grid_cols": grids[i][1],
         "tokens": tokens_to_storage(tokens[i], meta["dtype"]).tobytes(),
         "positions": np.asarray(positions[i], "<i4").tobytes(),
         "scores": None if scores is None else tokens_to_storage(scores[i], "float16").tobytes(),
         **{name: passthrough[name][i] if name in passthrough else None for name in ("caption", "json")}}
        for i, key in enumerate(keys)
    ]


def encode_rows(meta: Mapping[str, Any], **samples: Any) -> pa.Table:
    """:func:`stage_rows` through the writer's table encoder, with only the passthrough columns given."""
    table = encode_sample_table(stage_rows(meta, **samples), meta)
    return table.select([*CORE_COLUMNS, *samples.get("passthrough", {})])


def fixture_table(
    meta: Mapping[str, Any], shard_id: str, rows: int, rng: np.random.Generator, kept: tuple[int, int]
) -> tuple[pa.Table, dict[str, dict[str, Any]]]:
    n_tokens = meta["side"] ** 2
    lengths = rng.integers(kept[0], kept[1] + 1, rows)
    keys = [f"{shard_id}-{i:05d}" for i in range(rows)]
    tokens = [torch.from_numpy(rng.standard_normal((int(n), meta["dim"]), dtype=np.float32)) for n in lengths]
    positions = [np.sort(rng.choice(n_tokens, int(n), replace=False)).astype(np.int32) for n in lengths]
    captions = [f"caption of {key}" for key in keys]
    table = encode_rows(
        meta, keys=keys, source_shard=shard_id, widths=[64] * rows, heights=[48] * rows,
        n_tokens=[n_tokens] * rows, tokens=tokens, positions=positions, grids=[(0, 0)] * rows,
        passthrough={"caption": captions, "json": [json.dumps({"i": i}) for i in range(rows)]},
    )
    stored = TORCH_DTYPES[meta["dtype"]]
    expected = {
        key: {"tokens": t.to(stored).float(), "positions": torch.from_numpy(p.astype(np.int64)), "caption": c}
        for key, t, p, c in zip(keys, tokens, positions, captions)
    }
    return table, expected


def write_output(
    root: str,
    shard_rows: Sequence[int],
    *,
    meta: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    row_group_size: int = 4,
    kept: tuple[int, int] = (0, 12),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Write an output with one data file per shard; returns ``key -> expected tokens/positions/caption``."""
    meta = meta or fixture_meta()
    fs, base = filesystem_for(root, storage_options)
    rng = np.random.default_rng(seed)
    expected: dict[str, dict[str, Any]] = {}
    manifest = []
    for index, rows in enumerate(shard_rows):
        shard_id = f"shard{index:03d}"
        table, shard_expected = fixture_table(meta, shard_id, rows, rng, kept)
        expected |= shard_expected
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=row_group_size, compression="zstd")
        path = f"data/{shard_id}.0.parquet"
        fs.makedirs(f"{base}/data", exist_ok=True)
        fs.makedirs(f"{base}/_committed", exist_ok=True)
        fs.pipe_file(f"{base}/{path}", buffer.getvalue())
        entry = {"shard_id": shard_id, "path": path, "rows": rows, "bytes": buffer.tell(), "sha256": "",
                 "source_fingerprint": f"fp{index}", "attempt": "0"}
        fs.pipe_file(f"{base}/_committed/{shard_id}.json", json.dumps(entry).encode())
        manifest.append(entry)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), buffer)
    fs.pipe_file(f"{base}/{MANIFEST_NAME}", buffer.getvalue())
    return expected
