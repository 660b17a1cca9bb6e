import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from pruned_fixtures import encode_rows, fixture_meta, write_output

from pipeline.output import format as output_format
from pipeline.output.format import (
    SCALES_COLUMN,
    TORCH_DTYPES,
    decode_row_tokens,
    decode_tokens,
    decode_wds_sample,
    dequantize,
    encode_quarantine_table,
    encode_sample_table,
    key_problem,
    quantize,
    read_format_metadata,
    row_schema,
    samples_to_wds_tar,
    tokens_to_storage,
)
from pipeline.output.manifest import IncompleteOutputError, read_manifest

DTYPES = ["float16", "bfloat16", "float32"]
QUANTIZED = ["int8", "float8_e4m3"]


def _expected(tokens, dtype):
    """What a stored dtype gives back for float tokens: the cast, or the dequantized per-token quantization."""
    if dtype in QUANTIZED:
        return dequantize(*quantize(tokens, dtype))
    return tokens.to(TORCH_DTYPES[dtype]).float()


def _table(meta, n_rows=5, seed=0, with_scores=False):
    rng = np.random.default_rng(seed)
    lengths = [3, 0, 7, 1, 16][:n_rows]
    tokens = [torch.randn(n, meta["dim"], generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    positions = [np.sort(rng.choice(16, n, replace=False)) for n in lengths]
    scores = [torch.rand(n) for n in lengths] if with_scores else None
    table = encode_rows(
        meta, keys=[f"k{i}" for i in range(n_rows)], source_shard="s0", widths=[10] * n_rows,
        heights=[20] * n_rows, n_tokens=[16] * n_rows, tokens=tokens, positions=positions,
        grids=[(1, 2)] * n_rows, scores=scores, passthrough={"caption": [f"c{i}" for i in range(n_rows)]},
    )
    return table, tokens, positions, scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_tokens_round_trip_through_parquet_in_each_dtype(tmp_path, dtype):
    meta = fixture_meta(dtype=dtype, dim=6)
    table, tokens, positions, scores = _table(meta, with_scores=True)
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert read_format_metadata(back.schema) == meta
    assert back.column("n_kept").to_pylist() == [len(t) for t in tokens]
    for i, row in enumerate(back.to_pylist()):
        assert len(row["tokens"]) == len(tokens[i]) * 6 * np.dtype(output_format.STORAGE_NUMPY[dtype]).itemsize
        decoded = decode_tokens(row["tokens"], dtype, 6)
        assert decoded.dtype == torch.float32 and decoded.shape == (len(tokens[i]), 6)
        assert torch.equal(decoded, tokens[i].to(TORCH_DTYPES[dtype]).float())
        assert row["positions"] == positions[i].tolist()
        assert np.array_equal(np.frombuffer(row["scores"], "<f2"), scores[i].half().numpy())


def test_bfloat16_is_stored_as_little_endian_raw_words():
    stored = tokens_to_storage(torch.tensor([[1.0, -2.0]]), "bfloat16")
    assert stored.tobytes() == b"\x80\x3f\x00\xc0"  # 0x3F80, 0xC000
    assert decode_tokens(stored.tobytes(), "bfloat16", 2).tolist() == [[1.0, -2.0]]


def test_decode_to_the_stored_or_another_dtype_returns_a_fresh_tensor():
    stored = tokens_to_storage(torch.tensor([[1.5, -2.25]]), "float16")
    same = decode_tokens(stored, "float16", 2, torch.float16)
    assert same.dtype == torch.float16 and same.tolist() == [[1.5, -2.25]]
    same[0, 0] = 0  # writable and not aliasing the caller's array
    assert stored.tolist() == [[1.5, -2.25]]
    assert decode_tokens(stored.tobytes(), "float16", 2, torch.bfloat16).dtype == torch.bfloat16


def test_decode_rejects_a_partial_token():
    with pytest.raises(ValueError, match="whole number"):
        decode_tokens(b"\x00" * 6, "float16", 2)


def _stage_rows(meta, tokens, positions, scores=None):
    """Rows as the encode stage serialises them (what the writer hands to encode_sample_table)."""
    return [
        {"key": f"k{i}", "shard_id": "s0", "width": 10, "height": 20, "n_tokens": 16, "n_kept": len(t),
         "grid_rows": 1, "grid_cols": 2, "tokens": tokens_to_storage(t, meta["dtype"]).tobytes(),
         "positions": np.asarray(p, "<i4").tobytes(),
         "scores": None if scores is None else scores[i].half().numpy().tobytes(), "caption": f"c{i}", "json": None}
        for i, (t, p) in enumerate(zip(tokens, positions))
    ]


def test_serialised_stage_rows_encode_to_the_same_table():
    meta = fixture_meta(dtype="bfloat16", dim=4)
    table, tokens, positions, _ = _table(meta)
    samples = _stage_rows(meta, tokens, positions)
    from_rows = encode_sample_table(samples, meta)
    assert from_rows.drop_columns(["json"]).equals(table)
    assert from_rows.schema.field("json").type == pa.string()
    # The writer assembles columns on the stage's buffers; Arrow's own row-by-row build must give the same table.
    by_arrow = pa.Table.from_pylist(
        [{**{k: v for k, v in row.items() if k != "shard_id"}, "source_shard": row["shard_id"],
          "positions": np.frombuffer(row["positions"], "<i4").tolist()} for row in samples],
        schema=row_schema(meta))
    assert from_rows.equals(by_arrow)
    bad = dict(samples[0], n_kept=4)
    with pytest.raises(ValueError, match="n_kept"):
        encode_sample_table([bad], meta)


def test_batches_over_the_binary_limit_split_into_record_batches(monkeypatch):
    meta = fixture_meta(dim=4)
    monkeypatch.setattr(output_format, "MAX_BINARY_BYTES", 64)  # 8 float16 tokens of dim 4
    table, tokens, _, _ = _table(meta, n_rows=4)
    assert len(table.to_batches()) > 1
    for i, row in enumerate(table.to_pylist()):
        assert torch.equal(decode_tokens(row["tokens"], "float16", 4), tokens[i].half().float())


def test_metadata_errors_are_clear():
    with pytest.raises(ValueError, match="dtype"):
        fixture_meta(dtype="int4")
    with pytest.raises(ValueError, match="not an atr output"):
        read_format_metadata(pa.schema([("key", pa.string())]))
    newer = row_schema(fixture_meta(schema_version=99))
    with pytest.raises(ValueError, match="newer"):
        read_format_metadata(newer)
    with pytest.raises(ValueError, match="clash"):
        row_schema(fixture_meta(), ["tokens"])


def test_quarantine_table_keeps_reasons():
    table = encode_quarantine_table([{"key": "a", "shard_id": "s", "reason": "truncated jpeg"}])
    assert table.to_pylist() == [{"key": "a", "source_shard": "s", "reason": "truncated jpeg", "samples": 1}]


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_quantized_tokens_round_trip_through_parquet_with_a_scale_per_token(tmp_path, dtype, monkeypatch):
    meta = fixture_meta(dtype=dtype, dim=32)
    rng = torch.Generator().manual_seed(0)
    tokens = [torch.randn(n, 32, generator=rng) * (1 + 10 * torch.rand(n, 1, generator=rng)) for n in (3, 0, 7, 1, 16)]
    tokens[3][0] = 0.0  # an all-zero token: scale 0, decodes to zeros
    positions = [np.arange(len(t)) for t in tokens]
    monkeypatch.setattr(output_format, "MAX_BINARY_BYTES", 600)  # several record batches: scales stay aligned
    table = encode_sample_table(_stage_rows(meta, tokens, positions), meta)
    assert len(table.to_batches()) > 1
    assert table.schema.names.index(SCALES_COLUMN) == table.schema.names.index("scores") + 1
    pq.write_table(table, tmp_path / "q.parquet")
    back = pq.read_table(tmp_path / "q.parquet")
    assert read_format_metadata(back.schema) == meta
    for t, row in zip(tokens, back.to_pylist()):
        assert len(row["tokens"]) == len(t) * 32 and len(row[SCALES_COLUMN]) == len(t) * 4
        decoded = decode_row_tokens(row, meta)
        assert torch.equal(decoded, _expected(t, dtype))
        cosine = torch.nn.functional.cosine_similarity(decoded, t, dim=-1)[t.abs().amax(-1) > 0]
        if len(cosine):
            assert cosine.min() > (0.999 if dtype == "int8" else 0.99), cosine.min()
    assert torch.equal(decode_row_tokens(back.to_pylist()[3], meta)[0], torch.zeros(32))
    with pytest.raises(ValueError, match=SCALES_COLUMN):
        decode_tokens(back.to_pylist()[0]["tokens"], dtype, 32)
    # Float outputs keep their schema: no scales column.
    assert SCALES_COLUMN not in row_schema(fixture_meta(dtype="float16")).names


@pytest.mark.parametrize("dtype", DTYPES + QUANTIZED)
def test_webdataset_output_round_trips_without_pickle(tmp_path, dtype):
    meta = fixture_meta(dtype=dtype, dim=4)
    _, tokens, positions, scores = _table(meta if dtype in DTYPES else fixture_meta(dim=4), n_rows=3, with_scores=True)
    rows = _stage_rows(meta, tokens, positions, scores)
    data = samples_to_wds_tar(rows, meta)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
    member = {"bfloat16": "tokens.bfloat16", "float8_e4m3": "tokens.float8_e4m3"}.get(dtype, "tokens.npy")
    scales = ["k0.token_scales.npy"] if dtype in QUANTIZED else []
    assert names[:4 + len(scales)] == [f"k0.{member}", *scales, "k0.positions.npy", "k0.json", "k0.scores.npy"]
    (tmp_path / "part.tar").write_bytes(data)
    # webdataset's own decoding never hands out bfloat16 words as if they were uint16 values.
    for sample in wds.WebDataset(str(tmp_path / "part.tar"), shardshuffle=False).decode():
        stored = sample[member]
        assert isinstance(stored, bytes) if member != "tokens.npy" else stored.dtype.name == dtype
        assert sample["json"]["dtype"] == dtype and sample["json"]["tokens_member"] == member
    samples = list(wds.WebDataset(str(tmp_path / "part.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    for i, sample in enumerate(samples):
        decoded = decode_wds_sample(sample)
        assert torch.equal(decoded["tokens"], _expected(tokens[i], dtype))
        as_stored = decode_wds_sample(sample, None)  # the stored values (and scales), rescaled on the device
        assert as_stored["tokens"].dtype == TORCH_DTYPES[dtype] and ("token_scales" in as_stored) == (dtype in QUANTIZED)
        assert torch.equal(dequantize(as_stored["tokens"], as_stored.get("token_scales")), decoded["tokens"])
        assert decoded["positions"].tolist() == positions[i].tolist()
        assert decoded["caption"] == f"c{i}" and decoded["grid"] == (1, 2) and decoded["side"] == 4
    with pytest.raises(ValueError, match="invalid key for webdataset output"):
        samples_to_wds_tar([dict(rows[0], key="../a")], meta)


def test_one_key_policy_accepts_what_every_output_format_can_store(tmp_path):
    meta = fixture_meta(dim=4)
    [row] = _stage_rows(meta, *_table(meta, n_rows=1)[1:])
    assert samples_to_wds_tar([dict(row, key="sub/dog")], meta)
    for i, key in enumerate(("good", "000123", "sub/dog", "v1.0/cat", "café", "photo.v2", "2023.01.05", "50%.off")):
        assert key_problem(key) is None, key
        part = tmp_path / f"{i}.tar"
        part.write_bytes(samples_to_wds_tar([dict(row, key=key)], meta))
        [back] = wds.WebDataset(str(part), shardshuffle=False).map(decode_wds_sample)
        assert back["key"] == key
    for key, reason in [
        ("../escape/evil", "is not a relative name"), ("/abs/x", "is not a relative name"), ("a//b", "is not a"),
        ("a/./b", "is not a relative name"), ("a\\b", "backslash or control"), ("a\nb", "backslash or control"),
        ("", "empty"), ("bad\udcffname", "not UTF-8"),
    ]:
        assert reason in (key_problem(key) or ""), key
        with pytest.raises(ValueError, match="invalid key for webdataset output"):
            samples_to_wds_tar([dict(row, key=key)], meta)


def test_read_manifest_lists_files_in_order_and_names_a_missing_manifest(tmp_path):
    write_output(str(tmp_path / "out"), [3, 2])
    assert [m["path"] for m in read_manifest(str(tmp_path / "out"))] == [
        "data/shard000.0.parquet", "data/shard001.0.parquet"]
    with pytest.raises(IncompleteOutputError, match=r"incomplete output: no manifest.parquet in .*empty"):
        read_manifest(str(tmp_path / "empty"))
