"""The Ray executor: the only module of the compress path that imports Ray.

One row per input shard -> ``flat_map`` decode (CPU tasks) -> ``map_batches`` encode+select on an actor pool
(``ActorPoolStrategy``, ``num_gpus`` per actor) -> ``map_batches`` write (CPU tasks) -> records streamed back to
the driver, which commits. Retries are finite and explicit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from typing import Any, Iterator

import pyarrow as pa
import ray
import torch

from pipeline.compress.plan import RunPlan
from pipeline.compress.progress import LiveProgress
from pipeline.config import CompressConfig
from pipeline.output.format import STORAGE_NUMPY
from pipeline.ray_train.cluster import init_ray, require_actor_resources
from pipeline.sources import ShardRef
from pipeline.stages.decode import decode_shard
from pipeline.stages.encode_select import EncodeSelectStage
from pipeline.stages.records import EncodedCounts
from pipeline.stages.write import WriteStage

log = logging.getLogger(__name__)

# Batches of the write stage: bigger batches mean fewer, larger part files, up to a bound on the bytes a write
# task holds (reckoned as if every token were kept).
WRITE_BATCH_ROWS = 512
WRITE_BATCH_BYTES = 256 * 2**20
# How often the driver reads the encode actors' counts (at most; more often when progress_interval_s is shorter).
PROGRESS_POLL_S = 2.0


def encoder_threads(cfg: CompressConfig, node_cpus: int) -> int | None:
    """Torch threads for an encode actor: on CPU the node's cores shared among the actors; on GPU Ray's default.

    Ray caps a worker's OpenMP threads at its ``num_cpus`` (1 here), which suits many small tasks but leaves a
    CPU encoder, the pipeline's heaviest stage, on one core while the others only decode now and then.
    """
    if cfg.ray.num_gpus_per_actor > 0:
        return None
    return max(1, node_cpus // cfg.ray.num_actors_max)


def encoder_runtime_env(cfg: CompressConfig) -> dict[str, Any] | None:
    """CPU actors share cores with decode tasks: OpenMP threads that sleep at a barrier instead of spinning
    leave those cycles to decoding (read when the worker starts, so it has to come with the actor's env)."""
    return None if cfg.ray.num_gpus_per_actor > 0 else {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


class EncodeActor(EncodeSelectStage):
    """:class:`EncodeSelectStage` with its torch threads set for the actor before the encoder loads."""

    def __init__(self, cfg: CompressConfig, counter: ray.actor.ActorHandle) -> None:
        threads = encoder_threads(cfg, len(os.sched_getaffinity(0)))
        if threads is not None:
            torch.set_num_threads(threads)
        super().__init__(cfg)
        self.on_encoded = lambda counts: counter.add.remote(counts)


@ray.remote(num_cpus=0)
class ProgressCounter:
    """The encode actors' counts, gathered for the driver's progress lines."""

    def __init__(self) -> None:
        self.counts = EncodedCounts()

    def add(self, counts: EncodedCounts) -> None:
        self.counts.add(counts)

    def snapshot(self) -> EncodedCounts:
        return self.counts


@contextlib.contextmanager
def polled_into(live: LiveProgress, interval_s: float) -> Iterator[ray.actor.ActorHandle]:
    """A :class:`ProgressCounter` whose counts a driver thread copies into ``live`` every ``interval_s``."""
    counter = ProgressCounter.remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval_s):
            live.replace(ray.get(counter.snapshot.remote()))

    thread = threading.Thread(target=poll, name="progress-poll", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        ray.kill(counter)


def actor_batch_rows(cfg: CompressConfig) -> int:
    """Samples per actor call: ``ray.batches_per_call`` encoder batches, which the actor overlaps."""
    per_call = cfg.ray.batches_per_call or (4 if cfg.ray.num_gpus_per_actor > 0 else 1)
    return per_call * cfg.encoder.batch_size


def write_batch_rows(cfg: CompressConfig, dim: int) -> int:
    """Rows per write task: ``WRITE_BATCH_ROWS``, or fewer where a row can be large (a 1024-wide anyres encoder
    stores up to 5.9 MB of float16 tokens per image, so 512 such rows would be 3 GB in one task)."""
    row_bytes = cfg.encoder.max_tiles * cfg.encoder.tokens_per_tile * dim * STORAGE_NUMPY[cfg.output.dtype].itemsize
    return max(1, min(WRITE_BATCH_ROWS, WRITE_BATCH_BYTES // row_bytes))


def warn_if_actors_starve_decoding(cfg: CompressConfig, cluster_cpus: float) -> None:
    """Actors hold their CPUs for the whole run; if nothing is left for a decode task, the run waits for the
    cluster to grow (forever on a fixed one)."""
    reserved = cfg.ray.num_actors_max * cfg.ray.num_cpus_per_actor
    if reserved + cfg.ray.decode_num_cpus > cluster_cpus:
        log.info(f"[compress] warning: {cfg.ray.num_actors_max} actors x ray.num_cpus_per_actor="
            f"{cfg.ray.num_cpus_per_actor} leave no room for a decode task (ray.decode_num_cpus="
            f"{cfg.ray.decode_num_cpus}) on this cluster's {cluster_cpus:g} CPUs; the run waits until it grows. "
            "Lower ray.num_cpus_per_actor or ray.num_actors_max.")


def _decode(row: dict[str, Any], cfg: CompressConfig) -> Iterator[dict[str, Any]]:
    shard = ShardRef(**row["shard"]) if isinstance(row["shard"], dict) else row["shard"]
    yield from decode_shard(shard, cfg)


def _write(batch: pa.Table, cfg: CompressConfig, output_dir: str, run_id: str,
           metadata: dict[str, Any]) -> pa.Table:
    return WriteStage(cfg, output_dir, run_id, metadata)(batch)


def run_ray(plan: RunPlan, metadata: dict[str, Any], live: LiveProgress) -> Iterator[dict[str, Any]]:
    cfg = plan.config
    init_ray(cfg.ray.address)
    require_actor_resources(cfg.ray)  # before any work: an unsatisfiable request ends here, naming the setting
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.verbose_stats_logs = False
    context.max_errored_blocks = 0
    # ray.max_retries covers a task's own errors too (an object store failing past its client's retries), not
    # only a lost worker: Ray Data retries those in the task, and only when told to.
    context.max_map_retries = cfg.ray.max_retries
    context.retried_map_errors = True
    warn_if_actors_starve_decoding(cfg, ray.cluster_resources().get("CPU", 0.0))
    shards = ray.data.from_items([{"shard": dataclasses.asdict(s)} for s in plan.todo],
                                 override_num_blocks=max(1, len(plan.todo)))
    decoded = shards.flat_map(_decode, fn_kwargs={"cfg": cfg}, num_cpus=cfg.ray.decode_num_cpus,
                              max_retries=cfg.ray.max_retries)
    with polled_into(live, min(cfg.progress_interval_s, PROGRESS_POLL_S)) as counter:
        yield from _run_dataset(plan, metadata, decoded, counter)


def _run_dataset(plan: RunPlan, metadata: dict[str, Any], decoded: ray.data.Dataset,
                 counter: ray.actor.ActorHandle) -> Iterator[dict[str, Any]]:
    cfg = plan.config
    encoded = decoded.map_batches(
        EncodeActor,
        fn_constructor_args=(cfg, counter),
        batch_size=actor_batch_rows(cfg),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=cfg.ray.num_actors_min, max_size=cfg.ray.num_actors_max),
        num_gpus=cfg.ray.num_gpus_per_actor,
        num_cpus=cfg.ray.num_cpus_per_actor,
        runtime_env=encoder_runtime_env(cfg),
        max_restarts=cfg.ray.max_restarts,
        max_task_retries=cfg.ray.max_task_retries,
    )
    written = encoded.map_batches(
        _write,
        fn_kwargs={"cfg": cfg, "output_dir": plan.output_dir, "run_id": plan.run_id, "metadata": metadata},
        batch_size=write_batch_rows(cfg, metadata["dim"]),
        batch_format="pyarrow",
        num_cpus=0.5,
        max_retries=cfg.ray.max_retries,
    )
    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
