"""Storage: bytes per image of pruned output against the full-token output (``selector.method=none``).

``python -m bench.storage [--images N] [--encoder tiny] [--ratios 0.25,0.5,0.75]``

One synthetic corpus compressed (local executor, float16, Parquet) once with every token kept and once per keep
ratio (``selector.method=norm selector.mode=ratio``). Bytes are the committed data files' sizes from the manifest.
``vs_kept = (pruned bytes / full bytes) / kept fraction``: 1.0 means a pruned image costs exactly its share of
tokens; above 1 is per-row overhead (positions, keys, captions, page headers) that does not shrink with pruning.
The column split comes from the Parquet footers (compressed size of each column chunk).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.common import machine, markdown_table, report, synthetic_corpus
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, load_config
from pipeline.output.manifest import read_manifest

TARGET = 0.05


def compress(corpus: Path, out: Path, encoder: str, selection: list[str]) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(CompressConfig, None, [f"input.path={corpus}", f"output.path={out}", f"encoder={encoder}",
                                             "executor=local", "output.dtype=float16", "progress_interval_s=60",
                                             *selection])
    summary = run_compress(cfg)
    columns: Counter = Counter()
    files = read_manifest(summary["output"])
    for entry in files:
        metadata = pq.ParquetFile(f"{summary['output']}/{entry['path']}").metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for column in range(row_group.num_columns):
                chunk = row_group.column(column)
                columns[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    images = summary["images"]
    return {
        "images": images, "kept_fraction": summary["tokens_kept"] / summary["tokens_full"],
        "bytes_per_image": sum(f["bytes"] for f in files) / images,
        "column_bytes_per_image": {name: round(size / images, 1) for name, size in sorted(columns.items())},
    }


def markdown(result: dict[str, Any]) -> str:
    full = result["full"]
    rows = [["none (all tokens)", 1.0, round(full["bytes_per_image"]), "1.000", "–",
             round(full["column_bytes_per_image"]["tokens"]), round(full["column_bytes_per_image"]["positions"])]]
    for ratio, r in result["pruned"].items():
        rows.append([f"norm, ratio {ratio}", round(r["kept_fraction"], 3), round(r["bytes_per_image"]),
                     f"{r['bytes_vs_full']:.3f}", f"**{r['vs_kept']:.3f}**", round(r["column_bytes_per_image"]["tokens"]),
                     round(r["column_bytes_per_image"]["positions"])])
    table = markdown_table(["selection", "kept fraction", "bytes / image", "pruned / full bytes",
                            "(pruned / full) / kept", "tokens column B/img", "positions column B/img"], rows)
    met = "met" if abs(result["storage_vs_kept"] - 1) <= TARGET else "not met"
    return (f"{result['images']} synthetic images, encoder `{result['encoder']}` ({result['tokens_per_image']} tokens "
            f"x {result['dim']} dims), float16, Parquet as `jobs.compress` writes it.\n\n{table}\n\n"
            f"Target: pruned / full bytes within {100 * TARGET:.0f}% of the kept fraction — **{met}** "
            f"(`storage_vs_kept` = {result['storage_vs_kept']:.3f}, the ratio farthest from 1).\n")


def run(images: int, encoder: str, ratios: list[float]) -> dict[str, Any]:
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        root = Path(tmp)
        corpus = synthetic_corpus(root / "corpus", images)
        full = compress(corpus, root / "full", encoder, ["selector.method=none"])
        pruned = {}
        for ratio in ratios:
            r = compress(corpus, root / f"ratio-{ratio}", encoder,
                         ["selector.method=norm", "selector.mode=ratio", f"selector.ratio={ratio}"])
            r["bytes_vs_full"] = r["bytes_per_image"] / full["bytes_per_image"]
            r["vs_kept"] = r["bytes_vs_full"] / r["kept_fraction"]
            pruned[str(ratio)] = r
    cfg = load_config(CompressConfig, None, [f"encoder={encoder}"]).encoder
    result = {
        "images": images, "encoder": encoder, "dim": cfg.hidden_size, "tokens_per_image": cfg.tokens_per_tile,
        "full": full, "pruned": pruned, "target": TARGET,
        "storage_vs_kept": max((r["vs_kept"] for r in pruned.values()), key=lambda v: abs(v - 1)),
    }
    report("storage", "Storage (bench.storage)", markdown(result), result, info)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    args = parser.parse_args()
    run(args.images, args.encoder, [float(r) for r in args.ratios.split(",")])


if __name__ == "__main__":
    main()
