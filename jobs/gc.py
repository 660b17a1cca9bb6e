"""List (and with apply=true remove) attempt files that no commit marker references.

    python -m jobs.gc path=OUTPUT [grace_hours=24] [apply=true]
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.output.gc:run_gc", "pipeline.output.gc:GcConfig", prog="gc", description=__doc__)
