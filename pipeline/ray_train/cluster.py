"""The Ray cluster a job runs on: the one it names, the one it was submitted to, or a private one; and the
preflight that checks the cluster can hold what a job asks for before any work is submitted."""

from __future__ import annotations

import logging
import math
import os
import time

import ray

from pipeline.config import ConfigError, RayConfig

log = logging.getLogger(__name__)
_joined_existing_cluster = False
POLL_S = 5.0


def init_ray(address: str | None) -> None:
    """Connect to ``address``, else ``RAY_ADDRESS``; without either start a private in-process cluster."""
    global _joined_existing_cluster
    if ray.is_initialized():
        return
    # "local" never joins whatever cluster happens to run on this host.
    joined = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=joined or "local", include_dashboard=False)
    _joined_existing_cluster = bool(joined)


def placeable(unit: dict[str, float], count: int, nodes: list[dict[str, float]]) -> int:
    """How many of ``count`` units (each all of ``unit`` on one node) the nodes' total resources hold."""
    need = {name: amount for name, amount in unit.items() if amount > 0}
    if not need:
        return count
    fits = 0
    for node in nodes:
        fits += min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in need.items())
    return min(fits, count)


def alive_node_resources() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _describe(resources: dict[str, float]) -> str:
    return " + ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"


def require_resources(unit: dict[str, float], count: int, *, settings: dict[str, str], what: str,
                      wait_s: float | None = None) -> None:
    """Fail with one line naming the setting of each short resource (``settings``: resource -> ``key=value``)
    unless ``count`` x ``unit`` fit on the cluster's nodes.

    A cluster this job joined may be autoscaling: it is asked for the resources and waited for up to ``wait_s``
    (``ray.resource_wait_s``). A private in-process cluster cannot grow, so it is judged at once.
    """
    wait_s = wait_s if _joined_existing_cluster and wait_s else 0.0
    deadline = time.monotonic() + wait_s
    requested = False
    while True:
        nodes = alive_node_resources()
        if placeable(unit, count, nodes) >= count:
            if requested:
                _request([])
            return
        if time.monotonic() >= deadline:
            break
        if not requested:
            log.info(f"[preflight] waiting up to {wait_s:g}s (ray.resource_wait_s) for nodes that hold {count} x "
                     f"{what} ({_describe(unit)}) to join")
            _request([{k: v for k, v in unit.items() if v > 0}] * count)
            requested = True
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    if requested:
        _request([])
    short = [settings[name] for name in settings if placeable({name: unit.get(name, 0.0)}, count, nodes) < count]
    setting = ", ".join(short or settings.values())
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    waited = f" after waiting {wait_s:g}s (ray.resource_wait_s)" if wait_s else ""
    raise ConfigError(
        f"{setting}: this Ray cluster cannot hold {count} x {what} ({_describe(unit)} each){waited}; "
        f"its largest node has {_describe({k: largest.get(k, 0.0) for k in ('CPU', 'GPU')})}. "
        "Lower the request, or run on a cluster (or autoscaler node type) that has it")


def _request(bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaler (if the cluster has one) to start nodes for ``bundles``; [] withdraws the request."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - no autoscaler to ask is not an error; the wait still bounds it
        log.debug(f"[preflight] request_resources: {exc}")


def require_actor_resources(ray_cfg: RayConfig) -> None:
    """Preflight of the compress executor: ``ray.num_actors_min`` encode actors must fit."""
    require_resources(
        {"CPU": ray_cfg.num_cpus_per_actor, "GPU": ray_cfg.num_gpus_per_actor}, ray_cfg.num_actors_min,
        settings={"GPU": f"ray.num_gpus_per_actor={ray_cfg.num_gpus_per_actor:g}",
                  "CPU": f"ray.num_cpus_per_actor={ray_cfg.num_cpus_per_actor:g}"},
        what="encode actor", wait_s=ray_cfg.resource_wait_s)
