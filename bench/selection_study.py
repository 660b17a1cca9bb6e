"""Selection study: every selection method at keep 0.1 / 0.3 / 0.5 on labelled held-out images, judged by the
trained reconstructor (recon error, normalised token space) and by text-patch recall (judge-free), plus the
error-bounded mode.

``python -m bench.selection_study --checkpoint CKPT --input HELDOUT [--input2 ...] [--label NAME] [--out FILE]``

Methods: ``learned`` (set-aware rounds, the default), ``learned_oneshot`` (the paper's top-k of keep
probabilities), ``learned_x_diversity`` (DivPrune's max-min greedy with each candidate's distance weighted by its
keep probability), ``diversity``, ``random``, ``oracle`` (text patches first). The recon-error judge is the
selector's own reconstructor, which ``learned`` also uses to pick: text-patch recall is the measure it does not
see. Writes a JSON result (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CONF_DIR, SelectorConfig, load_config
from pipeline.encoders import VisionEncoder
from pipeline.evaluation import metrics
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.runner import ground_truth, method_scores
from pipeline.evaluation.samples import batched, encode_batch, iter_labelled_images
from pipeline.selector import load_checkpoint, select_tokens
from pipeline.selector.baselines import RandomSelector, diversity_ranks
from pipeline.selector.learned import LearnedSelector
from pipeline.selector.loss import image_spread, reconstruction_error

RATIOS = (0.1, 0.3, 0.5)
MAX_ERRORS = (0.2, 0.3, 0.4, 0.5)
METHODS = ("learned", "learned_oneshot", "learned_x_diversity", "diversity", "random", "oracle")


def rank_scores(ranks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (1 - ranks.double() / mask.sum(1, keepdim=True).clamp(min=1)).float().masked_fill(~mask, float("-inf"))


@torch.inference_mode()
def study(checkpoint_path: str, inputs: list[str], max_images: int | None, batch_size: int = 16) -> dict[str, Any]:
    cfg = load_config(EvaluateConfig, str(CONF_DIR / "evaluate.yaml"), [f"selector.checkpoint={checkpoint_path}"])
    encoder = VisionEncoder.from_config(cfg.encoder)
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.check_encoder(encoder.fingerprint())
    autoencoder = checkpoint.model.eval()
    rounds = LearnedSelector(checkpoint, "cpu", strategy="rounds")
    random_selector = RandomSelector(0)
    per_image: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    error_mode: dict[float, list[dict[str, Any]]] = defaultdict(list)
    timing: dict[str, float] = defaultdict(float)
    for path in inputs:
        input_cfg = load_config(EvaluateConfig, None, [f"input.path={path}"]).input
        for images in batched(iter_labelled_images(input_cfg, cfg.decode, {}, max_images), batch_size):
            batch = encode_batch(encoder, images)
            truth = ground_truth(images, batch, cfg)
            tokens, mask = batch.tokens, batch.mask
            keys = [item.key for item in images]
            started = time.perf_counter()
            probability = rounds.keep_probability(tokens, mask)
            timing["learned_oneshot"] += time.perf_counter() - started
            started = time.perf_counter()
            ranks = rounds.picking_order(tokens, mask, probability)
            timing["learned"] += time.perf_counter() - started
            scores = {
                "learned": rank_scores(ranks, mask),
                "learned_oneshot": probability,
                "learned_x_diversity": rank_scores(diversity_ranks(tokens, mask, weight=probability), mask),
                "diversity": rank_scores(diversity_ranks(tokens, mask), mask),
                "random": random_selector.scores(tokens, mask, keys=keys),
                "oracle": method_scores("oracle", {}, images, batch, truth, torch.device("cpu")),
            }
            spread = image_spread(tokens, mask)
            for method, method_score in scores.items():
                for ratio in RATIOS:
                    keep = select_tokens(method_score, mask, SelectorConfig(mode="ratio", ratio=ratio, min_tokens=1))
                    error = reconstruction_error(autoencoder.reconstruct(tokens, mask, keep), tokens, mask)
                    for row, item in enumerate(images):
                        n = int(mask[row].sum())
                        kept = keep[row, :n].numpy()
                        per_image[(method, ratio)].append({
                            "family": item.family, "recon_error": float(error[row]),
                            "relative_error": float(error[row] / spread[row]),
                            "text_patch_recall": metrics.text_patch_recall(kept, truth.is_text[row]),
                            "text_share": metrics.text_coverage(truth.is_text[row]),
                        })
            for bound in MAX_ERRORS:
                count = rounds.error_bounded_count(tokens, mask, ranks, bound)
                keep = mask & (ranks < count[:, None])
                error = reconstruction_error(autoencoder.reconstruct(tokens, mask, keep), tokens, mask)
                for row, item in enumerate(images):
                    n = int(mask[row].sum())
                    fraction = int(count[row]) / n
                    # The oracle at the same kept count: the recall bar this image's choice is held to.
                    oracle_keep = select_tokens(scores["oracle"][row : row + 1], mask[row : row + 1],
                                                SelectorConfig(mode="budget", budget=int(count[row]), min_tokens=1))
                    error_mode[bound].append({
                        "family": item.family, "kept_fraction": fraction, "relative_error": float(error[row] / spread[row]),
                        "text_patch_recall": metrics.text_patch_recall(keep[row, :n].numpy(), truth.is_text[row]),
                        "oracle_recall": metrics.text_patch_recall(oracle_keep[0, :n].numpy(), truth.is_text[row]),
                        "text_share": metrics.text_coverage(truth.is_text[row]),
                    })
    return {"per_image": per_image, "error_mode": error_mode, "timing_s": dict(timing)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    families = sorted({r["family"] for recs in result["per_image"].values() for r in recs})
    table: dict[str, Any] = {}
    for family in [*families, "all"]:
        for (method, ratio), records in result["per_image"].items():
            chosen = [r for r in records if family == "all" or r["family"] == family]
            table.setdefault(family, {}).setdefault(str(ratio), {})[method] = {
                "recon_error": _mean([r["recon_error"] for r in chosen]),
                "relative_error": _mean([r["relative_error"] for r in chosen]),
                "text_patch_recall": _mean([r["text_patch_recall"] for r in chosen]),
                "n": len(chosen),
            }
    error_mode = {}
    for bound, records in result["error_mode"].items():
        entry = {"within_bound": _mean([float(r["relative_error"] <= bound + 1e-6) for r in records]), "n": len(records)}
        for family in families:
            chosen = [r for r in records if r["family"] == family]
            entry[family] = {
                "kept_fraction": _mean([r["kept_fraction"] for r in chosen]),
                "relative_error": _mean([r["relative_error"] for r in chosen]),
                "text_patch_recall": _mean([r["text_patch_recall"] for r in chosen]),
                "oracle_recall_at_same_count": _mean([r["oracle_recall"] for r in chosen]),
                "spearman_kept_vs_text_share": metrics.spearman([r["kept_fraction"] for r in chosen],
                                                                [r["text_share"] for r in chosen]),
            }
        error_mode[str(bound)] = entry
    return {"table": table, "error_mode": error_mode, "timing_s": result["timing_s"]}


def markdown(summary: dict[str, Any], label: str) -> str:
    lines = []
    for family, by_ratio in summary["table"].items():
        lines.append(f"\n**{label} — {family}** (n = {next(iter(next(iter(by_ratio.values())).values()))['n']}): "
                     "recon error (reconstructor judge) / text-patch recall\n")
        lines.append("| keep | " + " | ".join(METHODS) + " |")
        lines.append("|---" * (len(METHODS) + 1) + "|")
        for ratio, by_method in by_ratio.items():
            cells = []
            for method in METHODS:
                m = by_method[method]
                recall = "–" if np.isnan(m["text_patch_recall"]) else f"{m['text_patch_recall']:.3f}"
                cells.append(f"{m['recon_error']:.4f} / {recall}")
            lines.append(f"| {ratio} | " + " | ".join(cells) + " |")
    lines.append(f"\n**{label} — error mode** (relative error = recon error / image spread)\n")
    families = [k for k in next(iter(summary["error_mode"].values())) if k not in ("within_bound", "n")]
    lines.append("| max_error | within bound | " + " | ".join(f"{f}: kept / rel. err / recall / oracle@same" for f in families) + " |")
    lines.append("|---" * (2 + len(families)) + "|")
    for bound, entry in summary["error_mode"].items():
        cells = [f"{entry[f]['kept_fraction']:.3f} / {entry[f]['relative_error']:.3f} / "
                 f"{entry[f]['text_patch_recall']:.3f} / {entry[f]['oracle_recall_at_same_count']:.3f}" for f in families]
        lines.append(f"| {bound} | {entry['within_bound']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.selection_study")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", action="append", required=True, help="held-out images (tar/folder/glob); repeatable")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--label", default="held-out")
    parser.add_argument("--out", default=None, help="JSON result file")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary = summarise(study(args.checkpoint, args.input, args.max_images))
    summary.update({"checkpoint": args.checkpoint, "inputs": args.input, "label": args.label})
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(markdown(summary, args.label))


if __name__ == "__main__":
    main()
