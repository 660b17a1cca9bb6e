"""Training the adaptive token selector with Ray Train: a ``TorchTrainer`` (DDP) over a stream of token sets.

Each worker streams its share of the training data (:mod:`pipeline.ray_train.selector_data`: images encoded on
the fly, or a full-token compress output) and trains the selector and reconstructor on it; memory does not grow
with the corpus. Rank 0 writes ``{output}/checkpoints/step-*/`` (with every worker's RNG states and stream
position) and ``{output}/metrics.jsonl``; a rerun resumes from the latest checkpoint with the same next batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import ConfigError, JobError, TrainSelectorConfig
from pipeline.ray_train.cluster import init_ray
from pipeline.ray_train.selector_data import (
    TokenStream,
    open_feature_store,
    open_stream,
    restore_worker_state,
    worker_state,
)
from pipeline.ray_train.trainer import fit, mean_over_workers, threads_per_worker, worker_log
from pipeline.selector.checkpoint import (
    SelectorCheckpoint,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    load_train_state,
    read_sidecar,
    save_checkpoint,
)
from pipeline.selector.model import SelectorAutoencoder
from pipeline.selector.training import make_optimizer, train_loop
from pipeline.sources import list_shards
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


def gather_from_workers(value: Any) -> list[Any]:
    """Every worker's ``value``, in rank order (just ``[value]`` outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def resume_state(resumed: SelectorCheckpoint, rank: int, world_size: int,
                 storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """This worker's saved RNG states and stream position; None for a checkpoint that predates them."""
    state = load_train_state(resumed, storage_options)
    if state is None:
        log.warning("%s holds no RNG or data-stream state: training continues from a fresh stream, not exactly",
                    resumed.path)
        return None
    if state["world_size"] != world_size:
        raise ConfigError(
            f"resume: {resumed.path} was trained with train.num_workers={state['world_size']}; an exact resume "
            f"needs the same number of workers, not {world_size} (or use a new output directory)"
        )
    return state["workers"][rank]


def run_training(
    cfg: TrainSelectorConfig,
    stream: TokenStream,
    *,
    rank: int = 0,
    world_size: int = 1,
    resume_from: str | None = None,
    device: torch.device | str = "cpu",
    wrap_model: Callable[[nn.Module], nn.Module] = lambda model: model,
    gather: Callable[[Any], list[Any]] = gather_from_workers,
) -> dict[str, float]:
    """One worker's training from ``stream`` (Ray-free: ``wrap_model`` makes it DDP, ``gather`` collects the
    workers' states for rank 0's checkpoint). Resumes model, optimiser, RNG states and stream from
    ``resume_from``; learning rate and temperature follow from the step."""
    storage_options = cfg.storage.storage_options()
    resumed = load_checkpoint(resume_from, storage_options) if resume_from else None
    torch.manual_seed(cfg.train.seed)
    if resumed:
        resumed.check_encoder(stream.encoder_fingerprint)
        model = resumed.model
    else:
        model = SelectorAutoencoder(stream.hidden_size, cfg.model)
    start_step = resumed.step if resumed else 0
    # The Gumbel noise differs per worker; the model weights are rank 0's (DDP broadcasts them).
    torch.manual_seed(cfg.train.seed + 1 + rank + 1000 * start_step)
    if resumed and (state := resume_state(resumed, rank, world_size, storage_options)):
        restore_worker_state(state, stream)
    bare_model = model
    model = wrap_model(model)
    optimizer = make_optimizer(model, cfg.train)
    if resumed and (optimizer_state := load_optimizer_state(resumed, storage_options)):
        optimizer.load_state_dict(optimizer_state)

    identity = stream.encoder_identity()
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
            f"tau {metrics['temperature']:.3f} lr {metrics['lr']:.2e} epoch {stream.epoch} "
            f"{time.monotonic() - train_started:.0f}s"
        )

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        states = gather(worker_state(stream))  # every worker takes part, rank 0 writes
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
            train_state={"world_size": world_size, "workers": states},
            storage_options=storage_options,
        )
        worker_log(f"[{PROG}] checkpoint {directory}")

    return train_loop(
        model, iter(stream), cfg.train, optimizer=optimizer, start_step=start_step, device=device,
        on_log=on_log, on_checkpoint=on_checkpoint,
    )


def train_worker(config: dict[str, Any]) -> None:
    cfg: TrainSelectorConfig = config["cfg"]
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    stream = open_stream(cfg, rank=rank, world_size=world, shards=config["shards"])
    worker_log(f"[{PROG}] worker {rank}/{world}: streaming {cfg.train.source} from {cfg.input.path}")
    run_training(cfg, stream, rank=rank, world_size=world, resume_from=config["resume_from"],
                 device=ray.train.torch.get_device(), wrap_model=ray.train.torch.prepare_model)


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
    shards = None
    if cfg.train.source == "features":
        rows = open_feature_store(cfg).total_rows  # a wrong output fails here, before any worker starts
        if rows < cfg.train.num_workers:
            raise ConfigError(f"input.path: {cfg.input.path} holds {rows} rows, fewer than train.num_workers="
                              f"{cfg.train.num_workers}")
    else:
        shards = list_shards(cfg.input, cfg.storage.storage_options())
        if len(shards) < cfg.train.num_workers:
            raise ConfigError(
                f"input.path: {cfg.input.path} holds {len(shards)} shards, fewer than train.num_workers="
                f"{cfg.train.num_workers}; each worker reads whole shards"
            )
    init_ray(cfg.ray.address)
    threads = threads_per_worker(cfg.train.cpus_per_worker, cfg.train.num_workers)
    source = f"{len(shards)} shards" if shards is not None else "features"
    log.info(f"[{PROG}] {source} of {cfg.input.path}, {cfg.train.num_workers} workers x {threads} CPUs"
             + (f", resuming from {resume_from}" if resume_from else ""))
    fit(train_worker, {"cfg": cfg, "shards": shards, "threads": threads, "resume_from": resume_from},
        name=PROG, output=cfg.output, num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, threads=threads)
    return summary(cfg, started)
