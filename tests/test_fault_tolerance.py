"""Faults injected into real compress runs (separate processes): every sample ends up stored exactly once.

Failpoints (pipeline/failpoints.py) kill the encode actor's process after k samples, or the driver after k
commits. Whatever the crash leaves behind, the manifest and the loader show only committed shards, a rerun
finishes the rest, and ``jobs.gc`` finds the crashed attempt's files without touching committed ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from job_runs import (
    FAST_COMPRESS,
    attempt_files,
    duplicates,
    input_keys,
    job_env,
    loader_keys,
    manifest_keys,
    output_dir_under,
    referenced_files,
    run_job,
    summary_of,
)

from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus
from pipeline.output.commit import list_committed, sha256_hex
from pipeline.output.manifest import IncompleteOutputError, read_manifest
from pipeline.storage import read_bytes

pytestmark = pytest.mark.slow


def make_corpus(root: Path, n_train: int) -> str:
    write_corpus(CorpusConfig(output=str(root), n=n_train, shard_size=4, heldout_fraction=0.0, seed=5))
    return str(root / "train")


def compress(corpus: str, output: str, *overrides: str, env: dict[str, str]):
    return run_job("compress", f"input.path={corpus}", f"output.path={output}", *FAST_COMPRESS, *overrides, env=env)


def assert_exactly_once(output_dir: str, expected: list[str]) -> None:
    stored = manifest_keys(output_dir)
    assert duplicates(stored) == {}
    assert sorted(stored) == expected
    assert sorted(loader_keys(output_dir)) == expected
    assert {e["path"] for e in read_manifest(output_dir)} <= referenced_files(output_dir)


def test_encode_actor_killed_mid_run_loses_and_duplicates_nothing(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train=8)
    expected = input_keys(corpus)
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    # The actor process exits once it has encoded 5 of the 8 samples, before it returns that batch.
    env = job_env(ATR_FAIL_ENCODE_AFTER="5", ATR_FAILPOINT_DIR=str(failpoints))
    output = str(tmp_path / "out")

    run = compress(corpus, output, "executor=ray", env=env)
    assert (failpoints / "ATR_FAIL_ENCODE_AFTER").exists(), "the failpoint never fired"
    if run.returncode != 0:  # the actor was not restarted: a rerun must finish the job
        run = compress(corpus, output, "executor=ray", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary_of(run)["shards_total"] == 2

    output_dir = output_dir_under(output)
    assert_exactly_once(output_dir, expected)
    assert sum(shard.rows for shard in list_committed(output_dir, {}).values()) == len(expected) == 8


def test_driver_killed_after_a_commit_then_rerun_and_gc(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_train=12)
    expected = input_keys(corpus)
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    env = job_env(ATR_FAIL_DRIVER_AFTER_COMMITS="1", ATR_FAILPOINT_DIR=str(failpoints))
    output = str(tmp_path / "out")

    crashed = compress(corpus, output, "executor=local", env=env)
    assert crashed.returncode == 17, crashed.stderr[-3000:]  # the failpoint's exit status: no summary, no cleanup
    output_dir = output_dir_under(output)
    committed = list_committed(output_dir, {})
    assert len(committed) == 1
    with pytest.raises(IncompleteOutputError):  # no manifest yet: a reader sees nothing, not a partial output
        loader_keys(output_dir)
    # The batch that carried shard 0's end also wrote shard 1's rows: written, never committed.
    left_by_crash = attempt_files(output_dir) - referenced_files(output_dir)
    assert left_by_crash
    crashed_attempt = next(iter(committed.values())).attempt
    assert all(crashed_attempt in path for path in left_by_crash)

    rerun = compress(corpus, output, "executor=local", env=env)  # same environment: the failpoint fired already
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = summary_of(rerun)
    assert (summary["shards_skipped"], summary["shards_processed"], summary["images"]) == (1, 2, 8)
    assert_exactly_once(output_dir, expected)
    manifest_paths = {e["path"] for e in read_manifest(output_dir)}
    assert not manifest_paths & left_by_crash

    dry = run_job("gc", f"path={output}", "grace_hours=0")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert {Path(url).relative_to(output_dir).as_posix() for url in summary_of(dry)["files"]} == left_by_crash
    assert attempt_files(output_dir) >= left_by_crash  # a dry run deletes nothing

    applied = run_job("gc", f"path={output}", "grace_hours=0", "apply=true")
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert summary_of(applied)["orphans"] == len(left_by_crash)
    assert attempt_files(output_dir) == referenced_files(output_dir)
    for entry in read_manifest(output_dir):
        assert sha256_hex(read_bytes(f"{output_dir}/{entry['path']}")) == entry["sha256"]
    assert_exactly_once(output_dir, expected)
