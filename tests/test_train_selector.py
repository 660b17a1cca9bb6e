"""The selector training job: real corpus shards, the frozen tiny encoder, and Ray Train with two CPU workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from pipeline.config import (
    ConfigError,
    CorpusConfig,
    SelectorConfig,
    TrainSelectorConfig,
    load_config,
)
from pipeline.corpus import write_corpus
from pipeline.encoders import VisionEncoder
from pipeline.ray_train.selector import encode_token_sets
from pipeline.ray_train.selector import train_selector as main
from pipeline.selector import build_selector
from pipeline.selector.model import SelectorAutoencoder
from pipeline.selector.training import sample_batches, train_loop
from pipeline.sources import list_shards

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.width=32", "encoder.batch_size=8", "train.batch_size=4", "train.warmup_steps=2",
         "train.selector_warmup_steps=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=16, shard_size=4, heldout_fraction=0.25, seed=5))
    return root / "train"


def job_config(corpus: Path, output: Path, *overrides: str) -> TrainSelectorConfig:
    return load_config(TrainSelectorConfig, str(REPO / "conf" / "train_selector.yaml"),
                       [f"input.path={corpus}", f"output={output}", *SMALL, *overrides])



def test_training_on_the_corpus_lowers_the_loss_and_the_reconstruction_error(corpus, one_thread):
    cfg = job_config(corpus, Path("unused"), "train.steps=40", "train.log_every=10")
    encoder = VisionEncoder.from_config(cfg.encoder)
    token_sets = encode_token_sets(list_shards(cfg.input, {}), cfg, encoder, limit=None)
    assert len(token_sets) == 12 and token_sets[0].shape == (encoder.tokens_per_tile, encoder.hidden_size)
    model = SelectorAutoencoder(encoder.hidden_size, cfg.model)
    logged: list[dict[str, float]] = []
    train_loop(model, sample_batches(token_sets, cfg.train.batch_size, seed=0), cfg.train, on_log=logged.append)
    assert logged[-1]["loss"] < 0.7 * logged[0]["loss"]
    assert logged[-1]["recon_error"] < 0.7 * logged[0]["recon_error"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def metric_steps(output: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_worker_ray_train_run_checkpoints_and_resumes(corpus, tmp_path, ray_cluster):
    output = tmp_path / "selector"
    settings = ["train.num_workers=2", "train.cpus_per_worker=1", "train.log_every=4", "train.checkpoint_every=8"]
    summary = main(job_config(corpus, output, "train.steps=12", *settings))
    assert summary["steps"] == 12 and summary["checkpoint"].endswith("checkpoints/step-00000012")
    assert {"loss", "recon_error", "keep_rate", "wall_s"} <= set(summary)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    assert metric_steps(output) == [4, 8, 12]

    # The pipeline loads it with the encoder it was trained on, and refuses any other encoder.
    encoder_fingerprint = summary["encoder_fingerprint"]
    selector = build_selector(SelectorConfig(method="learned", checkpoint=summary["checkpoint"]), encoder_fingerprint)
    assert selector.fingerprint() == summary["selector_fingerprint"]
    with pytest.raises(ConfigError, match="trained on encoder"):
        build_selector(SelectorConfig(method="learned", checkpoint=summary["checkpoint"]), "0" * 64)

    # A longer run resumes from step 12; asking again for what is done trains nothing.
    resumed = main(job_config(corpus, output, "train.steps=16", *settings))
    assert resumed["steps"] == 16 and metric_steps(output) == [4, 8, 12, 16]
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
