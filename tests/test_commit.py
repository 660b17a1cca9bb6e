"""The commit protocol's markers: durable, idempotent, and a marker that does not parse never trusted."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
from job_runs import FAST_COMPRESS, input_keys, referenced_files, small_corpus

from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, JobError, load_config
from pipeline.output import commit
from pipeline.output.commit import (
    COMMITTED_DIR,
    CORRUPT_DIR,
    STAGING_DIR,
    CommittedShard,
    WrittenFile,
    commit_shard,
    list_committed,
)
from pipeline.output.gc import GcConfig, find_orphans, run_gc
from pipeline.output.manifest import read_manifest
from pipeline.storage import TMP_SUFFIX, filesystem_for


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), n=6, seed=4)


def compress(corpus: Path, output: Path, *overrides: str) -> dict:
    return run_compress(load_config(CompressConfig, None, [f"input.path={corpus}", f"output.path={output}",
                                                           "executor=local", *FAST_COMPRESS, *overrides]))


@pytest.mark.parametrize("torn", [b"", b'{"shard_id": "shard-0000', b"\x00" * 64])
def test_a_torn_marker_is_named_set_aside_and_its_shard_redone(torn, corpus, tmp_path, caplog):
    out = tmp_path / "out"
    first = compress(corpus, out)
    markers = sorted((Path(first["output"]) / COMMITTED_DIR).glob("*.json"))
    markers[0].write_bytes(torn)  # what a crash before fsync, or a foreign tool, leaves

    with caplog.at_level(logging.WARNING, logger="pipeline"):
        dry = compress(corpus, out, "dry_run=true")
        assert len(dry["todo"]) == 1
        before = run_gc(GcConfig(path=str(out), grace_hours=0))  # neither trusts nor fails on it
    assert any(str(markers[0]) in r.getMessage() and "does not parse" in r.getMessage() for r in caplog.records)
    # Readers still use what the manifest shows: gc leaves the torn marker's files until a rerun replaces them.
    shown = {e["path"] for e in read_manifest(first["output"])}
    assert not {Path(url).relative_to(first["output"]).as_posix() for url in before["files"]} & shown

    rerun = compress(corpus, out)
    assert rerun["shards_processed"] == 1 and rerun["shards_skipped"] == 1
    # Now the torn marker's files are referenced by nothing: gc sees them, and only them, as orphans.
    orphans = run_gc(GcConfig(path=str(out), grace_hours=0))
    assert orphans["orphans"] >= 1 and all(markers[0].name.split(".")[0] in url for url in orphans["files"])
    assert not {Path(url).relative_to(first["output"]).as_posix() for url in orphans["files"]} & {
        e["path"] for e in read_manifest(first["output"])}
    aside = list((Path(first["output"]) / COMMITTED_DIR / CORRUPT_DIR).iterdir())
    assert len(aside) == 1 and aside[0].read_bytes() == torn
    assert len(list_committed(first["output"], {})) == 2
    assert sum(s.rows + s.quarantined for s in list_committed(first["output"], {}).values()) == \
        len(input_keys(str(corpus)))
    assert {e["path"] for e in read_manifest(first["output"])} <= referenced_files(first["output"])


def test_disk_full_names_the_path_and_gc_lists_the_temporary_files(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = compress(corpus, out)
    from pipeline import storage
    real_fsync = storage.os.fsync

    def fsync_until_full(fd):
        # The disk fills while the first data file is written, leaving its temporary file as a crash would.
        if TMP_SUFFIX in os.readlink(f"/proc/self/fd/{fd}") and "/data/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", fsync_until_full)
    monkeypatch.setattr(storage, "_unlink_quietly", lambda path: None)  # as if killed before cleaning up
    with pytest.raises((JobError, OSError), match=r"no space left on device \(ENOSPC\)") as failed:
        compress(corpus, out, "selector.ratio=0.25")
    message = str(failed.value)
    assert str(out) in message and "\n" not in message
    monkeypatch.undo()

    leftovers = sorted(p for p in out.rglob(f".*{TMP_SUFFIX}"))
    assert leftovers
    orphans = find_orphans(GcConfig(path=str(out), grace_hours=0))
    assert {o.url for o in orphans} >= {str(p) for p in leftovers}
    assert json.loads((Path(first["output"]) / "_config.json").read_text())  # the first output is untouched


def test_gc_repair_rebuilds_the_index_and_manifest_from_every_marker(corpus, tmp_path):
    out = tmp_path / "out"
    first = compress(corpus, out)
    output_dir = Path(first["output"])
    manifest_before = (output_dir / "manifest.parquet").read_bytes()
    (output_dir / "_committed_index.parquet").write_bytes(b"not parquet")  # a damaged cache
    (output_dir / COMMITTED_DIR / "stray.0000000000.json").write_bytes(b"{")

    summary = run_gc(GcConfig(path=str(out), grace_hours=24, repair=True))

    assert summary["repaired"] == [{"output": str(output_dir), "markers": 2, "corrupt": 1, "shards": 2}]
    assert (output_dir / "manifest.parquet").read_bytes() == manifest_before
    assert [p.name.split(".json")[0] for p in (output_dir / COMMITTED_DIR / CORRUPT_DIR).iterdir()] == \
        ["stray.0000000000"]
    rerun = compress(corpus, out)  # reads the rebuilt index: nothing to do, the manifest unchanged
    assert rerun["shards_processed"] == 0 and (output_dir / "manifest.parquet").read_bytes() == manifest_before


@pytest.fixture(params=["local", "s3"])
def output_url(request, tmp_path) -> tuple[str, dict]:
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, options = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_options")
    return f"s3://{bucket}/out", options


def _staged_shard(fs, root: str, attempt: str) -> CommittedShard:
    files = []
    for folder in ("data", "quarantine"):
        relative = f"{STAGING_DIR}/{folder}/s.{attempt}-ab.parquet"
        fs.makedirs(f"{root}/{STAGING_DIR}/{folder}", exist_ok=True)
        fs.pipe_file(f"{root}/{relative}", f"{attempt} {folder}".encode())
        files.append(WrittenFile(path=relative, rows=1, bytes=len(f"{attempt} {folder}"), sha256="-"))
    return CommittedShard(shard_id="s", source_url="u", source_fingerprint="f", attempt=attempt, files=files[:1],
                          quarantine_files=files[1:])


def test_a_commit_moves_staged_files_into_data_before_its_marker_names_them(output_url, monkeypatch):
    out, options = output_url
    fs, root = filesystem_for(out, options)
    real_create, seen = commit.create_exclusive, []

    def create_checking_files(url, data, storage_options=None):
        named = json.loads(data)
        fs.invalidate_cache()
        seen.append([fs.exists(f"{root}/{f['path']}") for f in named["files"] + named["quarantine_files"]])
        return real_create(url, data, storage_options)

    monkeypatch.setattr(commit, "create_exclusive", create_checking_files)
    assert commit_shard(out, _staged_shard(fs, root, "run1"), options) is True
    assert seen == [[True, True]]  # the marker is created only once the files it names exist
    [marker] = list_committed(out, options).values()
    assert [f.path for f in marker.files + marker.quarantine_files] == [
        "data/s.run1-ab.parquet", "quarantine/s.run1-ab.parquet"]
    fs.invalidate_cache()
    assert fs.cat_file(f"{root}/data/s.run1-ab.parquet") == b"run1 data"
    assert not fs.exists(f"{root}/{STAGING_DIR}/data/s.run1-ab.parquet")

    # The loser of a race sees the winner's marker before moving anything: data/ never holds its files.
    assert commit_shard(out, _staged_shard(fs, root, "run2"), options) is False
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{root}/data") + fs.find(f"{root}/quarantine")) == [
        "s.run1-ab.parquet", "s.run1-ab.parquet"]
    assert not fs.find(f"{root}/{STAGING_DIR}")
    # Two attempts that both pass that check: the create-if-absent marker decides, the loser removes its moved files.
    monkeypatch.setattr(commit, "_won_by_another", lambda *args: False)
    assert commit_shard(out, _staged_shard(fs, root, "run3"), options) is False
    fs.invalidate_cache()
    assert not [p for p in fs.find(root) if "run3" in p]


def test_gc_collects_a_crashed_commit_s_moved_files_and_stale_staged_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fs, root = filesystem_for(str(out), {})
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/_config.json", b"{}")
    crashed = _staged_shard(fs, root, "run1")

    def crash(*args, **kwargs):
        raise OSError("the driver died between the move and the marker")

    monkeypatch.setattr(commit, "create_exclusive", crash)
    with pytest.raises(OSError, match="between the move"):
        commit_shard(str(out), crashed, {})
    monkeypatch.undo()
    never_committed = _staged_shard(fs, root, "run2")  # written, then the run died before its commit
    assert not list_committed(str(out), {})
    assert find_orphans(GcConfig(path=str(out), grace_hours=24)) == []  # young files are left alone
    orphans = {Path(o.url).relative_to(out).as_posix() for o in find_orphans(GcConfig(path=str(out), grace_hours=0))}
    assert orphans == {"data/s.run1-ab.parquet", "quarantine/s.run1-ab.parquet",
                       *(f.path for f in never_committed.files + never_committed.quarantine_files)}
