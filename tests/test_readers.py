"""A compress output read by common readers that know nothing of atr: DuckDB, polars, HF ``datasets`` and
``pyarrow.dataset`` globbing ``data/`` see exactly the manifest's rows (attempts live in ``_staging/`` until their
commit), and ``dataset.json`` alone (these readers drop the Parquet schema metadata) rebuilds every token array
as atr's own reader yields it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from job_runs import FAST_COMPRESS, small_corpus

from pipeline.compress import shard_committer
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, load_config
from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader
from pipeline.output.commit import STAGING_DIR, CommittedShard, WrittenFile, commit_shard
from pipeline.output.format import (
    CARD_NAME,
    TORCH_DTYPES,
    card_bytes,
    dataset_card,
    decode_row_tokens,
    dequantize,
    is_quantized,
    read_format_metadata,
)
from pipeline.output.manifest import read_manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), n=6, seed=5)


def _compress(corpus: Path, output: Path, dtype: str) -> dict:
    return run_compress(load_config(CompressConfig, None, [
        f"input.path={corpus}", f"output.path={output}", "executor=local", f"output.dtype={dtype}", *FAST_COMPRESS]))


class _DriverCrash(Exception):
    pass


@pytest.fixture(scope="module", params=["bfloat16", "int8"])
def output(request, corpus, tmp_path_factory) -> tuple[str, Path]:
    """An output whose history leaves garbage a glob of ``data/`` must not see: (bfloat16) a run that crashed
    after its first commit (the other shard's files written, never committed) and the rerun that finished it;
    (both) a losing attempt at a committed shard."""
    dtype, root = request.param, tmp_path_factory.mktemp(f"out-{request.param}")
    if dtype == "bfloat16":
        real_commit, commits = shard_committer.commit_shard, []

        def crash_after_first(*args, **kwargs):
            if commits:
                raise _DriverCrash("the driver died")
            commits.append(real_commit(*args, **kwargs))
            return commits[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(shard_committer, "commit_shard", crash_after_first)
            with pytest.raises(_DriverCrash):
                _compress(corpus, root, dtype)
    summary = _compress(corpus, root, dtype)
    out = Path(summary["output"])
    if dtype == "bfloat16":  # the crash's leftovers stay in _staging/
        assert summary["shards_processed"] == 1 and list((out / STAGING_DIR).rglob("*.parquet"))

    # A second attempt at a committed shard loses the create-if-absent marker: nothing of it reaches data/.
    entry = read_manifest(str(out))[0]
    staged = out / STAGING_DIR / "data" / f"{entry['shard_id']}.loser-0000.parquet"
    staged.write_bytes((out / entry["path"]).read_bytes())
    loser = CommittedShard(shard_id=entry["shard_id"], source_url="u", source_fingerprint=entry["source_fingerprint"],
                           attempt="loser", files=[WrittenFile(path=staged.relative_to(out).as_posix(), rows=3,
                                                               bytes=staged.stat().st_size, sha256="-")])
    assert commit_shard(str(out), loser, {}) is False
    assert not staged.exists() and not (out / "data" / staged.name).exists()
    return dtype, out


def _card_tokens(card: dict, tokens: bytes, scales: bytes | None) -> np.ndarray:
    """``[n_kept, dim]`` float32 from a row's plain columns and the card alone (no atr code, no schema metadata)."""
    spec = card["tokens"]
    values = np.frombuffer(tokens, np.dtype(spec["numpy_dtype"])).reshape(-1, card["dim"])
    if spec["dtype"] == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    elif spec["dtype"] == "float8_e4m3":
        values = torch.from_numpy(values.copy()).view(torch.float8_e4m3fn).float().numpy()
    values = values.astype(np.float32)
    if spec["scales"] is not None:
        values = values * np.frombuffer(scales, np.dtype(spec["scales"]["numpy_dtype"]))[:, None]
    return values


def _read_duckdb(data: str) -> list[dict]:
    import duckdb
    return duckdb.sql(f"SELECT * FROM read_parquet('{data}/*.parquet')").arrow().read_all().to_pylist()


def _read_polars(data: str) -> list[dict]:
    import polars as pl
    return pl.scan_parquet(f"{data}/*.parquet").collect().to_dicts()


def _read_hf_datasets(data: str, cache: Path) -> list[dict]:
    import datasets
    datasets.disable_progress_bars()
    return list(datasets.load_dataset("parquet", data_files=f"{data}/*.parquet", split="train", cache_dir=str(cache)))


def _read_pyarrow_dataset(data: str) -> list[dict]:
    return pads.dataset(data, format="parquet").to_table().to_pylist()


def test_common_readers_glob_exactly_the_manifest_rows_and_the_card_rebuilds_the_tokens(output, tmp_path):
    dtype, out = output
    card = json.loads((out / CARD_NAME).read_text())
    # Written by the crashed run and checked by the rerun: one output's card is always the same bytes.
    assert (out / CARD_NAME).read_bytes() == card_bytes(dataset_card(json.loads((out / "_config.json").read_text())))
    manifest = read_manifest(str(out))
    assert (card["dtype"], card["format"], card["cfg_hash"]) == (dtype, "parquet", out.name)
    assert card["encoder"]["image_size"] == 224 and card["encoder"]["patch_size"] == 16 and card["side"] == 14
    assert "model_id" in card["encoder"] and "image_grid_pinpoints" in card["encoder"]
    first_meta = read_format_metadata(pq.read_schema(out / manifest[0]["path"]))
    assert card["dim"] == first_meta["dim"] and card["dtype"] == first_meta["dtype"]

    # atr's own reading of the committed files: the format's row decoder, and the loader agreeing with it.
    expected = {}
    for entry in manifest:
        for row in pq.read_table(out / entry["path"]).to_pylist():
            expected[row["key"]] = (decode_row_tokens(row, first_meta).numpy(), row["positions"])
    assert len(expected) == sum(e["rows"] for e in manifest) == 6
    loaded = {s["key"]: s["tokens"] for s in PrunedTokenDataset(str(out), shuffle=False, rank=0, world_size=1)}
    assert loaded.keys() == expected.keys()
    for key, tokens in loaded.items():
        assert tokens.dtype == torch.float32 and np.array_equal(tokens.numpy(), expected[key][0])

    scales_column = (card["tokens"]["scales"] or {}).get("column")
    readers = {"duckdb": _read_duckdb, "polars": _read_polars, "pyarrow.dataset": _read_pyarrow_dataset,
               "datasets": lambda data: _read_hf_datasets(data, tmp_path / "hf")}
    for name, read in readers.items():
        rows = read(str(out / "data"))
        assert sorted(r["key"] for r in rows) == sorted(expected), name  # each committed row once, nothing else
        for row in rows:
            tokens = _card_tokens(card, row["tokens"], row.get(scales_column) if scales_column else None)
            want_tokens, want_positions = expected[row["key"]]
            assert tokens.shape == (row["n_kept"], card["dim"]), name
            assert np.array_equal(tokens, want_tokens), name
            assert list(row["positions"]) == want_positions, name


def test_the_loader_hands_out_stored_values_and_scales_that_rescale_to_its_floats(output):
    dtype, out = output
    floats = {s["key"]: s["tokens"] for s in PrunedTokenDataset(str(out), shuffle=False, rank=0, world_size=1)}
    dataset = PrunedTokenDataset(str(out), tokens_dtype=None, shuffle_buffer=2, rank=0, world_size=1)
    seen = []
    for batch in PrunedTokenLoader(dataset, batch_size=4, num_workers=2):
        assert batch["tokens"].dtype == TORCH_DTYPES[dtype] and ("token_scales" in batch) == is_quantized(dtype)
        for i, key in enumerate(batch["keys"]):
            n = int(batch["lengths"][i])
            scales = batch["token_scales"][i, :n] if is_quantized(dtype) else None
            assert torch.equal(dequantize(batch["tokens"][i, :n], scales), floats[key])
            seen.append(key)
    assert sorted(seen) == sorted(floats)
