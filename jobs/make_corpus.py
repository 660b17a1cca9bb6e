"""Write the synthetic demo corpus: ``python -m jobs.make_corpus output=DIR n=256 [seed=0] ...``."""

from pipeline.cli import run_job
from pipeline.corpus import make_corpus

if __name__ == "__main__":
    run_job(make_corpus, prog="make_corpus")
