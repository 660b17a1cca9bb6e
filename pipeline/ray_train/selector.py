"""Training the adaptive token selector with Ray Train: a ``TorchTrainer`` (DDP) over the input's shards.

Each worker reads its share of the shards, encodes the images once with the frozen encoder, keeps the token sets
in memory and trains the selector and reconstructor on them. Rank 0 writes ``{output}/checkpoints/step-*/`` and
``{output}/metrics.jsonl``; a rerun resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, replace
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import Tensor

from pipeline.config import ConfigError, JobError, TrainSelectorConfig
from pipeline.encoders import VisionEncoder
from pipeline.ray_train.cluster import init_ray
from pipeline.ray_train.trainer import fit, mean_over_workers, threads_per_worker, worker_log
from pipeline.selector.checkpoint import (
    checkpoint_dir,
    encoder_identity,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    read_sidecar,
    save_checkpoint,
)
from pipeline.selector.model import SelectorAutoencoder
from pipeline.selector.training import make_optimizer, sample_batches, train_loop
from pipeline.sources import Quarantined, ShardRef, iter_shard, list_shards
from pipeline.sources.decode import DecodeError, decode_image
from pipeline.storage import (
    absolute_url,
    filesystem_for,
    join_url,
    read_bytes,
    write_bytes,
)

log = logging.getLogger(__name__)

PROG = "train_selector"
SUMMARY_METRICS = ("loss", "recon_error", "relative_error", "keep_rate", "keep_probability")


def checkpoint_root(output: str) -> str:
    return join_url(output, "checkpoints")


def metrics_path(output: str) -> str:
    return join_url(output, "metrics.jsonl")


# --------------------------------------------------------------------------------------------- worker side


def encode_token_sets(shards: list[ShardRef], cfg: TrainSelectorConfig, encoder: VisionEncoder, limit: int | None) -> list[Tensor]:
    """Decode and encode up to ``limit`` images of ``shards``; undecodable samples are skipped and counted."""
    storage_options = cfg.storage.storage_options()
    token_sets: list[Tensor] = []
    pending = []
    skipped = 0

    def flush() -> None:
        token_sets.extend(e.tokens.float().cpu() for e in encoder.encode_images(pending))
        pending.clear()

    for shard in shards:
        for sample in iter_shard(shard, cfg.input, storage_options):
            if limit is not None and len(token_sets) + len(pending) >= limit:
                break
            if isinstance(sample, Quarantined) or sample.image is None:
                skipped += 1
                continue
            try:
                pending.append(decode_image(sample.image, cfg.decode))
            except DecodeError:
                skipped += 1
                continue
            if len(pending) == cfg.encoder.batch_size:
                flush()
    if pending:
        flush()
    if skipped:
        worker_log(f"[{PROG}] skipped {skipped} samples that could not be read or decoded")
    return token_sets


class MetricsLog:
    """Rank 0's metrics, one JSON line per log step; rewritten whole, so it works on object stores too."""

    def __init__(self, path: str, storage_options: dict[str, Any], start_step: int) -> None:
        self.path = path
        self.storage_options = storage_options
        self.rows: list[dict[str, float]] = []
        fs, fs_path = filesystem_for(path, storage_options)
        if start_step and fs.exists(fs_path):
            lines = read_bytes(path, storage_options).decode().splitlines()
            self.rows = [row for row in map(json.loads, filter(None, lines)) if row["step"] <= start_step]

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        write_bytes(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows).encode(), self.storage_options)


