"""The selector's training data as endless, resumable streams of :class:`TokenBatch`, in memory flat in the corpus.

Two sources (``train.source``), one contract: ``iter(stream)`` yields batches forever, epoch after epoch;
``iter_epoch()`` yields what is left of the current one; ``state_dict()`` after any yielded batch is the position
just after it, and ``load_state_dict()`` on a fresh stream continues with the same next batch.

* :class:`ImageTokenStream` (``images``): each epoch permutes all input shards with ``(seed, epoch)`` and gives
  rank ``r`` of ``W`` every ``W``-th of them, so each image is seen by exactly one worker per epoch. The shards'
  samples pass through a bounded shuffle window of *undecoded* bytes (a JPEG is about 1% of its float32 token
  set); only what leaves the window is decoded (in ``loader_workers`` threads) and encoded, in encoder-sized
  groups. The window's draws depend on counts alone, so the order is a function of ``(seed, epoch, rank,
  world)`` and the data; a resumed stream re-reads the epoch's bytes up to its position without decoding them.
* :class:`FeatureTokenStream` (``features``): a :class:`PrunedTokenDataset` over a full-token compress output
  (its own rank / world split and shuffle buffer, resumable by its counts), read one sample at a time through a
  :class:`PrunedTokenLoader` (``loader_workers`` processes), so batches are exactly ``batch_size`` token sets of
  any lengths (anyres), padded by :func:`pad_token_sets`.

``train.max_images`` draws the same sample every epoch from the whole corpus: a quota per input shard (its
share of ``max_images`` by the shard's place in the listing) or, for features, a seeded keep decision per row.
The last batch of an epoch may be short. No Ray here: the training run composes these with Ray Train.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, TrainSelectorConfig, stable_hash
from pipeline.encoders import PreparedImage, VisionEncoder
from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader
from pipeline.loader.order import split_range
from pipeline.selector.checkpoint import encoder_identity
from pipeline.selector.training import TokenBatch, pad_token_sets
from pipeline.sources import Quarantined, RawSample, ShardRef, iter_shard
from pipeline.sources.decode import DecodeError, decode_image

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _check_state(state: Mapping[str, Any], current: Mapping[str, Any], names: Sequence[str]) -> None:
    if state.get("version") != STATE_VERSION or state.get("kind") != current["kind"]:
        raise ConfigError(
            f"resume: the checkpoint's data state is {state.get('kind')!r} version {state.get('version')!r}, this "
            f"run streams {current['kind']!r} version {STATE_VERSION}; resume with the same train.source or use a "
            "new output directory"
        )
    for name in names:
        if state.get(name) != current[name]:
            raise ConfigError(
                f"resume: the checkpoint's data stream had {name}={state.get(name)!r}, this run has "
                f"{current[name]!r}; resume with the same input, train.seed, train.max_images, "
                "train.shuffle_buffer and train.num_workers, or use a new output directory"
            )


class ImageTokenStream:
    """Token sets encoded on the fly from image shards (see the module docstring)."""

    kind = "images"

    def __init__(self, shards: Sequence[ShardRef], cfg: TrainSelectorConfig, encoder: VisionEncoder, *,
                 rank: int, world_size: int) -> None:
        if len(shards) < world_size:
            raise ConfigError(f"input.path: {len(shards)} shards for {world_size} workers; each worker reads whole shards")
        self.shards, self.cfg, self.encoder = list(shards), cfg, encoder
        self.rank, self.world_size = rank, world_size
        self.seed, self.batch_size, self.window = cfg.train.seed, cfg.train.batch_size, cfg.train.shuffle_buffer
        self.storage_options = cfg.storage.storage_options()
        max_images = cfg.train.max_images
        self.quotas = ([hi - lo for lo, hi in (split_range(max_images, len(shards), i) for i in range(len(shards)))]
                       if max_images else None)
        self.fingerprint = stable_hash([[s.shard_id, s.fingerprint] for s in self.shards])
        # Whole training batches are encoded together, enough of them to fill one encoder batch.
        self.batches_per_encode = max(1, encoder.cfg.batch_size // self.batch_size)
        self.threads = ThreadPoolExecutor(cfg.train.loader_workers) if cfg.train.loader_workers else None
        self.epoch, self.emitted = 0, 0  # emitted: samples of this epoch's order consumed by yielded batches
        self.skipped = 0

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def encoder_fingerprint(self) -> str:
        return self.encoder.fingerprint()

    def encoder_identity(self) -> dict[str, Any]:
        return encoder_identity(self.cfg.encoder, self.encoder.fingerprint(), self.encoder.hidden_size)

    # ----------------------------------------------------------------------------------------- order

    def epoch_shards(self, epoch: int) -> list[int]:
        """Indices (into the sorted listing) of the shards this worker reads in ``epoch``, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return order[self.rank :: self.world_size].tolist()

    def _samples(self, epoch: int) -> Iterator[RawSample]:
        for index in self.epoch_shards(epoch):
            quota = self.quotas[index] if self.quotas else None
            if quota == 0:
                continue
            taken = 0
            with contextlib.closing(iter_shard(self.shards[index], self.cfg.input, self.storage_options)) as samples:
                for sample in samples:
                    if isinstance(sample, Quarantined) or sample.image is None:
                        self.skipped += 1
                        continue
                    yield sample
                    taken += 1
                    if quota is not None and taken >= quota:
                        break

    def emission_order(self, epoch: int) -> Iterator[RawSample]:
        """The epoch's samples as they leave the shuffle window (fill it; then each arrival replaces a uniformly
        drawn sample, which leaves; at the end the rest leave in random order)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size])
        window: list[RawSample] = []
        for sample in self._samples(epoch):
            if len(window) < self.window:
                window.append(sample)
                continue
            slot = int(rng.integers(len(window)))
            yield window[slot]
            window[slot] = sample
        for slot in rng.permutation(len(window)).tolist():
            yield window[slot]

    # ----------------------------------------------------------------------------------------- batches

    def _prepare(self, sample: RawSample) -> PreparedImage | None:
        try:
            return self.encoder.prepare(decode_image(sample.image, self.cfg.decode))
        except DecodeError:
            return None

    def _prepared(self, pending: list[tuple[int, RawSample]]) -> Iterator[tuple[int, str, PreparedImage]]:
        mapped = self.threads.map(self._prepare, [s for _, s in pending]) if self.threads else map(
            self._prepare, [s for _, s in pending])
        for (position, sample), prepared in zip(pending, mapped):
            if prepared is None:
                self.skipped += 1
                continue
            yield position, sample.key, prepared

    def _encoded(self, batches: list[tuple[list[str], list[PreparedImage], tuple[int, int]]]) -> Iterator[TokenBatch]:
        encoded = iter(self.encoder.encode_prepared([image for _, images, _ in batches for image in images]))
        for keys, images, state in batches:
            batch = pad_token_sets([next(encoded).tokens for _ in images])
            batch.keys = keys
            self.epoch, self.emitted = state
            yield batch

    def iter_epoch(self) -> Iterator[TokenBatch]:
        epoch, skip = self.epoch, self.emitted
        pending: list[tuple[int, RawSample]] = []
        keys: list[str] = []
        images: list[PreparedImage] = []
        ready: list[tuple[list[str], list[PreparedImage], tuple[int, int]]] = []
        yielded = False
        chunk = self.batch_size * self.batches_per_encode

        def take(prepared: Iterator[tuple[int, str, PreparedImage]]) -> None:
            nonlocal keys, images
            for position, key, image in prepared:
                keys.append(key)
                images.append(image)
                if len(images) == self.batch_size:
                    ready.append((keys, images, (epoch, position)))
                    keys, images = [], []

        position = 0
        for position, sample in enumerate(self.emission_order(epoch), 1):
            if position <= skip:
                continue
            pending.append((position, sample))
            if len(pending) == chunk:
                take(self._prepared(pending))
                pending = []
                if len(ready) >= self.batches_per_encode:
                    yielded = True
                    yield from self._encoded(ready)
                    ready = []
        take(self._prepared(pending))
        if images:
            ready.append((keys, images, (epoch + 1, 0)))
        if ready:
            yielded = True
            yield from self._encoded(ready)
        self.epoch, self.emitted = epoch + 1, 0
        if not yielded and skip == 0:
            raise ConfigError(f"input.path: worker {self.rank} of {self.world_size} found no readable images in its "
                              f"shards of {self.cfg.input.path} (epoch {epoch}, {self.skipped} unreadable)")
        if self.skipped:
            log.info("worker %d: epoch %d skipped %d samples that could not be read or decoded so far", self.rank,
                     epoch, self.skipped)

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            yield from self.iter_epoch()

    # ----------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": self.kind, "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "shards": self.fingerprint, "max_images": self.cfg.train.max_images,
            "shuffle_buffer": self.window, "epoch": self.epoch, "emitted": self.emitted,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.state_dict(), ("seed", "rank", "world_size", "shards", "max_images", "shuffle_buffer"))
        self.epoch, self.emitted = int(state["epoch"]), int(state["emitted"])


def keep_sample(key: str, seed: int, fraction: float) -> bool:
    """A seeded, stateless coin for ``key``: the same answer in every process, epoch and run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


