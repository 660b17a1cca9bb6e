"""Answer a VQA benchmark from pruned image tokens:
``python -m jobs.evaluate_vlm benchmark=PATH model=NAME_OR_PATH selector.checkpoint=PATH key=value ...``

A LLaVA-NeXT model (``from_pretrained``) answers every question from the full token set and from the tokens the
selector (and the random baseline) keep at each keep ratio, scored with the benchmark's metric. Answers are
appended to ``{output}/results-*.jsonl`` as they come, so a rerun resumes; ``report.*`` and ``plots/`` follow.
"""

from __future__ import annotations

from typing import Any

from pipeline.cli import run_job
from pipeline.evaluation.config import EvaluateVLMConfig
from pipeline.evaluation.vlm_runner import evaluate_vlm


def main(cfg: EvaluateVLMConfig) -> dict[str, Any]:
    return evaluate_vlm(cfg)


if __name__ == "__main__":
    run_job(EvaluateVLMConfig, main, prog="evaluate_vlm")
