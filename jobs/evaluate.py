"""Evaluate token selection on held-out images: ``python -m jobs.evaluate [--config evaluate.yaml] key=value ...``

Runs the trained selector (ratio and threshold modes), the baselines and the text oracle at each keep ratio,
and writes ``report.json``, ``report.csv``, ``report.md`` and ``plots/`` under ``output``. The summary's
headline numbers are the last stdout line.
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.evaluation.runner:evaluate", "pipeline.evaluation.config:EvaluateConfig", prog="evaluate", description=__doc__)
