"""Answer a VQA benchmark from pruned image tokens:
``python -m jobs.evaluate_vlm benchmark=PATH model=NAME_OR_PATH selector.checkpoint=PATH key=value ...``

A LLaVA-NeXT model (``from_pretrained``) answers every question from the full token set and from the tokens the
selector (and the random baseline) keep at each keep ratio, scored with the benchmark's metric. Answers are
appended to ``{output}/results-*.jsonl`` as they come, so a rerun resumes; ``report.*`` and ``plots/`` follow.
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.evaluation.vlm_runner:evaluate_vlm", "pipeline.evaluation.config:EvaluateVLMConfig", prog="evaluate_vlm", description=__doc__)
