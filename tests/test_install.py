"""A non-editable install works from any directory: presets and job configs are package data, `atr` is a
console script, benchmarks are not installed.

The fresh venv reuses this interpreter's installed dependencies (a ``.pth`` line; ``--no-deps``), so the test
installs only the project itself: seconds, no network, and never a torch resolved from an index.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from job_runs import REPO, job_env

from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` (not editable) of a copy of the project into a new venv; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"  # a copy, so the build writes nothing into the shared checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "jobs", "bench"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies from this environment, after the venv's own site-packages (a plain path: its .pth files,
    # the checkout's editable install among them, are not run).
    (Path(purelib) / "_atr_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-build-isolation", str(source)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing of the checkout left to fall back on
    return venv / "bin"


def run_atr(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**job_env(), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(bin_dir / "atr"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_wheel_carries_presets_and_configs_and_not_bench(installed, tmp_path):
    probe = ("import importlib.util, pipeline, pipeline.config as c; "
             "print(pipeline.__file__); print(c.preset_names('encoder')); print(c.config_names()); "
             "print(importlib.util.find_spec('bench'))")
    proc = subprocess.run([str(installed / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          check=True)
    where, presets, configs, bench = proc.stdout.strip().splitlines()
    assert not where.startswith(str(REPO)), where
    assert presets == str(["clip-vit-l-336", "siglip-so400m", "tiny", "vit-b-16"])
    assert configs == str(["compress.yaml", "evaluate.yaml", "train_selector.yaml", "train_vlm.yaml"])
    assert bench == "None"


def test_atr_compress_runs_from_an_empty_directory(installed, tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=4, shard_size=4, heldout_fraction=0.0, seed=3, image_size=128))
    empty = tmp_path / "empty"
    empty.mkdir()

    proc = run_atr(installed, empty, "compress", f"input={corpus / 'train'}", f"output={tmp_path / 'out'}",
                   "encoder=tiny", "selector.method=random", "executor=local", "--config", "conf/compress.yaml")

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["status"], summary["images"], summary["shards_processed"]) == ("ok", 4, 1)
    assert summary["output"].startswith(str(tmp_path / "out" / "tiny"))
    assert list(empty.iterdir()) == []


def test_atr_compress_dry_run_with_a_hub_preset_from_an_empty_directory(installed, tmp_path):
    # The preset comes from the wheel. Its weights would come from the hub, which this offline test cannot
    # reach: the weights' hash is part of cfg_hash, so a dry run needs them; pretrained=null initialises the same
    # ViT-L/14-336 at random instead (the hub case itself is test_cli.py's one-line failure).
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=4, shard_size=2, heldout_fraction=0.0, seed=3, image_size=128))
    empty = tmp_path / "empty"
    empty.mkdir()

    proc = run_atr(installed, empty, "compress", "encoder=clip-vit-l-336", "--dry-run", "encoder.pretrained=null",
                   "selector.method=random", f"input={corpus / 'train'}", f"output={tmp_path / 'out'}")

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dry_run"] is True and summary["todo"] == ["shard-00000", "shard-00001"]
    assert "/clip-vit-l-336/" in summary["output"]
    assert '"image_size": 336' in proc.stderr and '"anyres": true' in proc.stderr  # the preset's fields
