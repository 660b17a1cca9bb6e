"""The selector's training streams: epochs split over workers without overlap, a corpus-wide max_images sample,
full-token features equal to on-the-fly tokens, and a run killed at a random step resuming bit-identically."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.config import CompressConfig, ConfigError, CorpusConfig, TrainSelectorConfig, load_config
from pipeline.corpus import write_corpus
from pipeline.encoders import VisionEncoder
from pipeline.ray_train.selector import checkpoint_root, run_training
from pipeline.ray_train.selector_data import FeatureTokenStream, ImageTokenStream, open_stream
from pipeline.selector.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.sources import list_shards
from tests.test_encoders import photo_like

SMALL = ["model.width=32", "model.dropout=0.1", "encoder.batch_size=8", "train.batch_size=4",
         "train.warmup_steps=2", "train.selector_warmup_steps=4", "train.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=20, shard_size=2, heldout_fraction=0.2, seed=5))
    return root / "train"  # 16 images in 8 shards


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder.from_config(config("unused").encoder)


def config(input_path, *overrides: str) -> TrainSelectorConfig:
    return load_config(TrainSelectorConfig, None, [f"input.path={input_path}", *SMALL, *overrides])


def full_tokens(corpus: Path, output: Path, *overrides: str) -> Path:
    from pipeline.compress.run import run_compress  # the compress run imports more than these tests need

    summary = run_compress(load_config(CompressConfig, None, [
        f"input.path={corpus}", f"output.path={output}", "executor=local", "selector.method=none",
        "encoder.batch_size=8", *overrides]))
    return Path(summary["output"])


@pytest.fixture(scope="module")
def features(corpus, tmp_path_factory) -> Path:
    return full_tokens(corpus, tmp_path_factory.mktemp("features") / "out", "output.dtype=float32")


def image_stream(corpus, encoder, rank: int, world: int, *overrides: str) -> ImageTokenStream:
    cfg = config(corpus, *overrides)
    return ImageTokenStream(list_shards(cfg.input, {}), cfg, encoder, rank=rank, world_size=world)


def test_each_epoch_gives_every_image_to_exactly_one_worker_in_a_new_order(corpus, encoder):
    everything = {s.key for s in image_stream(corpus, encoder, 0, 1).emission_order(0)}
    assert len(everything) == 16
    for world in (1, 2, 3):
        orders = {}
        for epoch in (0, 1):
            seen = Counter(s.key for rank in range(world)
                           for s in image_stream(corpus, encoder, rank, world).emission_order(epoch))
            assert set(seen) == everything and set(seen.values()) == {1}, (world, epoch)
            orders[epoch] = [s.key for s in image_stream(corpus, encoder, 0, world).emission_order(epoch)]
        assert orders[0] != orders[1]
    # The batches are that order, encoded: rank 1 of 2 gets its 8 images (4 shards) in batches of 4.
    stream = image_stream(corpus, encoder, 1, 2)
    batches = list(stream.iter_epoch())
    assert [key for batch in batches for key in batch.keys] == [s.key for s in stream.emission_order(0)]
    assert [tuple(b.tokens.shape) for b in batches] == [(4, 196, encoder.hidden_size)] * 2
    assert stream.state_dict()["epoch"] == 1


def test_decoding_threads_and_a_resumed_stream_give_the_same_batches(corpus, encoder):
    def keys(stream, batches=None):
        return [batch.keys for batch in itertools.islice(iter(stream), batches)]

    inline = image_stream(corpus, encoder, 0, 4)  # 2 shards, 4 images: one batch an epoch
    expected = keys(inline, 2)
    assert keys(image_stream(corpus, encoder, 0, 4, "train.loader_workers=2"), 2) == expected
    resumed = image_stream(corpus, encoder, 0, 4)
    resumed.load_state_dict({**inline.state_dict(), "epoch": 1, "emitted": 0})
    assert keys(resumed, 1) == expected[1:]


def test_feature_stream_resumes_mid_epoch_with_loader_processes(features):
    cfg = config(features, "train.source=features", "train.loader_workers=2", "train.batch_size=3")
    whole = [batch.keys for batch in itertools.islice(iter(FeatureTokenStream(cfg, rank=0, world_size=1)), 8)]
    epoch = [key for batch in whole[:6] for key in batch]  # 16 rows: five batches of 3 and one of 1
    assert len(epoch) == len(set(epoch)) == 16 and len(whole[5]) == 1
    first = FeatureTokenStream(cfg, rank=0, world_size=1)
    head = [batch.keys for batch in itertools.islice(iter(first), 3)]
    resumed = FeatureTokenStream(cfg, rank=0, world_size=1)
    resumed.load_state_dict(first.state_dict())
    assert head + [batch.keys for batch in itertools.islice(iter(resumed), 5)] == whole


def test_max_images_is_a_sample_from_every_shard_and_the_same_each_epoch(corpus, encoder):
    stream = image_stream(corpus, encoder, 0, 1, "train.max_images=8")
    sample = [s for s in stream.emission_order(0)]
    assert len(sample) == 8 and len({s.shard_id for s in sample}) == 8
    assert {s.key for s in stream.emission_order(3)} == {s.key for s in sample}


def test_features_are_the_on_the_fly_token_sets_split_over_workers(corpus, encoder, features):
    on_the_fly = {key: tokens for batch in image_stream(corpus, encoder, 0, 1).iter_epoch()
                  for key, tokens in zip(batch.keys, batch.tokens)}
    seen = Counter()
    for rank in range(2):
        stream = FeatureTokenStream(config(features, "train.source=features"), rank=rank, world_size=2)
        assert stream.hidden_size == encoder.hidden_size and stream.encoder_fingerprint == encoder.fingerprint()
        for batch in stream.iter_epoch():
            for key, tokens, mask in zip(batch.keys, batch.tokens, batch.mask):
                seen[key] += 1
                torch.testing.assert_close(tokens[mask], on_the_fly[key], rtol=1e-4, atol=1e-4)
    assert set(seen) == set(on_the_fly) and set(seen.values()) == {1}

    with pytest.raises(ConfigError, match="layer"):
        FeatureTokenStream(config(features, "train.source=features", "encoder.select_layer=-1"), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="compress output"):
        FeatureTokenStream(config(corpus, "train.source=features"), rank=0, world_size=1)


def test_anyres_features_of_different_lengths_are_padded_into_batches(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (width, height) in enumerate([(448, 224), (224, 448), (672, 224), (224, 224), (448, 448), (300, 200)]):
        photo_like(width, height, seed=i).save(folder / f"img{i}.jpg")
    output = full_tokens(folder, tmp_path / "anyres", "encoder.anyres=true")
    stream = FeatureTokenStream(config(output, "train.source=features", "encoder.anyres=true"), rank=0, world_size=1)
    batches = list(stream.iter_epoch())
    lengths = [int(n) for batch in batches for n in batch.mask.sum(1)]
    assert len(lengths) == 6 and len(set(lengths)) > 1 and all(n % 196 == 0 for n in lengths)
    assert all(batch.tokens.shape[1] == batch.mask.sum(1).max() for batch in batches)


def test_max_images_of_features_keeps_the_same_rows_every_epoch(features):
    stream = FeatureTokenStream(config(features, "train.source=features", "train.max_images=8"), rank=0, world_size=1)
    epochs = [sorted(key for batch in stream.iter_epoch() for key in batch.keys) for _ in range(2)]
    assert epochs[0] == epochs[1] and 3 <= len(epochs[0]) <= 13


class Killed(Exception):
    pass


class KilledAfter:
    """A stream that dies after ``batches`` batches, as a preempted worker does."""

    def __init__(self, stream, batches: int) -> None:
        self.stream, self.batches = stream, batches

    def __iter__(self):
        for count, batch in enumerate(self.stream):
            if count == self.batches:
                raise Killed
            yield batch

    def __getattr__(self, name):
        return getattr(self.stream, name)


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(checkpoint_root(str(output)))).model.state_dict()


@pytest.mark.parametrize("source", ["images", "features"])
def test_a_run_killed_at_a_random_step_resumes_to_bit_identical_weights(corpus, tmp_path, source, one_thread,
                                                                        request):
    data = corpus if source == "images" else request.getfixturevalue("features")
    steps = 12  # 16 images, batches of 4: three epochs
    kill_at = random.randint(5, steps - 1)

    def cfg(output: Path):
        return config(data, f"output={output}", f"train.source={source}", f"train.steps={steps}",
                      "train.checkpoint_every=4", "train.log_every=4")

    shards = list_shards(cfg(data).input, {}) if source == "images" else None
    whole = cfg(tmp_path / "whole")
    run_training(whole, open_stream(whole, rank=0, world_size=1, shards=shards))
    killed = cfg(tmp_path / "killed")
    with pytest.raises(Killed):
        run_training(killed, KilledAfter(open_stream(killed, rank=0, world_size=1, shards=shards), kill_at))
    resume_from = latest_checkpoint(checkpoint_root(killed.output))
    assert resume_from.endswith(f"step-{kill_at // 4 * 4:08d}")
    run_training(killed, open_stream(killed, rank=0, world_size=1, shards=shards), resume_from=resume_from)

    uninterrupted, resumed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted), f"killed at step {kill_at}"


def test_resuming_with_another_worker_count_is_refused(corpus, encoder):
    state = image_stream(corpus, encoder, 0, 2).state_dict()
    with pytest.raises(ConfigError, match="world_size"):
        image_stream(corpus, encoder, 0, 1).load_state_dict(state)
