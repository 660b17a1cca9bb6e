"""Evaluate token selection on held-out images: ``python -m jobs.evaluate [--config conf/evaluate.yaml] key=value ...``

Runs the trained selector (ratio and threshold modes), the baselines and the text oracle at each keep ratio,
and writes ``report.json``, ``report.csv``, ``report.md`` and ``plots/`` under ``output``. The summary's
headline numbers are the last stdout line.
"""

from pipeline.cli import run_job
from pipeline.evaluation.runner import evaluate

if __name__ == "__main__":
    run_job(evaluate, prog="evaluate")
