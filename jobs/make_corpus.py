"""Write the synthetic demo corpus: ``python -m jobs.make_corpus output=DIR n=256 [seed=0] ...``."""

from __future__ import annotations

import time
from typing import Any

from pipeline.cli import log, run_job
from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus


def main(cfg: CorpusConfig) -> dict[str, Any]:
    start = time.perf_counter()
    summary = write_corpus(cfg)
    seconds = time.perf_counter() - start
    log(f"[make_corpus] wrote {cfg.n} samples to {cfg.output} in {seconds:.1f}s")
    return {**summary, "seconds": round(seconds, 2)}


if __name__ == "__main__":
    run_job(CorpusConfig, main, prog="make_corpus")
