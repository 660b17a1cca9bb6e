"""Nightly increments over a growing, changing corpus: one dataset identity however the shards are addressed,
brace members that are not there yet, mirror semantics (removed and changed inputs), unique keys, and the
checkpoint's own image processor. Local executor, tiny random encoder, a random selector: seconds per run."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from job_runs import loader_keys
from PIL import Image

from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, ConfigError, EncoderConfig, JobError, load_config
from pipeline.encoders import VisionEncoder
from pipeline.output.format import decode_tokens
from pipeline.output.gc import GcConfig, find_orphans, run_gc
from pipeline.output.manifest import read_manifest
from pipeline.sources.decode import decode_image
from pipeline.storage import filesystem_for, write_bytes

HOUR = 3600.0
FAST = ["executor=local", "selector.method=random", "selector.mode=ratio", "selector.ratio=0.25",
        "encoder.batch_size=8", "progress_interval_s=60"]
NIGHTLY = logging.getLogger("atr.test.nightly")


def png(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def shard_tar(keys: list[str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key in keys:
            for name, data in ((f"{key}.png", png(zlib.crc32(key.encode()))), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def put_shard(root: str, name: str, keys: list[str], options: dict | None = None) -> None:
    write_bytes(f"{root}/{name}.tar", shard_tar(keys), options or {})
    if "://" not in root:  # a rewrite within the same second must still change mtime+size fingerprints
        stamp = time.time() + len(keys)
        os.utime(f"{root}/{name}.tar", (stamp, stamp))


def compress(input_path: str, output: str, *overrides: str) -> dict:
    return run_compress(load_config(CompressConfig, None, [f"input.path={input_path}", f"output.path={output}",
                                                           *FAST, *overrides]))


def keys_of(shards: dict[str, list[str]]) -> list[str]:
    return sorted(k for keys in shards.values() for k in keys)


def night_line(night: str, summary: dict) -> str:
    return (f"{night}: added {summary['shards_added']} changed {summary['shards_changed']} removed "
            f"{summary['shards_removed']} missing {summary['shards_missing']} skipped {summary['shards_skipped']} "
            f"| processed {summary['shards_processed']} images {summary['images']}")


# ----------------------------------------------------------------------------------------- dataset identity


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_glob_a_folder_and_a_brace_range_are_one_dataset(where, tmp_path, request):
    if where == "s3":
        bucket, server = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
        options = request.getfixturevalue("s3_options")
        root, output, extra = f"s3://{bucket}/laion", f"s3://{bucket}/pruned", [f"storage.endpoint_url={server}"]
    else:
        root, output, options, extra = str(tmp_path / "laion"), str(tmp_path / "pruned"), {}, []
    shards = {f"{i:05d}": [f"s{i}-{j}" for j in range(2)] for i in range(3)}
    for name, keys in shards.items():
        put_shard(root, name, keys, options)

    runs = [compress(pattern, output, *extra)
            for pattern in (f"{root}/*.tar", root, f"{root}/{{00000..00002}}.tar")]

    assert len({r["cfg_hash"] for r in runs}) == 1
    assert [r["shards_processed"] for r in runs] == [3, 0, 0]
    assert [r["shards_skipped"] for r in runs] == [0, 3, 3]
    assert sorted(loader_keys(runs[0]["output"], options)) == keys_of(shards)


def test_widening_a_brace_range_encodes_only_the_new_names_that_exist(tmp_path):
    root, output = str(tmp_path / "laion"), str(tmp_path / "pruned")
    shards = {f"{i:05d}": [f"s{i}-0"] for i in range(3)}
    for name, keys in shards.items():
        put_shard(root, name, keys)
    first = compress(f"{root}/{{00000..00002}}.tar", output)
    for name in ("00003", "00005"):  # 2 of the 5 new names are there; 00004, 00006, 00007 are not (yet)
        shards[name] = [f"new-{name}"]
        put_shard(root, name, shards[name])

    wider = compress(f"{root}/{{00000..00007}}.tar", output)

    assert wider["cfg_hash"] == first["cfg_hash"]
    assert (wider["shards_processed"], wider["shards_added"], wider["shards_missing"], wider["shards_skipped"]) == \
        (2, 2, 3, 3)
    assert sorted(loader_keys(wider["output"])) == keys_of(shards)
    stats = json.loads(Path(wider["output"], "stats.json").read_text())
    assert stats["shards"] == {"total": 5, "added": 2, "changed": 0, "removed": 0, "missing": 3, "skipped": 3}
    with pytest.raises(ConfigError, match=r"^input\.path: .*00004\.tar does not exist"):
        compress(f"{root}/{{00000..00007}}.tar", output, "input.missing=error")


def test_recutting_a_folder_serves_each_image_exactly_once(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"img{i}.png").write_bytes(png(100 + i))
    by_two = compress(str(folder), str(tmp_path / "out"), "input.folder_shard_size=2")
    by_four = compress(str(folder), str(tmp_path / "out"), "input.folder_shard_size=4")

    # The cut is part of the output, so each cut has its own, self-consistent prefix.
    assert by_two["cfg_hash"] != by_four["cfg_hash"]
    for run, shards in ((by_two, 4), (by_four, 2)):
        assert len(read_manifest(run["output"])) == shards
        keys = loader_keys(run["output"])
        assert len(keys) == 8 and sorted(keys) == sorted(f"img{i}" for i in range(8))


# ------------------------------------------------------------------------------------------ mirror semantics


def test_a_deleted_input_leaves_the_manifest_and_gc_collects_it_after_the_grace_period(tmp_path):
    root, output = str(tmp_path / "laion"), str(tmp_path / "pruned")
    shards = {f"{i:05d}": [f"s{i}-{j}" for j in range(2)] for i in range(3)}
    for name, keys in shards.items():
        put_shard(root, name, keys)
    first = compress(root, output)
    out = first["output"]
    [gone] = [m for m in read_manifest(out) if m["shard_id"] == "00001"]
    os.remove(f"{root}/00001.tar")
    del shards["00001"]

    second = compress(root, output)

    assert (second["shards_removed"], second["shards_processed"]) == (1, 0)
    assert {m["shard_id"] for m in read_manifest(out)} == {"00000", "00002"}
    assert sorted(loader_keys(out)) == keys_of(shards)
    run_gc(GcConfig(path=output, repair=True))  # a full rebuild from every marker does not bring it back
    assert {m["shard_id"] for m in read_manifest(out)} == {"00000", "00002"}
    gc = GcConfig(path=output, grace_hours=24)
    assert find_orphans(gc) == []  # within the grace period a reader holding the old manifest still works
    later = {o.url[len(out) + 1:] for o in find_orphans(gc, now=time.time() + 25 * HOUR)}
    assert gone["path"] in later and any(p.startswith("_committed/00001.") for p in later)
    assert all("00001." in p for p in later)
    run_gc(GcConfig(path=output, grace_hours=0, apply=True))
    assert not Path(out, gone["path"]).exists() and not list(Path(out, "_committed").glob("00001.*"))
    assert sorted(loader_keys(out)) == keys_of(shards)
    # The input coming back is encoded again, since its old version is gone.
    put_shard(root, "00001", ["s1-0", "s1-1"])
    assert compress(root, output)["shards_added"] == 1
    assert sorted(loader_keys(out)) == sorted(keys_of(shards) + ["s1-0", "s1-1"])


def test_keep_removed_inputs_keeps_the_append_only_behaviour(tmp_path):
    root, output = str(tmp_path / "laion"), str(tmp_path / "pruned")
    for i in range(2):
        put_shard(root, f"{i:05d}", [f"s{i}"])
    out = compress(root, output, "output.keep_removed_inputs=true")["output"]
    os.remove(f"{root}/00001.tar")
    again = compress(root, output, "output.keep_removed_inputs=true")
    assert again["shards_removed"] == 1 and sorted(loader_keys(out)) == ["s0", "s1"]
    assert find_orphans(GcConfig(path=output, grace_hours=0)) == []


# ------------------------------------------------------------------------------------------------- unique keys


def test_a_key_in_two_shards_is_reported_with_both_shard_ids(tmp_path):
    root, output = str(tmp_path / "laion"), str(tmp_path / "pruned")
    inputs = {"00000": ["a", "b", "c"], "00001": ["c", "d"], "00002": ["d", "e"]}
    for name, keys in inputs.items():
        put_shard(root, name, keys)

    with pytest.raises(JobError, match=r"2 duplicate keys .*key 'c' is in shards 00000 and 00001.*"
                                       r"output\.on_duplicate_key=keep_first"):
        compress(root, output)
    kept = compress(root, output, "output.on_duplicate_key=keep_first")

    # The accounting identity: what the loader yields is every distinct input key, once.
    yielded = loader_keys(kept["output"])
    assert Counter(yielded) == Counter(set(keys_of(inputs)))
    assert len(yielded) == len(set(keys_of(inputs))) == 5 and kept["duplicate_keys"] == 2
    assert kept["shards_processed"] == 0  # the failed run committed the shards; only the manifest waited


# ---------------------------------------------------------------------------------- the checkpoint's processor


def test_a_checkpoint_is_encoded_with_its_own_mean_and_std(tmp_path, caplog):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tiny = EncoderConfig()
    checkpoint = tmp_path / "my-clip"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=tiny.image_size, patch_size=tiny.patch_size,
                                     hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
                                     num_attention_heads=tiny.num_heads,
                                     intermediate_size=tiny.intermediate_size)).save_pretrained(checkpoint)
    CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": tiny.image_size},
                       crop_size=tiny.image_size).save_pretrained(checkpoint)
    root = str(tmp_path / "in")
    put_shard(root, "00000", ["x", "y"])

    with caplog.at_level(logging.WARNING, logger="pipeline.encoders.tower"):
        own = compress(root, str(tmp_path / "out"), f"encoder.pretrained={checkpoint}", "selector.method=none")
    preset = compress(root, str(tmp_path / "out"), f"encoder.pretrained={checkpoint}", "selector.method=none",
                      "encoder.preprocessor=config")

    assert own["cfg_hash"] != preset["cfg_hash"]
    warning = [r.getMessage() for r in caplog.records if "preprocessor_config.json" in r.getMessage()]
    assert warning and "encoder.image_mean=[0.48145466" in warning[0] and "[0.5, 0.5, 0.5]" in warning[0]
    resolved = json.loads(Path(own["output"], "_config.json").read_text())["fingerprint"]["encoder"]
    assert resolved["image_mean"] == resolved["image_std"] == [0.5, 0.5, 0.5]
    # The stored tokens are the checkpoint's own preprocessing, not the preset's.
    with tarfile.open(f"{root}/00000.tar") as tar:
        image = decode_image(tar.extractfile("x.png").read(), load_config(CompressConfig).decode)
    fs, _ = filesystem_for(own["output"])
    for run, mean in ((own, 0.5), (preset, None)):
        [entry] = read_manifest(run["output"])
        row = next(r for r in pq.read_table(f"{run['output']}/{entry['path']}").to_pylist() if r["key"] == "x")
        cfg = EncoderConfig(pretrained=str(checkpoint), preprocessor="config",
                            **({"image_mean": [mean] * 3, "image_std": [mean] * 3} if mean else {}))
        expected = VisionEncoder.from_config(cfg).encode_images([image])[0].tokens
        torch.testing.assert_close(decode_tokens(row["tokens"], "float16", tiny.hidden_size), expected,
                                   atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------------------------- a week of nights


def test_a_week_of_nightly_runs_serves_each_current_sample_once(tmp_path, capsys):
    root, output = str(tmp_path / "laion"), str(tmp_path / "pruned")
    pattern = f"{root}/{{00000..00009}}.tar"
    current: dict[str, list[str]] = {}

    def put(name: str, keys: list[str]) -> None:
        current[name] = keys
        put_shard(root, name, keys)

    def remove(name: str) -> None:
        del current[name]
        os.remove(f"{root}/{name}.tar")

    nights = [
        ("mon first run", lambda: [put(f"{i:05d}", [f"s{i}-{j}" for j in range(2)]) for i in range(3)]),
        ("tue grow", lambda: [put(f"{i:05d}", [f"s{i}-{j}" for j in range(2)]) for i in (3, 4)]),
        ("wed re-shard 00004 into 00005+00006", lambda: [remove("00004"), put("00005", ["s4-0"]),
                                                         put("00006", ["s4-1", "s6-0"])]),
        ("thu take down 00001", lambda: remove("00001")),
        ("fri change 00002 (one sample removed)", lambda: put("00002", ["s2-1"])),
        ("sat nothing new", lambda: None),
    ]
    lines = []
    out = None
    for night, change in nights:
        change()
        summary = compress(pattern, output)
        out = summary["output"]
        lines.append(night_line(night, summary))
        yielded = loader_keys(out)
        assert Counter(yielded) == Counter(keys_of(current)) and len(yielded) == len(set(yielded)), night
    run_gc(GcConfig(path=output, grace_hours=24, apply=True))
    assert sorted(loader_keys(out)) == keys_of(current)  # nothing current is ever collected
    swept = run_gc(GcConfig(path=output, grace_hours=0, apply=True))
    lines.append(f"sun gc: {swept['orphans']} files of removed or superseded inputs collected")
    assert sorted(loader_keys(out)) == keys_of(current)
    markers = sorted(p.name.split(".")[0] for p in Path(out, "_committed").glob("*.json"))
    assert markers == sorted(current)  # one marker per current input shard is all that is left
    data_files = sorted(p.name for p in Path(out, "data").rglob("*.parquet"))
    assert len(data_files) == len(read_manifest(out))

    assert [line.split(":")[1].split("|")[0].strip() for line in lines[:-1]] == [
        "added 3 changed 0 removed 0 missing 7 skipped 0",
        "added 2 changed 0 removed 0 missing 5 skipped 3",
        "added 2 changed 0 removed 1 missing 4 skipped 4",
        "added 0 changed 0 removed 1 missing 5 skipped 5",
        "added 0 changed 1 removed 0 missing 5 skipped 4",
        "added 0 changed 0 removed 0 missing 5 skipped 5",
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
