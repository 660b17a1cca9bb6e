"""Executors run the same stages: Ray Data on a cluster (default) or one local process."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.run_plan import RunPlan


def run_stages(plan: RunPlan, metadata: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield the write stage's records for every to-do shard of ``plan``."""
    if plan.config.executor == "local":
        from pipeline.executors.local import run_local

        return run_local(plan, metadata)
    from pipeline.executors.ray_data import run_ray

    return run_ray(plan, metadata)
