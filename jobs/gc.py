"""List (and with apply=true remove) attempt files that no commit marker references.

    python -m jobs.gc path=OUTPUT [grace_hours=24] [apply=true]
"""

from pipeline.cli import run_job
from pipeline.output.gc import run_gc

if __name__ == "__main__":
    run_job(run_gc, prog="gc")
