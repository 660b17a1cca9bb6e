"""Encode an image corpus, keep the informative tokens, write pruned shards exactly once.

    python -m jobs.compress [--config conf/compress.yaml] [--dry-run] key=value ...
"""

from pipeline.cli import run_job
from pipeline.compress.run import run_compress

if __name__ == "__main__":
    run_job(run_compress, prog="compress", flags={"--dry-run": "dry_run"})
