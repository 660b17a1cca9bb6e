"""The selector training job: real corpus shards, the frozen tiny encoder, and Ray Train with two CPU workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import (
    CONF_DIR,
    ConfigError,
    CorpusConfig,
    SelectorConfig,
    TrainSelectorConfig,
    load_config,
)
from pipeline.corpus import write_corpus
from pipeline.ray_train.selector import run_training
from pipeline.ray_train.selector import train_selector as main
from pipeline.ray_train.selector_data import open_stream
from pipeline.selector import build_selector
from pipeline.sources import list_shards

SMALL = ["model.width=32", "encoder.batch_size=8", "train.batch_size=4", "train.warmup_steps=2",
         "train.selector_warmup_steps=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=16, shard_size=4, heldout_fraction=0.25, seed=5))
    return root / "train"


def job_config(corpus: Path, output: Path, *overrides: str) -> TrainSelectorConfig:
    return load_config(TrainSelectorConfig, str(CONF_DIR / "train_selector.yaml"),
                       [f"input.path={corpus}", f"output={output}", *SMALL, *overrides])



def test_training_on_the_corpus_lowers_the_loss_and_the_reconstruction_error(corpus, tmp_path, one_thread):
    cfg = job_config(corpus, tmp_path, "train.steps=40", "train.log_every=10", "train.checkpoint_every=40")
    run_training(cfg, open_stream(cfg, rank=0, world_size=1, shards=list_shards(cfg.input, {})))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"]
    assert logged[-1]["recon_error"] < 0.7 * logged[0]["recon_error"]


def metric_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_worker_ray_train_run_checkpoints_and_resumes(corpus, tmp_path, ray_cluster):
    output = tmp_path / "selector"
    settings = ["train.num_workers=2", "train.cpus_per_worker=1", "train.log_every=4", "train.checkpoint_every=8"]
    summary = main(job_config(corpus, output, "train.steps=16", *settings))
    assert summary["steps"] == 16 and summary["checkpoint"].endswith("checkpoints/step-00000016")
    assert {"loss", "recon_error", "keep_rate", "wall_s"} <= set(summary)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000008", "step-00000016"]
    assert metric_steps(output) == [4, 8, 12, 16]

    # The pipeline loads it with the encoder it was trained on, and refuses any other encoder.
    encoder_fingerprint = summary["encoder_fingerprint"]
    selector = build_selector(SelectorConfig(method="learned", checkpoint=summary["checkpoint"]), encoder_fingerprint)
    assert selector.fingerprint() == summary["selector_fingerprint"]
    with pytest.raises(ConfigError, match="trained on encoder"):
        build_selector(SelectorConfig(method="learned", checkpoint=summary["checkpoint"]), "0" * 64)

    # Killed after step 8's checkpoint: the rerun resumes there, each worker with its RNG states and its stream's
    # position, and ends with the uninterrupted run's weights, bit for bit. Asking again trains nothing.
    shutil.rmtree(output / "checkpoints" / "step-00000016")
    resumed = main(job_config(corpus, output, "train.steps=16", *settings))
    assert resumed["selector_fingerprint"] == summary["selector_fingerprint"]
    assert metric_steps(output) == [4, 8, 12, 16]
    again = main(job_config(corpus, output, "train.steps=16", *settings))
    assert again["checkpoint"] == resumed["checkpoint"]

    with pytest.raises(ConfigError, match="resume"):
        main(job_config(corpus, output, "train.steps=20", "model.width=64", *settings))
    # Resuming with another encoder fails in the workers, and still reaches the user as a config error.
    with pytest.raises(ConfigError, match="trained on encoder"):
        main(job_config(corpus, output, "train.steps=20", "encoder.seed=1", *settings))


def test_more_workers_than_shards_is_a_config_error(corpus, tmp_path):
    with pytest.raises(ConfigError, match="num_workers"):
        main(job_config(corpus, tmp_path, "train.num_workers=5"))
