"""Loader throughput: PrunedTokenDataset + pad_collate against a plain ``pyarrow.parquet.read_table``.

``python -m bench.loader [--rows N] [--dim D] [--kept LO,HI] [--repeats R]``: writes an output through atr's own
writer (``bench.peers.write_corpus``: float16, 100-400 kept tokens x 1024 dims per row by default, as a CLIP
ViT-L output keeps them, about 0.5 MB a row; tokens uncompressed, row groups of 256, ``output.row_group_size``'s
default), then times on the same warm files, interleaved:

* ``read_table`` of every data file with the columns the loader reads (pyarrow's thread pool, and one thread);
* one epoch of the loader (its default shuffle window in bytes, batches of 32 padded to the longest, float32) in
  the main process with one torch thread, as in a DataLoader worker, and through a DataLoader with 2 workers;
* the same in the stored float16 (``tokens_dtype=None``: cast on the device), with 0 and 2 workers.

``python -m bench.peers`` compares the loader with HF ``datasets``, MosaicML Streaming, WebDataset and LitData.

Best of ``R`` rounds; wall and CPU seconds. Prints a JSON line last and writes ``bench/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.peers import write_corpus
from pipeline.loader import READ_COLUMNS, PrunedTokenDataset, PrunedTokenLoader
from pipeline.output.manifest import read_manifest

RESULTS = Path(__file__).resolve().parent / "results" / "loader.json"


def best_of_interleaved(repeats: int, runs: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Each variant once per round, rounds repeated: a busy neighbour slows all variants alike."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            counts = run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if name not in best or wall < best[name]["seconds"]:
                best[name] = {"seconds": wall, "cpu_seconds": cpu, **counts}
    return best


def read_table_all(root: str, use_threads: bool) -> dict:
    columns = [*READ_COLUMNS, "caption"]
    rows = tokens = 0
    for entry in read_manifest(root):
        table = pq.read_table(f"{root}/{entry['path']}", columns=columns, use_threads=use_threads)
        rows += table.num_rows
        tokens += sum(table.column("positions").combine_chunks().value_lengths().to_pylist())
    return {"rows": rows, "tokens": tokens}


def loader_epoch(root: str, num_workers: int, batch_size: int, tokens_dtype: torch.dtype | None = torch.float32) -> dict:
    dataset = PrunedTokenDataset(root, tokens_dtype=tokens_dtype)
    loader = PrunedTokenLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    rows = tokens = 0
    for batch in loader:
        rows += len(batch["keys"])
        tokens += int(batch["lengths"].sum())
    return {"rows": rows, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loader")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--kept", default="100,400")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    # A main-process loader shares torch's intra-op pool with the trainer; on a busy host its OpenMP barriers
    # stall. One thread is what torch gives each DataLoader worker.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kept = tuple(int(v) for v in args.kept.split(","))
        write_corpus(Path(tmp), args.rows, kept, args.dim, args.shards, tars=False)  # atr's writer, as stored
        root = f"{tmp}/atr/tiny/bench"
        read_table_all(root, use_threads=True)  # warm the page cache
        best = best_of_interleaved(args.repeats, {
            "pyarrow_read_table": lambda: read_table_all(root, use_threads=True),
            "pyarrow_read_table_1thread": lambda: read_table_all(root, use_threads=False),
            "loader": lambda: loader_epoch(root, 0, args.batch_size),
            "loader_2workers": lambda: loader_epoch(root, 2, args.batch_size),
            "loader_float16": lambda: loader_epoch(root, 0, args.batch_size, None),
            "loader_float16_2workers": lambda: loader_epoch(root, 2, args.batch_size, None),
        })
    assert len({(r["rows"], r["tokens"]) for r in best.values()}) == 1, "variants read different data"
    results = {
        name: {"seconds": round(r["seconds"], 4), "cpu_seconds": round(r["cpu_seconds"], 4),
               "samples_per_s": round(r["rows"] / r["seconds"], 1), "tokens_per_s": round(r["tokens"] / r["seconds"])}
        for name, r in best.items()
    }

    def ratio(name: str, baseline: str) -> float:
        return round(results[name]["samples_per_s"] / results[baseline]["samples_per_s"], 3)

    summary = {
        "rows": best["loader"]["rows"], "kept_tokens": best["loader"]["tokens"], "dim": args.dim, "dtype": "float16",
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
        "results": results,
        "loader_vs_pyarrow": ratio("loader", "pyarrow_read_table"),
        "loader_vs_pyarrow_1thread": ratio("loader", "pyarrow_read_table_1thread"),
        "loader_2workers_vs_pyarrow": ratio("loader_2workers", "pyarrow_read_table"),
        "loader_float16_vs_pyarrow": ratio("loader_float16", "pyarrow_read_table"),
        "loader_float16_2workers_vs_pyarrow": ratio("loader_float16_2workers", "pyarrow_read_table"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