class FeatureTokenStream:
    """Token sets read from a full-token compress output (see the module docstring)."""

    kind = "features"

    def __init__(self, cfg: TrainSelectorConfig, *, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.batch_size = cfg.train.batch_size
        self.dataset = open_feature_store(cfg, rank=rank, world_size=world_size)
        meta = self.dataset.meta
        self.meta = meta
        # A generator of its own: otherwise each new DataLoader iterator draws its seed from the global RNG,
        # which also drives the Gumbel noise, and a resumed run would diverge.
        self.loader = PrunedTokenLoader(self.dataset, batch_size=None, num_workers=cfg.train.loader_workers,
                                        generator=torch.Generator().manual_seed(cfg.train.seed))
        total, max_images = self.dataset.total_rows, cfg.train.max_images
        self.keep_fraction = max_images / total if max_images and max_images < total else None

    @property
    def hidden_size(self) -> int:
        return int(self.meta["dim"])

    @property
    def encoder_fingerprint(self) -> str:
        return str(self.meta["encoder_fingerprint"])

    def encoder_identity(self) -> dict[str, Any]:
        return encoder_identity(self.cfg.encoder, self.encoder_fingerprint, self.hidden_size)

    def iter_epoch(self) -> Iterator[TokenBatch]:
        fresh = not any(self.dataset.state_dict()["consumed"]) or self.dataset.progress.complete
        tokens: list[torch.Tensor] = []
        keys: list[str] = []
        yielded = False
        for sample in self.loader:
            if self.keep_fraction is not None and not keep_sample(sample["key"], self.cfg.train.seed, self.keep_fraction):
                continue
            assert sample["tokens"].shape[0] == sample["n_tokens"], "a full-token output keeps every token"
            tokens.append(sample["tokens"])
            keys.append(sample["key"])
            if len(tokens) == self.batch_size:
                yielded = True
                yield self._batch(tokens, keys)
                tokens, keys = [], []
        if tokens:
            yielded = True
            yield self._batch(tokens, keys)
        if not yielded and fresh:
            raise ConfigError(f"input.path: worker {self.rank} of {self.world_size} got no rows of "
                              f"{self.cfg.input.path} (too few rows for train.num_workers, or train.max_images too small)")

    @staticmethod
    def _batch(tokens: list[torch.Tensor], keys: list[str]) -> TokenBatch:
        batch = pad_token_sets(tokens)
        batch.keys = keys
        return batch

    def __iter__(self) -> Iterator[TokenBatch]:
        while True:
            yield from self.iter_epoch()

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": self.kind, "max_images": self.cfg.train.max_images,
                "loader": self.loader.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_state(state, self.state_dict(), ("max_images",))
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as exc:
            raise ConfigError(f"resume: {exc}") from None


def open_feature_store(cfg: TrainSelectorConfig, *, rank: int = 0, world_size: int = 1) -> PrunedTokenDataset:
    """The full-token compress output at ``input.path``, checked to hold every token of ``encoder``'s features."""
    try:
        dataset = PrunedTokenDataset(cfg.input.path, storage_options=cfg.storage.storage_options(),
                                     seed=cfg.train.seed, shuffle_buffer=cfg.train.shuffle_buffer, columns=[],
                                     rank=rank, world_size=world_size)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"input.path: with train.source=features it must be a compress output ({exc})") from None
    meta = dataset.meta
    if meta["selector"] != "none":
        raise ConfigError(
            f"input.path: {cfg.input.path} holds tokens kept by selector {meta['selector']!r}; the selector learns "
            "from every token: write a full-token output with python -m jobs.compress selector.method=none"
        )
    if (meta["encoder"], meta["select_layer"]) != (cfg.encoder.name, cfg.encoder.select_layer):
        raise ConfigError(
            f"encoder: {cfg.input.path} holds features of encoder {meta['encoder']!r} layer {meta['select_layer']}, "
            f"this run names {cfg.encoder.name!r} layer {cfg.encoder.select_layer}; pass the encoder the output was "
            "compressed with (encoder=PRESET)"
        )
    return dataset


TokenStream = ImageTokenStream | FeatureTokenStream


def open_stream(cfg: TrainSelectorConfig, *, rank: int, world_size: int,
                shards: Sequence[ShardRef] | None = None) -> TokenStream:
    """The stream ``train.source`` names, for worker ``rank`` of ``world_size``; images need the listed ``shards``."""
    if cfg.train.source == "features":
        return FeatureTokenStream(cfg, rank=rank, world_size=world_size)
    assert shards is not None, "train.source=images streams the listed input shards"
    return ImageTokenStream(shards, cfg, VisionEncoder.from_config(cfg.encoder), rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------- worker state


def worker_state(stream: TokenStream) -> dict[str, Any]:
    """What a worker needs to continue exactly: its RNG states (Gumbel noise, dropout) and its stream position."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda, "stream": stream.state_dict()}


def restore_worker_state(state: Mapping[str, Any], stream: TokenStream) -> None:
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


__all__ = ["FeatureTokenStream", "ImageTokenStream", "TokenStream", "keep_sample", "open_feature_store",
           "open_stream", "restore_worker_state", "worker_state"]
