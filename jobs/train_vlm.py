"""Train a LLaVA-NeXT projector on pruned tokens: ``python -m jobs.train_vlm [--config conf/train_vlm.yaml] key=value``

A Ray Train ``TorchTrainer`` (DDP) over a compress output; no vision tower runs. Rank 0 writes
``{output}/checkpoint/``; the summary names it as ``checkpoint`` and reports first and final loss.
"""

from pipeline.cli import run_job
from pipeline.ray_train.vlm import train_vlm

if __name__ == "__main__":
    run_job(train_vlm, prog="jobs.train_vlm")
