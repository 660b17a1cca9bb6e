"""Quantized token storage: what ``output.dtype=int8`` / ``float8_e4m3`` lose against float16, and what they save.

``python -m bench.quantization [--images N] [--encoder tiny] [--ratio 0.5]``

One synthetic corpus compressed through the real pipeline (local executor, Parquet, ``selector.method=norm
selector.mode=ratio``) once per storage dtype, float32 included as the reference. The same config but the dtype
keeps the same tokens, so rows are matched by key and every kept token compared: cosine similarity per token
(min / mean) against the float32 tokens and against the float16 tokens, the relative L2 error, the stored bytes
per kept token (values + per-token scale) and the committed data files' bytes, each as a ratio to float16.
Targets (issue 21): int8 at most 0.52 of float16's bytes per kept token, cosine at least 0.999.

``--recon-steps S`` (default 300, 0 skips) also trains a selector + reconstructor for S steps on the float32
features of a separate synthetic corpus's train split and, on its held-out split, compares per stored dtype:
the reconstruction error (MSE in the normalised token space, as ``jobs.evaluate``) when the reconstructor is fed
the kept tokens as stored, the keep set at 30% chosen on the full-precision tokens; and the trained selector run
on the stored tokens themselves (selecting from a full-token output): its agreement with the float32 keep set
and its text-patch recall on the document pages.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from bench.common import machine, synthetic_corpus
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, load_config
from pipeline.output.format import decode_row_tokens, read_format_metadata, token_record_bytes
from pipeline.output.manifest import read_manifest

DTYPES = ["float32", "float16", "bfloat16", "int8", "float8_e4m3"]


def compress(corpus: Path, out: Path, encoder: str, ratio: float, dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """{key: float32 [n_kept, dim]} as atr decodes them, and the committed data files' bytes."""
    shutil.rmtree(out, ignore_errors=True)
    summary = run_compress(load_config(CompressConfig, None, [
        f"input.path={corpus}", f"output.path={out}", f"encoder={encoder}", "executor=local",
        f"output.dtype={dtype}", "selector.method=norm", "selector.mode=ratio", f"selector.ratio={ratio}",
        "progress_interval_s=600"]))
    tokens, total_bytes = {}, 0
    for entry in read_manifest(summary["output"]):
        path = f"{summary['output']}/{entry['path']}"
        table = pq.read_table(path)
        meta = read_format_metadata(table.schema)
        total_bytes += entry["bytes"]
        for row in table.to_pylist():
            tokens[row["key"]] = decode_row_tokens(row, meta)
    return tokens, total_bytes


def compare(tokens: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    got = torch.cat([tokens[k] for k in sorted(reference)])
    want = torch.cat([reference[k] for k in sorted(reference)])
    cosine = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1)
    relative = (got - want).double().norm(dim=-1) / want.double().norm(dim=-1).clamp_min(1e-12)
    return {"cos_min": round(float(cosine.min()), 6), "cos_mean": round(float(cosine.mean()), 6),
            "rel_l2_mean": round(float(relative.mean()), 6), "tokens": len(got)}


