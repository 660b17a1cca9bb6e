"""The `make demo` sequence on the embedded default encoder, offline: corpus -> selector -> compress -> evaluate.

    python -m jobs.demo [output=demo_output] [n=256] [executor=ray|local] [train_steps=...]

Each step runs as its own job (``python -m jobs.NAME``), exactly as a user would run it; the demo prints each
step's summary and ends with one JSON line pointing at every output.
"""

from pipeline.cli import run_job
from pipeline.demo import run_demo

if __name__ == "__main__":
    run_job(run_demo, prog="demo")
