"""jobs.gc: attempt files no commit marker references are orphans once older than the grace period."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from job_runs import list_files

from pipeline.config import ConfigError, load_config
from pipeline.output.commit import CommittedShard, WrittenFile, commit_shard
from pipeline.output.gc import GcConfig, find_orphans, remove
from pipeline.output.gc import run_gc as gc_main
from pipeline.storage import filesystem_for, write_bytes

HOUR = 3600.0
COMMITTED = ("data/s0.run1-aa.parquet", "quarantine/s0.run1-aa.parquet")
CRASHED = ("data/s1.run1-bb.parquet", "quarantine/s1.run1-bb.parquet")  # written, never committed
LOST_RACE = ("data/s0.run2-cc.parquet",)  # a second attempt at a committed shard


def write_output(output_dir: str, storage_options: dict, *, commit: bool = True) -> None:
    """A compress output folder: one committed shard, plus the files of a crashed and of a losing attempt."""
    write_bytes(f"{output_dir}/_config.json", b"{}", storage_options)
    for path in COMMITTED + CRASHED + LOST_RACE:
        write_bytes(f"{output_dir}/{path}", b"PAR1 rows PAR1", storage_options)
    if commit:
        files = [WrittenFile(path=COMMITTED[0], rows=3, bytes=14, sha256="-")]
        quarantine = [WrittenFile(path=COMMITTED[1], rows=1, bytes=14, sha256="-")]
        shard = CommittedShard(shard_id="s0", source_url="in/s0.tar", source_fingerprint="etag0", attempt="run1",
                               files=files, quarantine_files=quarantine, rows=3, quarantined=1)
        assert commit_shard(output_dir, shard, storage_options)


def relative(orphans, output_dir: str) -> set[str]:
    return {o.url[len(output_dir) + 1:] for o in orphans}


def age_local_files(output_dir: str, paths, hours: float) -> None:
    stamp = time.time() - hours * HOUR
    for path in paths:
        os.utime(f"{output_dir}/{path}", (stamp, stamp))


def test_only_unreferenced_files_older_than_the_grace_period_are_orphans(tmp_path):
    output_dir = str(tmp_path / "out" / "tiny" / "hash1")
    write_output(output_dir, {})
    age_local_files(output_dir, COMMITTED + CRASHED, hours=30)  # the losing attempt's file is fresh

    orphans = find_orphans(GcConfig(path=str(tmp_path / "out"), grace_hours=24))

    assert relative(orphans, output_dir) == set(CRASHED)
    assert all(29 < o.age_hours < 31 and o.bytes == 14 for o in orphans)
    later = find_orphans(GcConfig(path=str(tmp_path / "out"), grace_hours=24), now=time.time() + 25 * HOUR)
    assert relative(later, output_dir) == set(CRASHED + LOST_RACE)


def test_remove_deletes_the_orphans_and_nothing_committed(tmp_path):
    output_dir = str(tmp_path / "out" / "tiny" / "hash1")
    write_output(output_dir, {})
    before = set(list_files(output_dir))
    cfg = GcConfig(path=output_dir, grace_hours=0)

    remove(find_orphans(cfg), cfg)

    orphaned = {f"{output_dir}/{p}" for p in CRASHED + LOST_RACE}
    assert set(list_files(output_dir)) == before - orphaned
    assert find_orphans(cfg) == []


def test_the_job_is_a_dry_run_unless_applied(tmp_path):
    output_dir = str(tmp_path / "out" / "tiny" / "hash1")
    write_output(output_dir, {})
    before = set(list_files(output_dir))

    dry = gc_main(GcConfig(path=str(tmp_path / "out"), grace_hours=0))
    assert (dry["applied"], dry["orphans"], dry["bytes"]) == (False, 3, 42)
    assert set(list_files(output_dir)) == before

    applied = gc_main(GcConfig(path=str(tmp_path / "out"), grace_hours=0, apply=True))
    assert applied["files"] == dry["files"]
    assert set(list_files(output_dir)) == before - set(dry["files"])


def test_the_path_may_be_the_output_root_or_one_output_folder(tmp_path):
    first, second = str(tmp_path / "out" / "tiny" / "hash1"), str(tmp_path / "out" / "clip-l" / "hash2")
    write_output(first, {})
    write_output(second, {})

    everything = find_orphans(GcConfig(path=str(tmp_path / "out"), grace_hours=0))
    one = find_orphans(GcConfig(path=second, grace_hours=0))

    expected = {f"{folder}/{p}" for folder in (first, second) for p in CRASHED + LOST_RACE}
    assert {o.url for o in everything} == expected
    assert {o.url for o in one} == {u for u in expected if u.startswith(second)}


def test_a_run_that_crashed_before_its_first_commit_is_collected_too(tmp_path):
    output_dir = str(tmp_path / "out" / "tiny" / "hash1")
    write_output(output_dir, {}, commit=False)  # _config.json and data, but no _committed/ folder yet

    orphans = find_orphans(GcConfig(path=str(tmp_path / "out"), grace_hours=0))

    assert relative(orphans, output_dir) == set(COMMITTED + CRASHED + LOST_RACE)


def test_on_s3_the_grace_period_uses_the_object_time(s3_bucket, s3_options, s3_server):
    root = f"s3://{s3_bucket}/out"
    output_dir = f"{root}/tiny/hash1"
    write_output(output_dir, s3_options)
    cfg = GcConfig(path=root, grace_hours=1)
    cfg.storage.endpoint_url = s3_server

    assert find_orphans(cfg) == []  # everything was just written
    orphans = find_orphans(cfg, now=time.time() + 2 * HOUR)
    assert relative(orphans, output_dir) == set(CRASHED + LOST_RACE)
    assert all(1.9 < o.age_hours < 2.2 for o in orphans)

    remove(orphans, cfg)
    fs, path = filesystem_for(output_dir, s3_options)
    fs.invalidate_cache()
    left = {p[len(path) + 1:] for p in fs.find(path)}
    assert {p for p in left if not p.startswith("_committed/")} == {"_config.json", *COMMITTED}


def test_a_negative_grace_period_is_rejected():
    with pytest.raises(ConfigError, match="grace_hours"):
        load_config(GcConfig, None, ["grace_hours=-1"])


def test_a_path_without_outputs_has_no_orphans(tmp_path):
    (tmp_path / "data").mkdir()
    Path(tmp_path / "data" / "unrelated.parquet").write_bytes(b"x")
    assert find_orphans(GcConfig(path=str(tmp_path), grace_hours=0)) == []
