"""Executors run the same stages: Ray Data on a cluster (default) or one local process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from pipeline.compress.plan import RunPlan
from pipeline.compress.progress import LiveProgress

if TYPE_CHECKING:
    from pipeline.stages.encode_select import Models


def run_stages(plan: RunPlan, metadata: dict[str, Any], live: LiveProgress,
               models: Models | None = None) -> Iterator[dict[str, Any]]:
    """Yield the write stage's records for every to-do shard of ``plan``, keeping ``live`` up to date with
    what the encode stage has done. ``models``, loaded for ``plan``'s config in this process, serve the local
    executor's stages; the Ray executor's actors load their own."""
    if plan.config.executor == "local":
        from pipeline.compress.executors.local import run_local

        return run_local(plan, metadata, live, models)
    from pipeline.compress.executors.ray_data import run_ray

    return run_ray(plan, metadata, live)