def train_worker(config: dict[str, Any]) -> None:
    cfg: TrainSelectorConfig = config["cfg"]
    shards: list[ShardRef] = config["shards"]
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    storage_options = cfg.storage.storage_options()

    encoder = VisionEncoder.from_config(cfg.encoder)
    limit = math.ceil(cfg.train.max_images / world) if cfg.train.max_images else None
    started = time.monotonic()
    token_sets = encode_token_sets(shards[rank::world], cfg, encoder, limit)
    if not token_sets:
        raise ValueError(f"worker {rank} found no readable images in its shards of {cfg.input.path}")
    worker_log(f"[{PROG}] worker {rank}/{world}: cached {len(token_sets)} token sets in {time.monotonic() - started:.1f}s")

    resumed = load_checkpoint(config["resume_from"], storage_options) if config["resume_from"] else None
    torch.manual_seed(cfg.train.seed)
    if resumed:
        resumed.check_encoder(encoder.fingerprint())
        model = resumed.model
    else:
        model = SelectorAutoencoder(encoder.hidden_size, cfg.model)
    start_step = resumed.step if resumed else 0
    # The Gumbel noise differs per worker; the model weights are rank 0's (DDP broadcasts them).
    torch.manual_seed(cfg.train.seed + 1 + rank + 1000 * start_step)
    bare_model = model
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg.train)
    if resumed and (state := load_optimizer_state(resumed, storage_options)):
        optimizer.load_state_dict(state)

    identity = encoder_identity(cfg.encoder, encoder.fingerprint(), encoder.hidden_size)
    metrics_log = MetricsLog(metrics_path(cfg.output), storage_options, start_step) if rank == 0 else None
    train_started = time.monotonic()

    def on_log(metrics: dict[str, float]) -> None:
        metrics = mean_over_workers(metrics)
        if metrics_log is None:
            return
        metrics_log.append({**metrics, "step": int(metrics["step"]), "elapsed_s": time.monotonic() - train_started})
        worker_log(
            f"[{PROG}] step {int(metrics['step'])}/{cfg.train.steps} loss {metrics['loss']:.4f} "
            f"recon {metrics['recon_error']:.4f} keep {metrics['keep_rate']:.3f} (p {metrics['keep_probability']:.3f}) "
            f"tau {metrics['temperature']:.3f} lr {metrics['lr']:.2e} "
            f"{time.monotonic() - train_started:.0f}s"
        )

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        if rank != 0:
            return
        directory = save_checkpoint(
            checkpoint_dir(checkpoint_root(cfg.output), step),
            bare_model,
            step=step,
            encoder=identity,
            train=asdict(cfg.train),
            metrics={name: metrics[name] for name in SUMMARY_METRICS if name in metrics},
            optimizer_state=optimizer.state_dict(),
            storage_options=storage_options,
        )
        worker_log(f"[{PROG}] checkpoint {directory}")

    batches = sample_batches(token_sets, cfg.train.batch_size, seed=cfg.train.seed + 1 + rank + 1000 * start_step)
    train_loop(
        model, batches, cfg.train, optimizer=optimizer, start_step=start_step, device=device,
        on_log=on_log, on_checkpoint=on_checkpoint,
    )


# --------------------------------------------------------------------------------------------- driver side


def resume_point(cfg: TrainSelectorConfig) -> tuple[str | None, dict[str, Any] | None]:
    """The latest checkpoint to resume from (and its sidecar), after checking it was trained with this model."""
    if not cfg.resume:
        return None, None
    storage_options = cfg.storage.storage_options()
    latest = latest_checkpoint(checkpoint_root(cfg.output), storage_options)
    if latest is None:
        return None, None
    meta = read_sidecar(latest, storage_options)
    if meta["model"] != asdict(cfg.model):
        raise ConfigError(
            f"resume: {latest} was trained with model={meta['model']}, not {asdict(cfg.model)}; "
            "use a new output directory or resume=false"
        )
    return latest, meta


def summary(cfg: TrainSelectorConfig, started: float) -> dict[str, Any]:
    checkpoint = latest_checkpoint(checkpoint_root(cfg.output), cfg.storage.storage_options())
    if checkpoint is None:
        raise JobError(f"training ended without a checkpoint under {checkpoint_root(cfg.output)}")
    meta = read_sidecar(checkpoint, cfg.storage.storage_options())
    return {
        "checkpoint": checkpoint,
        "steps": meta["step"],
        **meta["metrics"],
        "wall_s": round(time.monotonic() - started, 2),
        "metrics_file": metrics_path(cfg.output),
        "encoder": meta["encoder"]["name"],
        "encoder_fingerprint": meta["encoder"]["fingerprint"],
        "selector_fingerprint": meta["weights_sha256"],
    }


def train_selector(cfg: TrainSelectorConfig) -> dict[str, Any]:
    """Train (or resume) on ``cfg.train.num_workers`` workers; the summary names the final ``checkpoint``."""
    started = time.monotonic()
    cfg = replace(cfg, output=absolute_url(cfg.output), input=replace(cfg.input, path=absolute_url(cfg.input.path)))
    resume_from, meta = resume_point(cfg)
    if meta and meta["step"] >= cfg.train.steps:
        log.info(f"[{PROG}] {resume_from} already reached step {meta['step']} of {cfg.train.steps}; nothing to train")
        return summary(cfg, started)
    shards = list_shards(cfg.input, cfg.storage.storage_options())
    if len(shards) < cfg.train.num_workers:
        raise ConfigError(
            f"input.path: {cfg.input.path} holds {len(shards)} shards, fewer than train.num_workers="
            f"{cfg.train.num_workers}; each worker reads whole shards"
        )
    init_ray(cfg.ray.address)
    threads = threads_per_worker(cfg.train.cpus_per_worker, cfg.train.num_workers)
    log.info(f"[{PROG}] {len(shards)} shards, {cfg.train.num_workers} workers x {threads} CPUs"
             + (f", resuming from {resume_from}" if resume_from else ""))
    fit(train_worker, {"cfg": cfg, "shards": shards, "threads": threads, "resume_from": resume_from},
        name=PROG, output=cfg.output, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, threads=threads)
    return summary(cfg, started)
