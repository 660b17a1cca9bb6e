"""Train the adaptive token selector: ``python -m jobs.train_selector [--config conf/train_selector.yaml] key=value ...``

A Ray Train ``TorchTrainer`` (DDP); a rerun resumes from the latest checkpoint under ``{output}/checkpoints/``.
The summary names the final checkpoint as ``checkpoint``: pass it as ``selector.checkpoint=PATH``.
"""

from pipeline.cli import run_job
from pipeline.ray_train.selector import train_selector

if __name__ == "__main__":
    run_job(train_selector, prog="jobs.train_selector")
