"""Train the adaptive token selector: ``python -m jobs.train_selector [--config train_selector.yaml] key=value ...``

A Ray Train ``TorchTrainer`` (DDP); a rerun resumes from the latest checkpoint under ``{output}/checkpoints/``.
The summary names the final checkpoint as ``checkpoint``: pass it as ``selector.checkpoint=PATH``.
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.ray_train.selector:train_selector", "pipeline.config:TrainSelectorConfig", prog="jobs.train_selector", description=__doc__)
