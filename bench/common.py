"""What every benchmark shares: the machine's description, interleaved timing, and where results go.

Each benchmark writes ``bench/results/NAME.json`` and replaces its own section of ``docs/benchmarks.md``
(between ``<!-- bench:NAME -->`` markers), so rerunning one benchmark leaves the others' sections alone.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus

ROOT = Path(__file__).resolve().parent.parent
DOC_HEADER = """# Benchmarks

Each section is written by its benchmark (`python -m bench.NAME`; `python -m bench.all` runs them all) and
names the machine, the command and the date it was measured on. Raw figures are in `bench/results/NAME.json`.
Rerunning one benchmark replaces only its own section.
"""


def output_paths() -> tuple[Path, Path]:
    """(results folder, benchmarks page). ``ATR_BENCH_OUT=DIR`` puts both under DIR (smoke tests, trial runs),
    leaving the recorded ones untouched."""
    out = os.environ.get("ATR_BENCH_OUT")
    if out:
        return Path(out) / "results", Path(out) / "benchmarks.md"
    return ROOT / "bench" / "results", ROOT / "docs" / "benchmarks.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Enough to tell two measurements' hardware and load apart."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
        # How idle OpenMP threads wait (spin or sleep) changes CPU timings on a shared host; unset is libgomp's spin.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    policy = f", OMP_WAIT_POLICY={info['omp_wait_policy']}" if info.get("omp_wait_policy") else ""
    return (f"{info['cpu']}, {info['cpus']} CPUs{gpu}, torch {info['torch']}{policy}; "
            f"load average {info['load_average_1m']} at start (other jobs share this host)")


def command_line() -> str:
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else sys.argv[0]
    return " ".join(["python -m", name, *map(shlex.quote, sys.argv[1:])])


def today() -> str:
    return time.strftime("%Y-%m-%d")


def synthetic_corpus(root: Path, images: int, shard_size: int = 16) -> Path:
    """The demo corpus generator's ``train`` split: ``images`` images in shards of ``shard_size``."""
    write_corpus(CorpusConfig(output=str(root), n=images, shard_size=shard_size, heldout_fraction=0.0))
    return root / "train"


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved(rounds: int, variants: dict[str, Callable[[], Any]]) -> dict[str, list[tuple[float, Any]]]:
    """Each variant once per round, rounds repeated, so load from other jobs falls on every variant alike.

    Returns each variant's (wall seconds, return value) per round, in round order.
    """
    runs: dict[str, list[tuple[float, Any]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            value = run()
            runs[name].append((time.perf_counter() - start, value))
    return runs


def import_psutil():
    try:
        import psutil
    except ImportError:
        # Ray vendors psutil and puts its copy on sys.path when imported; finders may remember the miss above.
        importlib.import_module("ray")
        importlib.invalidate_caches()
        psutil = importlib.import_module("psutil")
    return psutil


def process_role(cmdline: list[str], is_root: bool) -> str:
    if is_root:
        return "driver"
    text = " ".join(cmdline)
    # Ray retitles its processes: workers and actors "ray::IDLE", "ray::MapWorker(...)"; agents "ray::...Agent".
    task_process = text.startswith("ray::") and "Agent" not in text.split(" ")[0]
    return "worker" if "default_worker.py" in text or task_process else "system"


def peak_rss_bytes(pid: int) -> int | None:
    """The kernel's high-water mark of the process's resident set (Linux), which sampling cannot miss."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class ProcessTreeSampler:
    """Samples a process and all its descendants in a thread: peak RSS per process, by role, and CPU time.

    Roles: ``driver`` (the root), ``worker`` (Ray worker and actor processes), ``system`` (raylet, GCS, agents).
    Each sample reads the kernel's peak RSS where it can, so a short spike between samples still counts.
    CPU time is what the tree used while sampled; a process that exits loses at most its last interval.
    """

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.psutil = import_psutil()
        self.root = self.psutil.Process(pid)
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.roles: dict[int, str] = {}
        self.tree_peak = 0
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProcessTreeSampler":
        self.sample()  # the baseline: CPU already used by processes alive now is not this run's
        self.cpu_first = dict(self.cpu_last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                return

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return
        total = 0
        for process in processes:
            try:
                rss = process.memory_info().rss
                cpu = process.cpu_times()
                if process.pid not in self.roles:
                    self.roles[process.pid] = process_role(process.cmdline(), process.pid == self.root.pid)
            except self.psutil.Error:
                continue
            total += rss
            self.cpu_last[process.pid] = cpu.user + cpu.system
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss, peak_rss_bytes(process.pid) or 0)
        self.tree_peak = max(self.tree_peak, total)

    @property
    def cpu_seconds(self) -> float:
        return sum(last - self.cpu_first.get(pid, 0.0) for pid, last in self.cpu_last.items())

    def peak_by_role(self) -> dict[str, int]:
        """The largest single process's peak RSS in each role, in bytes."""
        peaks: dict[str, int] = {}
        for pid, peak in self.peaks.items():
            role = self.roles[pid]
            peaks[role] = max(peaks.get(role, 0), peak)
        return peaks


def write_result(name: str, result: dict[str, Any]) -> Path:
    results, _ = output_paths()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section_text(name: str, title: str, body: str, info: dict[str, Any], command: str) -> str:
    return (f"<!-- bench:{name} -->\n## {title}\n\n"
            f"*Measured {today()} on {machine_line(info)}.*  \n*Command:* `{command}`\n\n"
            f"{body.strip()}\n<!-- /bench:{name} -->\n")


def update_doc(name: str, section: str, *, replace: bool = True) -> None:
    """Replace the ``name`` section of the benchmarks page (or only add it when absent, ``replace=False``);
    other sections stay as they are."""
    _, doc = output_paths()
    text = doc.read_text() if doc.exists() else DOC_HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    if pattern.search(text):
        if not replace:
            return
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def report(name: str, title: str, body: str, result: dict[str, Any], info: dict[str, Any]) -> None:
    """Write the JSON result and the doc section; print the result as the last stdout line."""
    command = command_line()
    result = {**result, "machine": info, "command": command, "date": today()}
    write_result(name, result)
    update_doc(name, section_text(name, title, body, info, command))
    print(json.dumps(result, sort_keys=True), flush=True)
