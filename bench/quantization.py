"""Quantized token storage: what ``output.dtype=int8`` / ``float8_e4m3`` lose against float16, and what they save.

``python -m bench.quantization [--images N] [--ratio 0.5] [--recon-steps S] [--probe-pages N] [--no-vlm]``

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

``--probe-pages N`` (default 512, 0 skips; ``--probe-test M`` held-out pages, default 512): the code probe of
``bench.probe_study`` (an attention-pool probe reading which digit a one-patch tag on a code page shows), trained
``--probe-steps`` steps on the float16-stored full token sets of N code pages from the default embedded encoder
(``EncoderConfig()``), then run unchanged on the M held-out pages' tokens as each dtype stores them, for three
keep sets fixed before storage: all tokens, the oracle's 30% and a seeded random 30%. Per dtype: accuracy with a
95% Wilson interval, its difference from float16 (target: within 0.01), the predictions that differ from
float16's and the largest change of a probe logit.

``--vlm`` (default on; ``--no-vlm`` skips): the float32 run's kept tokens, stored as each dtype and dequantized,
padded (``pad_collate``) into the tiny random LLaVA-NeXT that ``pipeline.vlm.train.load_vlm`` builds without a
checkpoint (``VLMModelConfig()``, run in ``--vlm-model-dtypes``, default float32 and bfloat16), with each
sample's caption as the target text. Over every position from the image section on: the largest and the mean
|Δlogit| (the mean relative to the reference's mean |logit|) and the top-1 next-token agreement, each against the
float16-stored run and against the float32-stored run.
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


def compress(corpus: Path, out: Path, encoder: str, ratio: float,
             dtype: str) -> tuple[dict[str, torch.Tensor], int, dict[str, dict[str, Any]]]:
    """{key: float32 [n_kept, dim]} as atr decodes them, the committed data files' bytes, and per key the
    sample's other loader fields (``positions``, ``n_tokens``, ``grid``, ``side``, ``caption``)."""
    shutil.rmtree(out, ignore_errors=True)
    summary = run_compress(load_config(CompressConfig, None, [
        f"input.path={corpus}", f"output.path={out}", f"encoder={encoder}", "executor=local",
        f"output.dtype={dtype}", "selector.method=norm", "selector.mode=ratio", f"selector.ratio={ratio}",
        "progress_interval_s=600"]))
    tokens, total_bytes, geometry = {}, 0, {}
    for entry in read_manifest(summary["output"]):
        path = f"{summary['output']}/{entry['path']}"
        table = pq.read_table(path)
        meta = read_format_metadata(table.schema)
        total_bytes += entry["bytes"]
        for row in table.to_pylist():
            tokens[row["key"]] = decode_row_tokens(row, meta)
            geometry[row["key"]] = {
                "key": row["key"], "positions": torch.tensor(row["positions"], dtype=torch.int64),
                "n_tokens": row["n_tokens"], "grid": (row["grid_rows"], row["grid_cols"]), "side": meta["side"],
                "caption": row.get("caption") or "an image"}
    return tokens, total_bytes, geometry


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