def reconstructor_study(steps: int, images: int, ratio: float = 0.3) -> list[dict[str, Any]]:
    from pipeline.config import CorpusConfig, EncoderConfig, SelectorConfig, SelectorModelConfig, TrainConfig
    from pipeline.corpus import iter_corpus
    from pipeline.encoders import VisionEncoder, token_boxes
    from pipeline.evaluation import metrics
    from pipeline.output.format import dequantize, quantize
    from pipeline.selector import select_tokens
    from pipeline.selector.loss import reconstruction_error
    from pipeline.selector.model import SelectorAutoencoder
    from pipeline.selector.training import pad_token_sets, sample_batches, train_loop

    encoder_cfg = EncoderConfig()
    encoder = VisionEncoder.from_config(encoder_cfg)
    samples = list(iter_corpus(CorpusConfig(output="-", n=images, heldout_fraction=0.25, seed=1)))
    encoded = []
    for start in range(0, len(samples), 16):
        chunk = [sample for _, sample in samples[start:start + 16]]
        encoded += encoder.encode_images([sample.image for sample in chunk])
    train = [e.tokens for (split, _), e in zip(samples, encoded) if split == "train"]
    held = [(sample, e) for (split, sample), e in zip(samples, encoded) if split == "heldout"]
    torch.manual_seed(0)
    model = SelectorAutoencoder(encoder.hidden_size, SelectorModelConfig())
    train_loop(model, sample_batches(train, 8, seed=0), TrainConfig(steps=steps))
    model.eval()
    batch = pad_token_sets([e.tokens for _, e in held])
    tokens, mask = batch.tokens, batch.mask
    policy = SelectorConfig(mode="ratio", ratio=ratio)
    is_text = []
    for sample, e in held:
        boxes = token_boxes(sample.image.size, e.grid, encoder_cfg)
        coverage = metrics.token_text_coverage(boxes, sample.meta.get("text_boxes") or [], sample.image.size)
        is_text.append(metrics.text_patch_mask(coverage))

    def keep_of(features: torch.Tensor) -> torch.Tensor:
        return select_tokens(model.selector(features, mask).softmax(-1)[..., 1], mask, policy)

    rows = []
    with torch.inference_mode():
        keep_full = keep_of(tokens)
        for dtype in DTYPES:
            stored = dequantize(*quantize(tokens, dtype))
            recon = reconstruction_error(model.reconstruct(stored, mask, keep_full), tokens, mask)
            keep_stored = keep_of(stored)
            agree = (keep_stored & keep_full).sum() / (keep_stored | keep_full).sum()
            recalls = [metrics.text_patch_recall(keep_stored[i, :len(t)].numpy(), t)
                       for i, t in enumerate(is_text) if t.any()]
            rows.append({"dtype": dtype, "recon_error": round(float(recon.mean()), 5),
                         "keep_jaccard_vs_float32": round(float(agree), 4),
                         "text_patch_recall": round(float(np.mean(recalls)), 4), "documents": len(recalls)})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--recon-steps", type=int, default=300)
    parser.add_argument("--recon-images", type=int, default=96)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus", args.images)
        outputs = {dtype: compress(corpus, Path(tmp) / dtype, args.encoder, args.ratio, dtype) for dtype in DTYPES}
    reference, _ = outputs["float32"]
    half, half_bytes = outputs["float16"]
    dim = next(iter(reference.values())).shape[1]
    rows = []
    for dtype in DTYPES:
        tokens, file_bytes = outputs[dtype]
        assert sorted(tokens) == sorted(reference), "every dtype keeps the same samples"
        rows.append({
            "dtype": dtype,
            "vs_float32": compare(tokens, reference),
            "vs_float16": compare(tokens, half),
            "bytes_per_token": token_record_bytes(dtype, dim),
            "token_bytes_vs_float16": round(token_record_bytes(dtype, dim) / token_record_bytes("float16", dim), 4),
            "file_bytes_vs_float16": round(file_bytes / half_bytes, 4),
        })
    result = {"images": args.images, "encoder": args.encoder, "dim": dim, "ratio": args.ratio, "machine": machine(),
              "rows": rows}
    print("| dtype | cos min / mean vs f32 | cos min / mean vs f16 | rel L2 vs f32 | bytes/token | vs f16 "
          "| files vs f16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["vs_float32"], r["vs_float16"]
        print(f"| {r['dtype']} | {a['cos_min']:.6f} / {a['cos_mean']:.6f} | {b['cos_min']:.6f} / {b['cos_mean']:.6f} "
              f"| {a['rel_l2_mean']:.5f} | {r['bytes_per_token']} | {r['token_bytes_vs_float16']} "
              f"| {r['file_bytes_vs_float16']} |")
    if args.recon_steps:
        result["reconstructor"] = reconstructor_study(args.recon_steps, args.recon_images)
        print(f"\nreconstructor trained {args.recon_steps} steps on float32 features; held-out, 30% kept:")
        print("| dtype | recon error (kept as stored) | keep Jaccard vs f32 (selector on stored) | text-patch recall |")
        print("|---|---|---|---|")
        for r in result["reconstructor"]:
            print(f"| {r['dtype']} | {r['recon_error']} | {r['keep_jaccard_vs_float32']} | {r['text_patch_recall']} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
