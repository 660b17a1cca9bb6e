"""The compress pipeline end to end: outputs, exactly-once commits, resume, incremental runs, bad input."""

from __future__ import annotations

import gzip
import io
import json
import logging
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from job_runs import run_job, summary_of
from PIL import Image

from pipeline.compress.executors.ray_data import actor_batch_rows, write_batch_rows
from pipeline.compress.run import run_compress
from pipeline.compress.shard_committer import ShardCommitter
from pipeline.config import CompressConfig, ConfigError, CorpusConfig, JobError, load_config
from pipeline.corpus import write_corpus
from pipeline.encoders import VisionEncoder
from pipeline.loader import PrunedTokenDataset, data_file_urls
from pipeline.output.commit import CommittedShard, WrittenFile, commit_shard, list_committed
from pipeline.output.format import decode_tokens, decode_wds_sample, read_format_metadata
from pipeline.output.manifest import read_manifest
from pipeline.selector import build_selector, select_tokens
from pipeline.sources import iter_shard, list_shards
from pipeline.sources.decode import decode_image
from pipeline.stages.records import DATA, END
from pipeline.storage import filesystem_for

RATIO = ["selector.method=norm", "selector.mode=ratio", "selector.ratio=0.5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=20, shard_size=4, heldout_fraction=0.2, seed=3))
    return root / "train"


def config(input_path, output_path, *overrides: str) -> CompressConfig:
    return load_config(CompressConfig, None, [f"input.path={input_path}", f"output.path={output_path}",
                                              "executor=local", "encoder.batch_size=8", *RATIO, *overrides])


def corpus_keys(input_path) -> list[str]:
    cfg = config(input_path, "unused")
    return sorted(s.key for shard in list_shards(cfg.input, {}) for s in iter_shard(shard, cfg.input, {}))


def stored_rows(output_dir: str, storage_options=None) -> list[dict]:
    fs, root = filesystem_for(output_dir, storage_options)
    rows = []
    for entry in read_manifest(output_dir, storage_options):
        with fs.open(f"{root}/{entry['path']}", "rb") as handle:
            table = pq.read_table(handle)
        rows.extend(table.to_pylist())
    return rows


def test_golden_run_with_ray_writes_layout_and_tokens_match_the_selector(corpus, tmp_path, ray_cluster):
    cfg = config(corpus, tmp_path / "out", "executor=ray")
    summary = run_compress(cfg)
    out = Path(summary["output"])
    assert summary["shards_processed"] == summary["shards_total"] == 4 and summary["images"] == 16
    assert summary["shards_lost_race"] == 0
    assert summary["tokens_kept"] == summary["tokens_full"] // 2
    for name in ("_config.json", "manifest.parquet", "stats.json"):
        assert (out / name).exists()
    assert len(list((out / "_committed").glob("*.json"))) == 4
    assert json.loads((out / "_config.json").read_text())["cfg_hash"] == summary["cfg_hash"]
    stats = json.loads((out / "stats.json").read_text())
    assert sum(stats["kept_tokens_histogram"].values()) == 16

    rows = {r["key"]: r for r in stored_rows(str(out))}
    assert sorted(rows) == corpus_keys(corpus)
    first = pq.ParquetFile(out / read_manifest(str(out))[0]["path"])
    meta = read_format_metadata(first.schema_arrow)
    assert meta["cfg_hash"] == summary["cfg_hash"] and meta["dtype"] == "float16" and meta["dim"] == 192

    # The same images through the encoder and selector directly give the same kept positions and tokens.
    encoder = VisionEncoder.from_config(cfg.encoder)
    selector = build_selector(cfg.selector, encoder.fingerprint(), side=encoder.side)
    shard = list_shards(cfg.input, {})[0]
    samples = list(iter_shard(shard, cfg.input, {}))
    encoded = encoder.encode_images([decode_image(s.image, cfg.decode) for s in samples])
    tokens = torch.stack([e.tokens for e in encoded])
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
    keep = select_tokens(selector.scores(tokens, mask, keys=[s.key for s in samples]), mask, cfg.selector)
    for i, sample in enumerate(samples):
        row = rows[sample.key]
        expected = keep[i].nonzero()[:, 0]
        assert row["positions"] == expected.tolist()
        assert row["n_tokens"] == 196 and row["n_kept"] == 98 and row["caption"]
        stored = decode_tokens(row["tokens"], "float16", 192)
        torch.testing.assert_close(stored, tokens[i, expected], atol=2e-2, rtol=1e-2)


def test_local_and_ray_executors_store_the_same_rows(corpus, tmp_path, ray_cluster):
    local = run_compress(config(corpus, tmp_path / "a"))
    # Each actor call holds three encoder batches of 3 (staged while the previous one encodes); the local run
    # encodes batches of 8. Neither changes what is stored.
    distributed = run_compress(config(corpus, tmp_path / "b", "executor=ray", "encoder.batch_size=3",
                                      "ray.batches_per_call=3"))
    assert local["cfg_hash"] == distributed["cfg_hash"]
    drop = ("source_shard",)
    a = sorted((tuple(v for k, v in r.items() if k not in drop) for r in stored_rows(local["output"])))
    b = sorted((tuple(v for k, v in r.items() if k not in drop) for r in stored_rows(distributed["output"])))
    assert a == b


def test_actor_calls_hold_several_encoder_batches_on_gpu_actors():
    assert actor_batch_rows(config("in", "out", "executor=ray")) == 8
    assert actor_batch_rows(config("in", "out", "executor=ray", "ray.num_gpus_per_actor=1")) == 32
    assert actor_batch_rows(config("in", "out", "ray.num_gpus_per_actor=1", "ray.batches_per_call=2")) == 16
    with pytest.raises(ConfigError, match="ray.batches_per_call: must be >= 1"):
        config("in", "out", "ray.batches_per_call=0")


def test_write_tasks_take_fewer_rows_where_rows_can_be_large():
    assert write_batch_rows(config("in", "out"), dim=192) == 512  # tiny: 196 tokens, 75 KB a row at most
    clip_l = load_config(CompressConfig, None, ["encoder=clip-vit-l-336"])
    assert clip_l.encoder.max_tiles == 5  # anyres: the base tile and a 2x2 grid at the most
    assert write_batch_rows(clip_l, dim=1024) == 256 * 2**20 // (5 * 576 * 1024 * 2) == 45
    plain_fp32 = load_config(CompressConfig, None, ["encoder=clip-vit-l-336", "encoder.anyres=false",
                                                    "output.dtype=float32"])
    assert plain_fp32.encoder.max_tiles == 1 and write_batch_rows(plain_fp32, dim=1024) == 113


def test_rerun_does_no_work_and_keeps_the_manifest_byte_identical(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "out")
    first = run_compress(cfg)
    manifest = (Path(first["output"]) / "manifest.parquet").read_bytes()
    second = run_compress(cfg)
    assert second["shards_processed"] == 0 and second["shards_skipped"] == 4 and second["images"] == 0
    assert (Path(first["output"]) / "manifest.parquet").read_bytes() == manifest


def test_dry_run_lists_the_todo_and_writes_nothing(corpus, tmp_path):
    summary = run_compress(config(corpus, tmp_path / "out", "dry_run=true"))
    assert summary["todo"] == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    assert not (tmp_path / "out").exists()


def test_new_and_changed_shards_are_processed_by_the_next_run(corpus, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(corpus, inputs)
    extra = inputs / "shard-00003.tar"
    extra.rename(tmp_path / "held-back.tar")
    cfg = config(inputs, tmp_path / "out")
    assert run_compress(cfg)["shards_processed"] == 3
    (tmp_path / "held-back.tar").rename(extra)
    second = run_compress(cfg)
    assert second["shards_processed"] == 1 and second["shards_skipped"] == 3

    # Rewrite shard 0 with one sample fewer: it is redone and the manifest shows only the new version.
    shard0 = inputs / "shard-00000.tar"
    with tarfile.open(shard0) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    dropped = members[0][0].name.split(".")[0]
    with tarfile.open(shard0, "w") as tar:
        for member, data in members:
            if not member.name.startswith(dropped + "."):
                tar.addfile(member, io.BytesIO(data))
    third = run_compress(cfg)
    assert third["shards_processed"] == 1 and third["images"] == 3
    keys = [r["key"] for r in stored_rows(third["output"])]
    assert len(keys) == len(set(keys)) == 15 and dropped not in keys


def test_config_change_writes_a_new_prefix(corpus, tmp_path):
    a = run_compress(config(corpus, tmp_path / "out"))
    b = run_compress(config(corpus, tmp_path / "out", "selector.ratio=0.25"))
    assert a["output"] != b["output"] and b["shards_processed"] == 4
    assert b["tokens_kept"] < a["tokens_kept"]
    assert Path(a["output"], "manifest.parquet").exists()


def test_full_token_baseline_and_webdataset_output(corpus, tmp_path):
    summary = run_compress(config(corpus, tmp_path / "out", "selector.method=none", "output.format=webdataset",
                                  "output.dtype=bfloat16"))
    assert summary["tokens_kept"] == summary["tokens_full"] == 16 * 196
    out = Path(summary["output"])
    tars = [out / e["path"] for e in read_manifest(str(out))]
    names = [n for t in tars for n in tarfile.open(t).getnames()]
    # bfloat16 has no numpy dtype: a raw blob named after it, never a .npy of uint16 words that reads as numbers
    assert len([n for n in names if n.endswith(".tokens.bfloat16")]) == 16
    assert {n.split(".", 1)[1] for n in names} == {"tokens.bfloat16", "positions.npy", "json"}

    # The webdataset library and atr's own resumable dataset read the same samples from the tars.
    samples = list(wds.WebDataset(data_file_urls(str(out)), shardshuffle=False).map(decode_wds_sample))
    assert sorted(s["key"] for s in samples) == corpus_keys(corpus)
    assert all(s["tokens"].shape == (196, 192) and s["positions"].tolist() == list(range(196)) for s in samples)
    by_key = {s["key"]: s["tokens"] for s in samples}
    loaded = list(PrunedTokenDataset(str(out), shuffle=False))
    assert sorted(s["key"] for s in loaded) == corpus_keys(corpus)
    assert all(torch.equal(s["tokens"], by_key[s["key"]]) for s in loaded)


def test_a_crash_between_write_and_commit_leaves_nothing_visible(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "out")
    complete = run_compress(cfg)
    out = Path(complete["output"])
    # Simulate a crashed attempt: a data file written, its marker never created.
    orphan = out / "data" / "shard-00000.crashed-attempt.parquet"
    shutil.copy(out / read_manifest(str(out))[0]["path"], orphan)
    run_compress(cfg)
    assert all(e["path"] != "data/shard-00000.crashed-attempt.parquet" for e in read_manifest(str(out)))
    keys = [s["key"] for s in PrunedTokenDataset(str(out), shuffle=False)]
    assert len(keys) == len(set(keys)) == 16


def test_two_concurrent_commits_of_one_shard_leave_one(tmp_path):
    out = str(tmp_path / "out")
    results = {}

    def attempt(name: str) -> None:
        data = tmp_path / "out" / "data" / f"s.{name}.parquet"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(b"x")
        shard = CommittedShard(shard_id="s", source_url="u", source_fingerprint="f", attempt=name,
                               files=[WrittenFile(path=f"data/s.{name}.parquet", rows=1, bytes=1, sha256="-")])
        results[name] = commit_shard(out, shard, {})

    threads = [threading.Thread(target=attempt, args=(f"a{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [name for name, won in results.items() if won]
    assert len(winners) == 1
    assert [p.name for p in (tmp_path / "out" / "data").iterdir()] == [f"s.{winners[0]}.parquet"]
    assert list_committed(out, {})[("s", "f")].attempt == winners[0]


def test_a_commit_lost_to_another_attempt_is_counted_and_its_files_removed(tmp_path):
    out = tmp_path / "out"
    winner = CommittedShard(shard_id="s", source_url="u", source_fingerprint="f", attempt="first")
    assert commit_shard(str(out), winner, {})
    (out / "data").mkdir()
    (out / "data" / "s.second.parquet").write_bytes(b"x")
    committer = ShardCommitter(str(out), "second", {})
    committer.observe({"kind": DATA, "shard_id": "s", "path": "data/s.second.parquet", "rows": 1, "bytes": 1,
                       "sha256": "-", "tokens_full": 4, "tokens_kept": 2, "kept_counts": "[2]"})
    committer.observe({"kind": END, "shard_id": "s", "total": 1, "source_url": "u", "source_fingerprint": "f"})
    assert committer.totals.shards_lost_race == 1 and committer.totals.shards_processed == 0
    assert committer.totals.images == 0 and not committer.unfinished()
    assert list((out / "data").iterdir()) == []
    assert list_committed(str(out), {})[("s", "f")].attempt == "first"


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_quarantined_and_good_ones_kept(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    rotated = photo.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")
    members = [
        ("good.jpg", _jpeg(photo)), ("good.txt", b"a fine picture"),
        ("truncated.jpg", _jpeg(photo)[:300]),
        ("notimage.jpg", b"this is not an image at all"),
        ("empty.jpg", b""),
        ("bomb.png", bomb.getvalue()),
        ("cmyk.jpg", _jpeg(photo.convert("CMYK"))),
        ("gray16.png", _png(Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)))),
        ("palette.png", _png(photo.convert("P"))),
        ("alpha.png", _png(photo.convert("RGBA"))),
        ("exif.jpg", _jpeg(rotated, exif=exif)),
        ("onlytext.txt", b"no image here"),
        ("good.png", _png(photo)),  # duplicate key "good"
    ]
    inputs = tmp_path / "in"
    inputs.mkdir()
    with tarfile.open(inputs / "bad.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = run_compress(config(inputs, tmp_path / "out", "decode.max_pixels=10000000"))
    out = Path(summary["output"])
    kept = {r["key"]: r for r in stored_rows(str(out))}
    assert sorted(kept) == ["alpha", "cmyk", "exif", "good", "gray16", "palette"]
    assert (kept["exif"]["width"], kept["exif"]["height"]) == (120, 160)  # EXIF rotation applied
    assert kept["good"]["caption"] == "a fine picture"
    marker = next((out / "_committed").glob("*.json"))
    files = json.loads(marker.read_text())["quarantine_files"]
    reasons = {r["key"]: r["reason"] for f in files for r in pq.read_table(out / f["path"]).to_pylist()}
    assert reasons["truncated"].startswith("truncated")
    assert reasons["notimage"].startswith("not an image")
    assert reasons["empty"].startswith("empty")
    assert reasons["bomb"].startswith("too many pixels")
    assert reasons["onlytext"].startswith("missing image")
    assert reasons["good"].startswith("duplicate key")
    assert summary["quarantined"] == len(reasons) == 6


def test_truncated_tar_keeps_the_samples_before_the_damage(corpus, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = (corpus / "shard-00000.tar").read_bytes()
    (inputs / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    summary = run_compress(config(inputs, tmp_path / "out"))
    assert 1 <= summary["images"] < 4 and summary["quarantined"] >= 1
    assert summary["shards_processed"] == 1


def test_s3_input_and_output(corpus, tmp_path, s3_bucket, s3_options, s3_server):
    fs, _ = filesystem_for(f"s3://{s3_bucket}", s3_options)
    for tar in sorted(corpus.glob("*.tar"))[:2]:
        fs.put_file(str(tar), f"{s3_bucket}/in/{tar.name}")
    cfg = config(f"s3://{s3_bucket}/in/*.tar", f"s3://{s3_bucket}/out", f"storage.endpoint_url={s3_server}")
    summary = run_compress(cfg)
    assert summary["output"].startswith(f"s3://{s3_bucket}/out/") and summary["images"] == 8
    keys = [r["key"] for r in stored_rows(summary["output"], s3_options)]
    assert len(keys) == len(set(keys)) == 8
    again = run_compress(cfg)
    assert again["shards_processed"] == 0 and again["shards_skipped"] == 2


def test_unwritable_output_fails_with_a_clear_error(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JobError, match="is not writable"):
        run_compress(config(corpus, blocker / "out"))


def test_a_job_prints_the_library_progress_lines_on_stderr_and_its_summary_last(corpus, tmp_path):
    proc = run_job("compress", f"input.path={corpus}", f"output.path={tmp_path / 'out'}", "executor=local",
                   "encoder.batch_size=8", *RATIO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("[compress] resolved config: ")
    assert any(line.startswith("[compress] output ") and "| to do 4 |" in line for line in lines)
    assert any(line.startswith("[compress] shards 4/4 | images 16 ") and line.endswith("| done") for line in lines)
    assert summary_of(proc)["status"] == "ok" and summary_of(proc)["shards_processed"] == 4


# ------------------------------------------------------------------------------------------------ hostile input


def _tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(sum(size)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile_inputs(tmp_path_factory) -> dict[str, tuple[Path, dict[str, str]]]:
    """Three corpora (one input format each) holding every case of the hostile-input table beside good samples:
    {name: (input folder, {key: "ok" or the start of its quarantine reason})}."""
    from test_sources import FOLDER_REASONS, hostile_folder

    root = tmp_path_factory.mktemp("hostile")
    good = _encoded((64, 48), "JPEG")
    tars = root / "tars"
    tars.mkdir()
    (tars / "hostile.tar").write_bytes(_tar_of([
        ("good.jpg", good), ("good.txt", b"a fine picture"),
        ("strip60000.png", _encoded((1, 60000), "PNG")),  # its shortest-edge resize would take 40 GB
        ("strip3000.png", _encoded((1, 3000), "PNG")),
        *((f"{ext}pic.{ext}", _encoded((40, 30), fmt)) for ext, fmt in
          (("gif", "GIF"), ("bmp", "BMP"), ("tiff", "TIFF"), ("webp", "WEBP"))),
        ("noext_member.", good),
        ("../escape/evil.jpg", good),
        ("good2.png", _encoded((50, 50), "PNG")),
    ]))
    small = _tar_of([("one.jpg", good), ("two.jpg", good)])
    (tars / "gzipped-but-named.tar").write_bytes(gzip.compress(small))
    # Keys are unique across the dataset (a key in two shards fails the run: output.on_duplicate_key).
    (tars / "x.tar.gz").write_bytes(gzip.compress(_tar_of([("one_x.jpg", good), ("two_x.jpg", good)])))
    (tars / "y.tgz").write_bytes(gzip.compress(_tar_of([("three.jpg", good)])))
    cut = _tar_of([("four.jpg", good), ("five.jpg", good), ("six.jpg", good)])
    (tars / "truncated.tar").write_bytes(cut[: len(cut) // 2])  # a "*" record: how many it hides is unknown
    tar_expected = {key: "ok" for key in ("good", "strip3000", "gifpic", "bmppic", "tiffpic", "webppic", "good2",
                                          "one", "two", "one_x", "two_x", "three", "four")}
    tar_expected |= {"strip60000": "extreme aspect ratio:", "noext_member": "missing image member: no jpg/",
                     "../escape/evil": "invalid key: '../escape/evil' is not a relative name",
                     "*": "truncated tar after member 'four.jpg'"}
    parquet = root / "parquet"
    parquet.mkdir()
    pq.write_table(pa.table({"key": list("abcdef"), "jpg": ["not bytes"] * 6}), parquet / "strings.parquet")
    pq.write_table(pa.table({"key": ["p1", "p2"], "jpg": [good, good]}), parquet / "good.parquet")
    parquet_expected = {"p1": "ok", "p2": "ok", "*": "missing image column: jpg has type string"}
    hostile_folder(root / "folder")
    return {"tars": (tars, tar_expected), "parquet": (parquet, parquet_expected),
            "folder": (root / "folder", dict(FOLDER_REASONS))}


# Every sample of each corpus as the summary counts them: the tars' 10 members, 2 + 2 + 1 in the compressed
# ones and the truncated tar's first sample plus one for its damaged rest (how many it hid is unknowable); the
# Parquet files' 2 good rows and the 6 of the string column; the folder's 10 entries.
INPUT_SAMPLES = {"tars": 17, "parquet": 8, "folder": 10}


def _outcome(summary: dict) -> dict[str, str]:
    out = Path(summary["output"])
    result = {r["key"]: "ok" for r in stored_rows(str(out))}
    for marker in (out / "_committed").glob("*.json"):
        for f in json.loads(marker.read_text())["quarantine_files"]:
            result |= {r["key"]: r["reason"] for r in pq.read_table(out / f["path"]).to_pylist()}
    return result


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_hostile_inputs_are_quarantined_one_by_one_and_the_job_goes_on(hostile_inputs, tmp_path, executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    for name, (inputs, expected) in hostile_inputs.items():
        summary = run_compress(config(inputs, tmp_path / name, f"executor={executor}"))
        result = _outcome(summary)
        assert sorted(result) == sorted(expected), name
        for key, reason in expected.items():
            assert result[key].startswith(reason), (name, key, result[key])
        assert summary["images"] == len(stored_rows(summary["output"])), name
        assert summary["shards_processed"] == summary["shards_total"], name
        assert summary["input_samples"] == INPUT_SAMPLES[name] == summary["images"] + summary["quarantined"], name


def test_hostile_tar_keys_give_the_same_rows_for_both_output_formats(hostile_inputs, tmp_path):
    inputs, _ = hostile_inputs["tars"]
    parquet = run_compress(config(inputs, tmp_path / "parquet"))
    webdataset = run_compress(config(inputs, tmp_path / "wds", "output.format=webdataset"))
    keys = []
    for data_file in sorted((Path(webdataset["output"]) / "data").glob("*.tar")):
        keys += [decode_wds_sample(s)["key"] for s in wds.WebDataset(str(data_file), shardshuffle=False)]
    assert sorted(keys) == sorted(r["key"] for r in stored_rows(parquet["output"]))
    for field in ("images", "quarantined", "input_samples"):
        assert parquet[field] == webdataset[field]
    # The tars' readers learn the encoder and selector from dataset.json, as Parquet readers from the schema.
    from_parquet, from_tars = (PrunedTokenDataset(out["output"]).meta for out in (parquet, webdataset))
    for field in ("encoder", "encoder_fingerprint", "select_layer", "dtype", "dim", "side", "selector"):
        assert from_tars[field] == from_parquet[field], field


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_progress_comes_every_interval_from_inside_shards_with_rate_and_eta(tmp_path, executor, caplog, request):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    root = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(root), n=64, shard_size=32, heldout_fraction=0.0, seed=5, image_size=128))
    caplog.set_level(logging.INFO, logger="pipeline")
    summary = run_compress(config(root / "train", tmp_path / "out", f"executor={executor}", "encoder.batch_size=4",
                                  "progress_interval_s=0.3"))
    assert summary["images"] == 64
    lines = [r for r in caplog.records if r.name == "pipeline.compress.progress"]
    *ticks, last = lines
    assert last.getMessage().startswith("[compress] shards 2/2 | images 64 (") and last.getMessage().endswith("| done")
    assert len(ticks) >= 2 and all(" ETA " in r.getMessage() and "/s) |" in r.getMessage() for r in ticks)
    # Lines while no shard had committed yet, counting images encoded inside the shards.
    assert any(r.getMessage().startswith("[compress] shards 0/2 | images ") and
               not r.getMessage().startswith("[compress] shards 0/2 | images 0 ") for r in ticks)
    assert any(r.getMessage().split(" | ")[-1] not in ("ETA ?",) for r in ticks)
    gaps = [b.created - a.created for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.3 * 4  # one line per interval (a loaded machine may delay a tick)
