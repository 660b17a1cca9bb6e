"""Encode an image corpus, keep the informative tokens, write pruned shards exactly once.

    python -m jobs.compress [--config compress.yaml] [--dry-run] key=value ...
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.compress.run:run_compress", "pipeline.config:CompressConfig", prog="compress", flags={"--dry-run": "dry_run"},
            description=__doc__)
