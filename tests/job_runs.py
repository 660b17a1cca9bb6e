"""Helpers for tests that run jobs as separate processes and then audit what they left in storage.

An audit reads storage the way a user would: the manifest and the commit markers say what counts; a plain
listing of ``data/`` and ``quarantine/`` shows everything that was written, committed or not.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.config import CorpusConfig, InputConfig
from pipeline.corpus import write_corpus
from pipeline.loader import PrunedTokenDataset
from pipeline.output.commit import list_committed
from pipeline.output.manifest import read_manifest
from pipeline.sources import RawSample, iter_shard, list_shards
from pipeline.storage import filesystem_for, url_for

REPO = Path(__file__).resolve().parent.parent
# Small and fast: the tiny random encoder, a selector that needs no checkpoint, one shard per batch.
FAST_COMPRESS = ["selector.method=norm", "selector.mode=ratio", "selector.ratio=0.5", "encoder.batch_size=4",
                 "progress_interval_s=1"]


def small_corpus(root: Path, n: int, seed: int, shard_size: int = 3) -> Path:
    """A train split of ``n`` 64-pixel images in shards of ``shard_size``: the folder of its tars."""
    write_corpus(CorpusConfig(output=str(root), n=n, shard_size=shard_size, heldout_fraction=0.0, seed=seed,
                              image_size=64))
    return root / "train"


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of all files under ``url`` (recursive), sorted; empty when ``url`` does not exist."""
    fs, path = filesystem_for(url, storage_options)
    fs.invalidate_cache(path)
    return sorted(url_for(fs, p) for p in fs.find(path))


def job_env(**extra: str) -> dict[str, str]:
    """This process's environment without a Ray address (a job must not join someone else's cluster)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("ATR_FAIL")}
    return {**env, **extra}


def run_job(name: str, *overrides: str, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jobs.{name}", *overrides], cwd=cwd, env=env or job_env(),
                          capture_output=True, text=True, timeout=timeout)


def summary_of(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The job's summary: its last stdout line."""
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])


def input_keys(path: str, storage_options: dict | None = None) -> list[str]:
    """Every sample key of the input, read with the pipeline's own readers."""
    cfg = InputConfig(path=path)
    options = storage_options or {}
    return sorted(item.key for shard in list_shards(cfg, options) for item in iter_shard(shard, cfg, options)
                  if isinstance(item, RawSample))


def output_dir_under(output_root: str, storage_options: dict | None = None) -> str:
    """The single ``{encoder}/{cfg_hash}`` folder a compress run wrote under ``output_root``."""
    fs, root = filesystem_for(output_root, storage_options)
    fs.invalidate_cache()
    configs = fs.glob(f"{root}/*/*/_config.json")
    assert len(configs) == 1, f"expected one output under {output_root}, found {configs}"
    folder = configs[0].rsplit("/", 1)[0]
    return folder if "://" not in output_root else f"{output_root.split('://')[0]}://{folder}"


def manifest_keys(output_dir: str, storage_options: dict | None = None) -> list[str]:
    """Keys of every row of every file the manifest lists (duplicates kept, so a test can count them)."""
    fs, root = filesystem_for(output_dir, storage_options)
    keys = []
    for entry in read_manifest(output_dir, storage_options):
        with fs.open(f"{root}/{entry['path']}", "rb") as handle:
            keys.extend(pq.read_table(handle, columns=["key"]).column("key").to_pylist())
    return keys


def loader_keys(output_dir: str, storage_options: dict | None = None) -> list[str]:
    """Keys as a training job sees them through the loader."""
    dataset = PrunedTokenDataset(output_dir, storage_options=storage_options, shuffle=False, rank=0, world_size=1)
    return [sample["key"] for sample in dataset]


def stored_text(fs, path: str) -> str:
    """An object's bytes, plus its decoded rows and schema metadata when it is Parquet (compressed pages hide text)."""
    data = fs.cat_file(path)
    if not path.endswith(".parquet"):
        return data.decode("utf-8", "replace")
    table = pq.read_table(io.BytesIO(data))
    return f"{data!r}{table.schema.metadata}{table.to_pylist()}"


def duplicates(keys: list[str]) -> dict[str, int]:
    return {key: n for key, n in Counter(keys).items() if n > 1}


def attempt_files(output_dir: str, storage_options: dict | None = None) -> set[str]:
    """Every data and quarantine file written, relative to the output dir, committed (moved out of ``_staging/``)
    or not."""
    fs, root = filesystem_for(output_dir, storage_options)
    fs.invalidate_cache()
    found = set()
    for folder in ("data", "quarantine", "_staging"):
        if fs.exists(f"{root}/{folder}"):
            found.update(path[len(root) + 1:] for path in fs.find(f"{root}/{folder}"))
    return found


def referenced_files(output_dir: str, storage_options: dict | None = None) -> set[str]:
    """Files some commit marker names."""
    return {f.path for shard in list_committed(output_dir, storage_options or {}).values()
            for f in shard.files + shard.quarantine_files}
