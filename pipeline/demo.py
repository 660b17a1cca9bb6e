"""The `make demo` sequence on the embedded default encoder, offline: corpus -> selector -> compress -> evaluate.

Each step runs as its own job (``python -m jobs.NAME``), exactly as a user would run it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import CONF_DIR, Config, JobError, require

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DemoConfig(Config):
    """Run the whole pipeline on a generated corpus with the tiny random-init encoder."""

    output: str = "demo_output"
    n: int = 256
    train_steps: int | None = None
    executor: Literal["ray", "local"] = "ray"

    def check(self) -> None:
        require(self.n >= 16, "n", "must be at least 16 images")


def run_step(module: str, *overrides: str) -> dict[str, Any]:
    """Run ``python -m jobs.MODULE``; its stderr streams through, its last stdout line is its summary."""
    log.info(f"[demo] python -m jobs.{module} {' '.join(overrides)}")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", f"jobs.{module}", *overrides], stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise JobError(f"step jobs.{module} failed with exit code {result.returncode}")
    summary = json.loads(lines[-1])
    log.info(f"[demo] jobs.{module} done in {time.monotonic() - started:.0f}s")
    return summary


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Every step in turn; the summary points at every output."""
    started = time.monotonic()
    out = cfg.output.rstrip("/")
    corpus = run_step("make_corpus", f"output={out}/corpus", f"n={cfg.n}")
    steps = [f"train.steps={cfg.train_steps}"] if cfg.train_steps else []
    trained = run_step("train_selector", "--config", str(CONF_DIR / "train_selector.yaml"),
                       f"input.path={out}/corpus/train", f"output={out}/selector", *steps)
    compressed = run_step("compress", "--config", str(CONF_DIR / "compress.yaml"), f"input.path={out}/corpus/train",
                          f"output.path={out}/compressed", f"selector.checkpoint={trained['checkpoint']}",
                          f"executor={cfg.executor}")
    evaluated = run_step("evaluate", "--config", str(CONF_DIR / "evaluate.yaml"),
                         f"input.path={out}/corpus/heldout", f"probe.train_input.path={out}/corpus/train", f"selector.checkpoint={trained['checkpoint']}",
                         f"output={out}/evaluation")
    log.info(f"[demo] corpus:     {out}/corpus")
    log.info(f"[demo] selector:   {trained['checkpoint']}")
    log.info(f"[demo] compressed: {compressed['output']}")
    log.info(f"[demo] report:     {evaluated.get('report_md', out + '/evaluation/report.md')}")
    return {
        "corpus": f"{out}/corpus", "images": corpus.get("samples"),
        "selector_checkpoint": trained["checkpoint"],
        "selector": {k: trained.get(k) for k in ("loss", "recon_error", "keep_rate", "steps")},
        "compressed": compressed["output"],
        "compress": {k: compressed.get(k) for k in ("images", "quarantined", "tokens_full", "tokens_kept",
                                                     "kept_fraction", "bytes_written", "images_per_s")},
        "evaluation": f"{out}/evaluation",
        "evaluation_headline": {k: v for k, v in evaluated.items() if k not in ("status",)},
        "wall_s": round(time.monotonic() - started, 1),
    }
