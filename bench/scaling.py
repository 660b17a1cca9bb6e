"""Scaling and memory: throughput with 1 vs 2 encode actors, and peak RSS at 1x and 4x the corpus.

``python -m bench.scaling [--images N] [--encoder tiny] [--actors 1,2]``

Each case is a fresh ``python -m jobs.compress executor=ray`` process (its own local Ray cluster), sampled with
psutil as a process tree: the driver (the job process), the Ray workers (decode and write tasks, encode actors)
and Ray's own services. Peak RSS is each process's kernel high-water mark. Memory is flat when the 4x corpus
peaks no higher than the 1x one: shards stream through, nothing holds the whole corpus.

Throughput per actor count is the 4x run's end-to-end rate (start-up included: Ray, each actor loading the
encoder), and beside it the steady rate ``3N / (t_4x - t_1x)``, which cancels the start-up both runs pay but
is noisy when the corpus is small. The runs use ``ray.num_actors_min = ray.num_actors_max = actors`` and
``ray.num_cpus_per_actor=0.5``: on a 2-CPU host two actors holding a whole CPU each would leave none for decoding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    ProcessTreeSampler,
    machine,
    markdown_table,
    report,
    synthetic_corpus,
)

TARGET = 1.2
SHARD_SIZE = 16
MIB = 1024 * 1024


def compress_process(corpus: Path, out: Path, encoder: str, actors: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "jobs.compress", f"input.path={corpus}", f"output.path={out}",
               f"encoder={encoder}", "executor=ray", "selector.method=norm", "selector.mode=ratio",
               "selector.ratio=0.5", f"ray.num_actors_min={actors}", f"ray.num_actors_max={actors}",
               "ray.num_cpus_per_actor=0.5",
               "progress_interval_s=60"]
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        with ProcessTreeSampler(process.pid) as sampler:
            stdout, _ = process.communicate()
        if process.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.read().decode()[-4000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    peaks = sampler.peak_by_role()
    return {"images": summary["images"], "wall_s": summary["wall_s"],
            "driver_peak_rss_mib": round(peaks["driver"] / MIB, 1),
            "worker_peak_rss_mib": round(peaks.get("worker", 0) / MIB, 1),
            "tree_peak_rss_mib": round(sampler.tree_peak / MIB, 1)}


def actors_note(cases: dict[str, Any], cpus: int) -> str:
    if len(cases) < 2:
        return ""
    most = max(cases, key=int)
    return (f"{most} actors run at {cases[most]['vs_1_actor']}x the rate of 1 here. On CPU the actors share this "
            f"host's {cpus} cores (each gets {cpus} // actors torch threads), so a second actor adds no compute, only "
            "its own overhead; on GPU nodes each actor brings its own GPU.")


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for actors, case in result["cases"].items():
        for size in ("1x", "4x"):
            r = case[size]
            rows.append([actors, size, r["images"], r["wall_s"], r["driver_peak_rss_mib"], r["worker_peak_rss_mib"],
                         r["tree_peak_rss_mib"]])
    runs = markdown_table(["actors", "corpus", "images", "wall s", "driver peak RSS MiB",
                           "largest worker peak RSS MiB", "whole tree peak RSS MiB"], rows)
    throughput = markdown_table(["actors", "4x img/s (end to end)", "vs 1 actor", "steady img/s (4x - 1x)"],
                                [[a, c["images_per_s"], c["vs_1_actor"], c["steady_images_per_s"]]
                                 for a, c in result["cases"].items()])
    met = "met" if result["rss_4x_vs_1x"] <= TARGET else "not met"
    return (f"Encoder `{result['encoder']}`, `selector.method=norm` ratio 0.5, 1x = {result['images']} images "
            f"({result['images'] // SHARD_SIZE} shards), 4x = {4 * result['images']} images; one fresh "
            f"`jobs.compress executor=ray` process (own local Ray cluster) per run.\n\n{runs}\n\n{throughput}\n\n"
            f"Target: peak RSS at 4x ≤ {TARGET} × at 1x — **{met}** (`rss_4x_vs_1x` = {result['rss_4x_vs_1x']}, "
            f"the larger of the driver's and the largest worker's ratio, 1 actor). {result['actors_note']}\n")


def run(images: int, encoder: str, actor_counts: list[int]) -> dict[str, Any]:
    info = machine()
    cases: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        root = Path(tmp)
        corpora = {size: synthetic_corpus(root / size, images * factor, SHARD_SIZE)
                   for size, factor in (("1x", 1), ("4x", 4))}
        for actors in actor_counts:
            cases[str(actors)] = {size: compress_process(corpus, root / f"out-{actors}-{size}", encoder, actors)
                                  for size, corpus in corpora.items()}
    for case in cases.values():
        small, large = case["1x"], case["4x"]
        case["images_per_s"] = round(large["images"] / large["wall_s"], 2)
        case["steady_images_per_s"] = round((large["images"] - small["images"]) / (large["wall_s"] - small["wall_s"]), 2)
    base = cases[str(actor_counts[0])]
    for case in cases.values():
        case["vs_1_actor"] = round(case["images_per_s"] / base["images_per_s"], 3)
    ratios = {role: base["4x"][f"{role}_peak_rss_mib"] / base["1x"][f"{role}_peak_rss_mib"]
              for role in ("driver", "worker", "tree")}
    result = {
        "images": images, "encoder": encoder, "cases": cases, "target": TARGET,
        "rss_4x_vs_1x_by_role": {role: round(r, 3) for role, r in ratios.items()},
        "rss_4x_vs_1x": round(max(ratios["driver"], ratios["worker"]), 3),
        "actors_note": actors_note(cases, info["cpus"]),
    }
    report("scaling", "Scaling and memory (bench.scaling)", markdown(result), result, info)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--images", type=int, default=96, help="1x corpus size (4x is four times this)")
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--actors", default="1,2")
    args = parser.parse_args()
    run(args.images, args.encoder, [int(a) for a in args.actors.split(",")])


if __name__ == "__main__":
    main()
