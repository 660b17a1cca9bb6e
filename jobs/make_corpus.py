"""Write the synthetic demo corpus: ``python -m jobs.make_corpus output=DIR n=256 [seed=0] ...``."""

from pipeline.cli import run_job

if __name__ == "__main__":
    # Named, not imported: --help and config errors are answered before the library (and torch) loads.
    run_job("pipeline.corpus:make_corpus", "pipeline.config:CorpusConfig", prog="make_corpus", description=__doc__)
