"""The Ray cluster a job runs on: the one it names, the one it was submitted to, or a private one."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None) -> None:
    """Connect to ``address``, else ``RAY_ADDRESS``; without either start a private in-process cluster."""
    if ray.is_initialized():
        return
    # "local" never joins whatever cluster happens to run on this host.
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
