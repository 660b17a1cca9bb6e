"""The local executor: overlapped threads give the rows a plain sequential run gives (and, for anyres images,
what the encoder's own API gives), memory stays bounded, errors surface, each stage's time is recorded, and it
runs where Ray is not installed."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.compress.executors import local
from pipeline.compress.executors.local import ROW_CHUNK, decoded_rows
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, CorpusConfig, load_config
from pipeline.corpus import write_corpus
from pipeline.encoders import VisionEncoder
from pipeline.output.format import decode_tokens
from pipeline.selector import build_selector, select_tokens
from pipeline.sources import list_shards
from pipeline.sources.decode import decode_image
from pipeline.stages.decode import decode_shard
from pipeline.stages.encode_select import EncodeSelectStage
from pipeline.stages.records import DECODED_SCHEMA, batches
from pipeline.timeline import recording
from tests.test_compress import stored_rows
from tests.test_encoders import photo_like
from tests.test_gpu_decode import write_tar

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=25, shard_size=4, heldout_fraction=0.2, seed=5))
    return root / "train"


def config(input_path, output_path, *overrides: str) -> CompressConfig:
    return load_config(CompressConfig, None, [
        f"input.path={input_path}", f"output.path={output_path}", "executor=local", "encoder.batch_size=3",
        "selector.method=norm", "selector.mode=ratio", "selector.ratio=0.25", *overrides])


def test_overlapped_run_stores_what_a_sequential_run_computes(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "out")
    summary = run_compress(cfg)  # 20 images in 5 shards, batches of 3: batches span shards
    assert summary["images"] == 20 and summary["shards_processed"] == 5
    stored = {row["key"]: row for row in stored_rows(summary["output"])}

    stage = EncodeSelectStage(cfg)
    expected = {}
    for shard in list_shards(cfg.input, {}):
        for row in stage(pa.Table.from_pylist(list(decode_shard(shard, cfg)), schema=DECODED_SCHEMA)).to_pylist():
            if row["kind"] == "sample":
                expected[row["key"]] = row
    assert sorted(stored) == sorted(expected)
    for key, row in stored.items():
        want = expected[key]
        assert row["n_kept"] == want["n_kept"] == 49 and row["n_tokens"] == want["n_tokens"] == 196
        assert row["tokens"] == want["tokens"], key
        assert row["positions"] == np.frombuffer(want["positions"], dtype="<i4").tolist()


def test_batches_cut_after_batch_size_samples():
    rows = [{"kind": k} for k in ["sample", "quarantine", "sample", "sample", "end", "sample", "end"]]
    assert [[r["kind"] for r in b] for b in batches(rows, 2)] == [
        ["sample", "quarantine", "sample"], ["sample", "end", "sample"], ["end"]]


def test_decoded_rows_hold_a_bounded_number_of_rows(corpus, monkeypatch):
    produced = consumed = high_water = 0
    lock = threading.Lock()

    def counting_decode(shard, cfg):
        nonlocal produced
        for row in fake_rows(shard.shard_id, 100):
            with lock:
                produced += 1
            yield row

    monkeypatch.setattr(local, "decode_shard", counting_decode)
    shards = list_shards(config(corpus, "unused").input, {})
    capacity, threads = 2, 2
    for _ in decoded_rows(shards, config(corpus, "unused"), threads, capacity):
        consumed += 1
        with lock:
            high_water = max(high_water, produced - consumed)
        threading.Event().wait(0.0005)  # a slow consumer
    assert consumed == produced == 100 * len(shards)
    # Queued chunks, plus a chunk being filled and one waiting to be queued per thread.
    assert high_water <= (capacity + 2 * threads) * ROW_CHUNK


def fake_rows(shard_id: str, count: int):
    for i in range(count):
        yield {"kind": "sample", "shard_id": shard_id, "key": f"{shard_id}-{i}"}


def test_a_decode_error_reaches_the_caller_and_stops_the_threads(corpus, monkeypatch):
    def failing_decode(shard, cfg):
        if shard.shard_id.endswith("2"):
            raise PermissionError(f"cannot read {shard.url}")
        yield from fake_rows(shard.shard_id, 50)

    monkeypatch.setattr(local, "decode_shard", failing_decode)
    shards = list_shards(config(corpus, "unused").input, {})
    with pytest.raises(PermissionError, match="cannot read"):
        for _ in decoded_rows(shards, config(corpus, "unused"), threads=2, capacity=1):
            pass
    assert not [t for t in threading.enumerate() if t.name.startswith("decode-")]


def test_the_timeline_records_every_stage(corpus, tmp_path):
    with recording() as timeline:
        run_compress(config(corpus, tmp_path / "out"))
    summary = timeline.summary()
    assert set(summary) == {"decode", "stage", "encode", "gather", "write"}
    assert summary["decode"]["items"] == 25  # 20 samples, 5 end rows
    assert all(summary[stage]["items"] == 20 for stage in ("stage", "encode", "gather", "write"))
    assert summary["encode"]["spans"] == summary["gather"]["spans"] == 7  # ceil(20 / 3)
    assert all(s["busy_s"] > 0 and s["last_end_s"] >= s["first_start_s"] for s in summary.values())


def test_a_local_run_loads_the_encoder_once(corpus, tmp_path, monkeypatch):
    from pipeline.encoders import tower

    loaded = []
    build_tower = tower.build_tower
    monkeypatch.setattr(tower, "build_tower", lambda cfg: loaded.append(cfg.device) or build_tower(cfg))
    assert run_compress(config(corpus, tmp_path / "out", "encoder.device=cpu"))["images"] == 20
    assert loaded == ["cpu"]  # the stage took the driver's encoder rather than loading its own
    run_compress(config(corpus, tmp_path / "out2", "encoder.device=cpu", "dry_run=true"))
    assert len(loaded) == 2


def test_the_local_executor_runs_where_ray_is_not_installed(corpus, tmp_path):
    script = f"""
