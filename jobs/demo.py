"""The `make demo` sequence on the embedded default encoder, offline: corpus -> selector -> compress -> evaluate.

    python -m jobs.demo [output=demo_output] [n=256] [executor=ray|local] [train_steps=...]

Each step runs as its own job (``python -m jobs.NAME``), exactly as a user would run it; the demo prints each
step's summary and ends with one JSON line pointing at every output.
"""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.demo:run_demo", "pipeline.demo:DemoConfig", prog="demo", description=__doc__)
