"""Answer a VQA benchmark from pruned image tokens:
``python -m jobs.evaluate_vlm benchmark=PATH model=NAME_OR_PATH selector.checkpoint=PATH key=value ...``

A LLaVA-NeXT model (``from_pretrained``) answers every question from the full token set and from the tokens the
selector (and the random baseline) keep at each keep ratio, scored with the benchmark's metric. Answers are
appended to ``{output}/results-*.jsonl`` as they come, so a rerun resumes; ``report.*`` and ``plots/`` follow.
"""

from pipeline.cli import run_job
from pipeline.evaluation.vlm_runner import evaluate_vlm

if __name__ == "__main__":
    run_job(evaluate_vlm, prog="evaluate_vlm")
