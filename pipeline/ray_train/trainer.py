"""Ray Train plumbing shared by the training runs: run a TorchTrainer, log from its workers, average metrics."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.config import ConfigError, JobError
from pipeline.ray_train.cluster import require_resources
from pipeline.storage import filesystem_for, is_local


def ray_storage_path(output: str) -> str:
    """Ray Train's own run records: next to the output when it is local, in a temp dir otherwise."""
    if not is_local(output):
        return os.path.join(tempfile.gettempdir(), "atr-ray-train")
    return os.path.join(filesystem_for(output)[1], "ray")


def threads_per_worker(cpus_per_worker: int | None, num_workers: int) -> int:
    return cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // num_workers)


def fit(worker: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, name: str, output: str,
        num_workers: int, use_gpu: bool, threads: int, resource_wait_s: float | None = None) -> None:
    """Run ``worker`` on ``num_workers`` DDP workers; a ConfigError raised in a worker stays a ConfigError.

    First the preflight: the workers must fit on the cluster (waiting up to ``resource_wait_s``, by default the
    job config's ``ray.resource_wait_s``, for an autoscaler), or the job ends with one line naming the setting.
    """
    if resource_wait_s is None:
        resource_wait_s = getattr(getattr(loop_config.get("cfg"), "ray", None), "resource_wait_s", None)
    require_resources({"CPU": threads, "GPU": 1.0 if use_gpu else 0.0}, num_workers,
                      settings={"GPU": "train.use_gpu=true", "CPU": f"train.cpus_per_worker={threads}"},
                      what="training worker", wait_s=resource_wait_s)
    trainer = ray.train.torch.TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(name=name, storage_path=ray_storage_path(output)),
    )
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            if isinstance(failure, ConfigError):
                raise ConfigError(str(failure)) from None
        raise JobError(f"{name} failed: {exc}") from None


def worker_log(message: str) -> None:
    """A progress line from inside a Ray Train worker; Ray forwards the worker's stderr to the driver's."""
    # Not print(): Ray Train patches it in its workers to also emit through logging, which shows each line twice.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def mean_over_workers(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the DDP workers (unchanged outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return metrics
    names = sorted(metrics)
    values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64)
    dist.all_reduce(values)
    return {name: float(v) / dist.get_world_size() for name, v in zip(names, values)}