def probe_study(n_train: int, n_test: int, steps: int, ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """The code probe (``bench.probe_study``) trained on float16-stored tokens, read with each stored dtype."""
    from bench.probe_study import encode_pages, method_order_scores, wilson
    from pipeline.config import EncoderConfig, SelectorConfig
    from pipeline.encoders import VisionEncoder
    from pipeline.evaluation.probe import probe_predict, train_probe
    from pipeline.output.format import dequantize, quantize
    from pipeline.selector import select_tokens

    cfg = EncoderConfig()
    encoder = VisionEncoder.from_config(cfg)
    train_pages, train_batch, _ = encode_pages(encoder, cfg, 0, n_train, seed)
    test_pages, test_batch, coverage = encode_pages(encoder, cfg, n_train, n_test, seed)
    labels = torch.tensor([p.meta["code"] for p in train_pages])
    test_labels = torch.tensor([p.meta["code"] for p in test_pages])
    train_tokens = dequantize(*quantize(train_batch.tokens, "float16"))
    probe = train_probe(train_tokens, train_batch.mask, labels, 4, steps=steps, batch_size=64, lr=3e-3)
    mask = test_batch.mask
    policy = SelectorConfig(mode="ratio", ratio=ratio, min_tokens=1)
    keeps = {"all": mask, **{f"{method}_{int(ratio * 100)}": select_tokens(
        method_order_scores(method, None, test_pages, test_batch, coverage), mask, policy)
        for method in ("oracle", "random")}}
    stored = {dtype: dequantize(*quantize(test_batch.tokens, dtype)) for dtype in DTYPES}
    result: dict[str, Any] = {
        "train_pages": n_train, "test_pages": n_test, "probe_steps": steps, "encoder": cfg.name,
        "keep_sets": {}}
    train_pred = probe_predict(probe, train_tokens, train_batch.mask)
    result["train_accuracy_float16"] = float((train_pred == labels).float().mean())
    with torch.inference_mode():
        for name, keep in keeps.items():
            logits = {dtype: torch.cat([probe(tokens[i:i + 256], keep[i:i + 256]) for i in range(0, n_test, 256)])
                      for dtype, tokens in stored.items()}
            half_pred = logits["float16"].argmax(-1)
            half_acc = float((half_pred == test_labels).float().mean())
            rows = []
            for dtype in DTYPES:
                pred = logits[dtype].argmax(-1)
                correct = int((pred == test_labels).sum())
                rows.append({
                    "dtype": dtype, "correct": correct, "accuracy": round(correct / n_test, 4),
                    "ci95": [round(x, 4) for x in wilson(correct, n_test)],
                    "delta_vs_float16": round(correct / n_test - half_acc, 4),
                    "within_0.01_of_float16": abs(correct / n_test - half_acc) <= 0.01,
                    "predictions_changed_vs_float16": int((pred != half_pred).sum()),
                    "max_abs_logit_change_vs_float16": float((logits[dtype] - logits["float16"]).abs().max()),
                })
            result["keep_sets"][name] = {"kept_tokens": int(keep.sum()), "rows": rows}
    return result


def vlm_study(geometry: dict[str, dict[str, Any]], reference: dict[str, torch.Tensor],
              model_dtypes: list[str]) -> list[dict[str, Any]]:
    """The float32-stored kept tokens, stored as each dtype, fed through the LLaVA-NeXT feed; logits compared."""
    from pipeline.loader.collate import pad_collate
    from pipeline.output.format import dequantize, quantize
    from pipeline.vlm.config import VLMModelConfig
    from pipeline.vlm.feed import build_vlm_inputs, image_token_id
    from pipeline.vlm.train import load_vlm

    keys = sorted(reference)
    dim, side = reference[keys[0]].shape[1], geometry[keys[0]]["side"]
    rows = []
    for model_dtype in model_dtypes:
        cfg = VLMModelConfig(dtype=model_dtype)
        model, tokenizer = load_vlm(cfg, dim, side)
        model.eval()
        weight_dtype = next(model.parameters()).dtype
        logits, region = {}, None
        with torch.inference_mode():
            for dtype in DTYPES:
                samples = [{**geometry[k], "tokens": dequantize(*quantize(reference[k], dtype)).to(weight_dtype)}
                           for k in keys]
                inputs = build_vlm_inputs(model, pad_collate(samples), tokenizer, prompt=cfg.prompt)
                logits[dtype] = model(**inputs.model_kwargs()).logits.float()
                if region is None:  # every position from the first image token on that is not padding
                    is_image = (inputs.input_ids == image_token_id(model)).long()
                    region = inputs.attention_mask.bool() & (is_image.cumsum(1) > 0)
        for dtype in DTYPES:
            got = logits[dtype][region]
            row: dict[str, Any] = {"model_dtype": model_dtype, "dtype": dtype, "positions": int(region.sum()),
                                   "vocab": got.shape[-1]}
            for ref_name in ("float16", "float32"):
                want = logits[ref_name][region]
                delta = (got - want).abs()
                row[f"vs_{ref_name}"] = {
                    "max_abs_dlogit": float(delta.max()),
                    "mean_abs_dlogit_rel": float(delta.mean() / want.abs().mean()),
                    "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 6),
                }
            if dtype == "float16":  # how decisive the random model's next-token choices are
                top2 = got.topk(2, dim=-1).values
                row["mean_abs_logit"] = float(got.abs().mean())
                row["top1_top2_gap_median"] = float((top2[:, 0] - top2[:, 1]).median())
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--encoder", default="tiny")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--recon-steps", type=int, default=300)
    parser.add_argument("--recon-images", type=int, default=96)
    parser.add_argument("--probe-pages", type=int, default=512, help="code-probe train pages; 0 skips the probe")
    parser.add_argument("--probe-test", type=int, default=512, help="code-probe held-out pages")
    parser.add_argument("--probe-steps", type=int, default=600)
    parser.add_argument("--vlm", action=argparse.BooleanOptionalAction, default=True,
                        help="feed the kept tokens through the tiny LLaVA-NeXT per stored dtype")
    parser.add_argument("--vlm-model-dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus", args.images)
        outputs = {dtype: compress(corpus, Path(tmp) / dtype, args.encoder, args.ratio, dtype) for dtype in DTYPES}
    reference, _, geometry = outputs["float32"]
    half, half_bytes, _ = outputs["float16"]
    dim = next(iter(reference.values())).shape[1]
    rows = []
    for dtype in DTYPES:
        tokens, file_bytes, _ = outputs[dtype]
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
    if args.probe_pages:
        probe = result["probe"] = probe_study(args.probe_pages, args.probe_test, args.probe_steps)
        print(f"\ncode probe trained {args.probe_steps} steps on {args.probe_pages} pages' float16-stored full "
              f"token sets (train accuracy {probe['train_accuracy_float16']:.4f}); {args.probe_test} held-out pages:")
        print("| keep set | dtype | accuracy (95% CI) | Δ vs f16 | within 0.01 | predictions ≠ f16 "
              "| max abs Δ probe logit |")
        print("|---|---|---|---|---|---|---|")
        for name, keep_set in probe["keep_sets"].items():
            for r in keep_set["rows"]:
                print(f"| {name} | {r['dtype']} | {r['accuracy']:.4f} ({r['correct']}/{args.probe_test}; "
                      f"{r['ci95'][0]:.4f}–{r['ci95'][1]:.4f}) | {r['delta_vs_float16']:+.4f} "
                      f"| {'yes' if r['within_0.01_of_float16'] else 'no'} | {r['predictions_changed_vs_float16']} "
                      f"| {r['max_abs_logit_change_vs_float16']:.2e} |")
    if args.vlm:
        result["vlm"] = vlm_study(geometry, reference, args.vlm_model_dtypes.split(","))
        first = next(r for r in result["vlm"] if r["dtype"] == "float16")
        print(f"\ntiny random LLaVA-NeXT (VLMModelConfig()), {len(reference)} samples' kept tokens, "
              f"{first['positions']} positions from the image on, vocab {first['vocab']}; float16-stored run "
              f"({first['model_dtype']} model): mean |logit| {first['mean_abs_logit']:.3f}, median top-1/top-2 gap "
              f"{first['top1_top2_gap_median']:.3e}:")
        print("| model dtype | stored dtype | max abs Δlogit vs f16 | mean abs Δ / mean abs logit vs f16 "
              "| top-1 vs f16 | max abs Δlogit vs f32 | mean rel. vs f32 | top-1 vs f32 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["vlm"]:
            a, b = r["vs_float16"], r["vs_float32"]
            print(f"| {r['model_dtype']} | {r['dtype']} | {a['max_abs_dlogit']:.3e} | {a['mean_abs_dlogit_rel']:.3e} "
                  f"| {a['top1_agreement']:.6f} | {b['max_abs_dlogit']:.3e} | {b['mean_abs_dlogit_rel']:.3e} "
                  f"| {b['top1_agreement']:.6f} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
