"""Train a LLaVA-NeXT projector on pruned tokens: ``python -m jobs.train_vlm [--config train_vlm.yaml] key=value``

A Ray Train ``TorchTrainer`` (DDP) over a compress output; no vision tower runs. Rank 0 writes
``{output}/checkpoint/``; the summary names it as ``checkpoint`` and reports first and final loss.
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.ray_train.vlm:train_vlm", "pipeline.vlm.config:TrainVLMConfig", prog="jobs.train_vlm", description=__doc__)
