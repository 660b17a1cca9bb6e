"""The preflight (pipeline/ray_train/cluster.py): a request no node can hold ends the job at once, in one line
naming the setting, exit 2; on a cluster the job joined (maybe autoscaling) it waits a bounded time first."""

from __future__ import annotations

import time

import pytest
from job_runs import FAST_COMPRESS, run_job

from pipeline.config import ConfigError, CorpusConfig
from pipeline.corpus import write_corpus
from pipeline.ray_train import cluster

CPU_NODE = {"CPU": 2.0, "memory": 8e9}
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


def test_placeable_counts_units_that_fit_on_one_node_each():
    assert cluster.placeable({"CPU": 1, "GPU": 1}, 1, [CPU_NODE]) == 0
    assert cluster.placeable({"CPU": 1, "GPU": 0}, 2, [CPU_NODE]) == 2
    assert cluster.placeable({"CPU": 1.5}, 2, [CPU_NODE]) == 1  # 1.5 + 1.5 CPUs do not fit on 2
    assert cluster.placeable({"CPU": 4, "GPU": 1}, 2, [GPU_NODE, GPU_NODE, CPU_NODE]) == 2
    assert cluster.placeable({"CPU": 0, "GPU": 0}, 3, []) == 3


@pytest.fixture
def fake_cluster(monkeypatch):
    """Nodes the preflight sees (a list the test may grow) and the autoscaler requests it made."""
    state = {"nodes": [CPU_NODE], "requests": []}
    monkeypatch.setattr(cluster, "alive_node_resources", lambda: list(state["nodes"]))
    monkeypatch.setattr(cluster, "_request", lambda bundles: state["requests"].append(bundles))
    monkeypatch.setattr(cluster, "POLL_S", 0.05)
    return state


def test_a_private_cluster_is_judged_at_once(fake_cluster, monkeypatch):
    monkeypatch.setattr(cluster, "_joined_existing_cluster", False)
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        cluster.require_resources({"CPU": 1, "GPU": 1}, 1, settings={"GPU": "ray.num_gpus_per_actor=1",
                                                                     "CPU": "ray.num_cpus_per_actor=1"},
                                  what="encode actor", wait_s=600)
    assert time.monotonic() - started < 1
    assert str(error.value).startswith("ray.num_gpus_per_actor=1: this Ray cluster cannot hold 1 x encode actor")
    assert "largest node has 2 CPU" in str(error.value)
    assert fake_cluster["requests"] == []


def test_a_joined_cluster_is_asked_and_waited_for_a_bounded_time(fake_cluster, monkeypatch):
    monkeypatch.setattr(cluster, "_joined_existing_cluster", True)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"after waiting 0.3s \(ray.resource_wait_s\)"):
        cluster.require_resources({"CPU": 1, "GPU": 1}, 2, settings={"GPU": "train.use_gpu=true"},
                                  what="training worker", wait_s=0.3)
    assert 0.3 <= time.monotonic() - started < 2
    assert fake_cluster["requests"] == [[{"CPU": 1, "GPU": 1}] * 2, []]  # asked the autoscaler, then withdrew


def test_a_joined_cluster_that_grows_in_time_passes(fake_cluster, monkeypatch):
    monkeypatch.setattr(cluster, "_joined_existing_cluster", True)
    real_sleep = time.sleep

    def node_joins(seconds):
        real_sleep(seconds)
        fake_cluster["nodes"].append(GPU_NODE)  # the autoscaler started a GPU node

    monkeypatch.setattr(cluster.time, "sleep", node_joins)
    cluster.require_resources({"CPU": 1, "GPU": 1}, 1, settings={"GPU": "ray.num_gpus_per_actor=1"},
                              what="encode actor", wait_s=30)
    assert fake_cluster["requests"][-1] == []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(CorpusConfig(output=str(root), n=4, shard_size=4, heldout_fraction=0.0, seed=2, image_size=128))
    return root / "train"


def one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if "resolved config" not in line and line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


def test_compress_with_a_gpu_no_node_has_exits_2_naming_the_setting(corpus, tmp_path):
    proc = run_job("compress", f"input={corpus}", f"output={tmp_path / 'out'}", *FAST_COMPRESS, "executor=ray",
                   "ray.num_gpus_per_actor=1", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_line(proc).startswith("config error: ray.num_gpus_per_actor=1: this Ray cluster cannot hold")


def test_train_selector_with_use_gpu_and_no_gpu_exits_2_naming_the_setting(corpus, tmp_path):
    proc = run_job("train_selector", f"input={corpus}", f"output={tmp_path / 'sel'}", "train.use_gpu=true",
                   "train.steps=2", "train.selector_warmup_steps=1", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_line(proc).startswith("config error: train.use_gpu=true: this Ray cluster cannot hold 1 x training")