import json, sys
sys.modules["ray"] = None  # any `import ray` now fails
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, load_config
cfg = load_config(CompressConfig, None, ["input.path={corpus}", "output.path={tmp_path / 'out'}",
                                         "executor=local", "selector.method=norm"])
print(json.dumps(run_compress(cfg)["images"]))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == 20


def test_anyres_images_with_different_grids_match_the_encoders_own_api(tmp_path):
    """Batches mixing 2x2, 1x3, 1x2 and 3x1 grids (3 to 5 tiles) store what encode_images + select_tokens give."""
    members = []
    for i, size in enumerate([(500, 300), (900, 200), (60, 60), (200, 700)]):
        buffer = io.BytesIO()
        photo_like(*size, seed=i).save(buffer, format="JPEG")
        members.append((f"k{i}.jpg", buffer.getvalue()))
    write_tar(tmp_path / "in" / "a.tar", members)
    cfg = config(tmp_path / "in", tmp_path / "out", "encoder.anyres=true", "output.dtype=float32")
    rows = {row["key"]: row for row in stored_rows(run_compress(cfg)["output"])}

    encoder = VisionEncoder.from_config(cfg.encoder)
    selector = build_selector(cfg.selector, encoder.fingerprint(), side=encoder.side)
    for i, (name, data) in enumerate(members):
        encoded = encoder.encode_images([decode_image(data, cfg.decode)])[0]
        tokens, mask = encoded.tokens[None], torch.ones(1, len(encoded.tokens), dtype=torch.bool)
        keep = select_tokens(selector.scores(tokens, mask, keys=[f"k{i}"]), mask, cfg.selector)[0]
        row = rows[f"k{i}"]
        assert (row["grid_rows"], row["grid_cols"]) == encoded.grid and row["n_tokens"] == len(encoded.tokens)
        assert row["positions"] == keep.nonzero()[:, 0].tolist()
        torch.testing.assert_close(decode_tokens(row["tokens"], "float32", encoder.hidden_size), encoded.tokens[keep])
    assert {(r["grid_rows"], r["grid_cols"]) for r in rows.values()} == {(2, 2), (1, 3), (1, 2), (3, 1)}
