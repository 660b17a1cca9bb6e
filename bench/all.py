"""Every benchmark, each in its own process, at sizes that finish in under 10 minutes on a 2-CPU host.

``python -m bench.all``: runs ``bench.pipeline``, ``bench.selector_overhead``, ``bench.storage``,
``bench.loader`` and ``bench.scaling`` one after another (a process each, so one benchmark's thread settings
or Ray cluster cannot touch the next), writes a summary section to ``docs/benchmarks.md`` and prints one JSON
object as its last stdout line with the headline figures and which targets they meet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    ROOT,
    machine,
    markdown_table,
    output_paths,
    report,
    section_text,
    update_doc,
)

# Sizes for the 10-minute budget; each module's own defaults are larger.
RUNS: dict[str, list[str]] = {
    "pipeline": ["--images", "tiny=128,vit-b-16=64", "--rounds", "2"],
    "selector_overhead": ["--rounds", "3", "--no-time-vitl"],
    "storage": ["--images", "48"],
    "loader": ["--rows", "2000", "--repeats", "3"],
    "scaling": ["--images", "48"],
}
# Headline key -> (benchmark, key in its result, target, whether higher is better or "near" 1).
HEADLINES: dict[str, tuple[str, str, float, str]] = {
    "pipeline_vs_encoder": ("pipeline", "pipeline_vs_encoder", 0.8, "min"),
    "selector_flops_ratio_vitl336": ("selector_overhead", "selector_flops_ratio_vitl336", 0.03, "max"),
    "storage_vs_kept": ("storage", "storage_vs_kept", 0.05, "near"),
    "loader_vs_pyarrow": ("loader", "loader_vs_pyarrow", 0.7, "min"),
    "rss_4x_vs_1x": ("scaling", "rss_4x_vs_1x", 1.2, "max"),
}
GPU_PLACEHOLDER = """<!-- bench:gpu -->
## GPU (bench.gpu)

*Not measured yet: `python -m bench.gpu` fills this section when a GPU is available (pipeline vs bare encoder with
`clip-vit-l-336` dimensions).*
<!-- /bench:gpu -->
"""


def run_benchmark(name: str, args: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", f"bench.{name}", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"bench.{name} failed with exit code {completed.returncode}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return {**result, "seconds": round(time.monotonic() - started, 1)}


def target_met(value: float, target: float, kind: str) -> bool:
    if kind == "min":
        return value >= target
    if kind == "max":
        return value <= target
    return abs(value - 1) <= target


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    headline = {key: results[bench][field] for key, (bench, field, _, _) in HEADLINES.items()}
    met = {key: target_met(headline[key], target, kind) for key, (_, _, target, kind) in HEADLINES.items()}
    return {**headline, "targets_met": met, "seconds": {name: r["seconds"] for name, r in results.items()}}


def loader_section(result: dict[str, Any], info: dict[str, Any]) -> str:
    """``bench.loader`` writes only its JSON; its page section is written here from that JSON."""
    rows = [[name, r["samples_per_s"], r["tokens_per_s"], r["seconds"], r["cpu_seconds"]]
            for name, r in result["results"].items()]
    met = "met" if result["loader_vs_pyarrow"] >= 0.7 else "not met"
    body = (f"{result['rows']} rows, {result['kept_tokens']} kept tokens of {result['dim']} dims in "
            f"{result['dtype']}; batches of {result['batch_size']}; best of the interleaved repeats.\n\n"
            + markdown_table(["reader", "samples/s", "tokens/s", "wall s", "CPU s"], rows)
            + f"\n\nTarget: loader / `pyarrow.parquet.read_table` ≥ 0.7 — **{met}** "
            f"(`loader_vs_pyarrow` = {result['loader_vs_pyarrow']}). The files are atr's own (tokens uncompressed), "
            "so `read_table` is a copy of the bytes: it builds no per-sample tensor, no float32 and no batch. "
            "`bench.peers` holds the floor that does (`pyarrow_read_table` there) and the other loaders.\n")
    return section_text("loader", "Loader (bench.loader)", body, info, "python -m bench.loader " + " ".join(RUNS["loader"]))


def markdown(summary: dict[str, Any]) -> str:
    rows = [[key, f"{summary[key]:.3g}", f"{'≥' if kind == 'min' else '≤' if kind == 'max' else '1 ±'} {target}",
             "yes" if summary["targets_met"][key] else "**no**", f"bench.{bench}"]
            for key, (bench, _, target, kind) in HEADLINES.items()]
    seconds = sum(summary["seconds"].values())
    return (markdown_table(["figure", "value", "target", "met", "from"], rows)
            + f"\n\nAll benchmarks ran in {seconds:.0f} s (sizes in `bench/all.py`); the sections below hold each "
              "benchmark's figures and, where a target is not met, what limits it.\n")


def main() -> None:
    info = machine()
    results = {}
    for name, args in RUNS.items():
        print(f"[bench.all] bench.{name} {' '.join(args)}", file=sys.stderr, flush=True)
        results[name] = run_benchmark(name, args)
    update_doc("loader", loader_section(results["loader"], info))
    update_doc("gpu", GPU_PLACEHOLDER, replace=False)
    summary = summarise(results)
    report("all", "Summary (bench.all)", markdown(summary), summary, info)
    _, doc = output_paths()
    print(f"[bench.all] wrote {doc}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
