"""The code probe: can a frozen probe still read a one-patch code after selection?

``python -m bench.probe_study --checkpoint CKPT [--train 1024] [--test 256] [--out FILE] [--plot FILE]``

Code pages (``pipeline.corpus.generate_code_page``): sparse pages with one 16-px tag showing one of four digits
(the class) on a colour drawn independently of it. An attention-pool probe is trained on the *full* token sets
of ``--train`` pages, then reads the pruned sets of ``--test`` other pages unchanged. The figure discriminates
only if random keeping 30% loses ≥ 10 points against all tokens while the oracle (text boxes, the tag among
them, first) stays within 2; the result says whether that holds. Accuracies carry a 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from pipeline.config import CONF_DIR, EncoderConfig, SelectorConfig, load_config
from pipeline.corpus import generate_code_page
from pipeline.encoders import VisionEncoder, token_boxes
from pipeline.evaluation import metrics
from pipeline.evaluation.oracle import oracle_scores
from pipeline.evaluation.probe import probe_predict, train_probe
from pipeline.evaluation.samples import pad_encoded
from pipeline.selector import load_checkpoint, select_tokens
from pipeline.selector.baselines import RandomSelector, diversity_ranks
from pipeline.selector.learned import LearnedSelector

RATIOS = (0.1, 0.3, 0.5)
METHODS = ("learned", "learned_oneshot", "diversity", "random", "oracle")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def encode_pages(encoder: VisionEncoder, cfg: EncoderConfig, start: int, count: int, seed: int):
    pages = [generate_code_page(start + i, seed) for i in range(count)]
    encoded = []
    for i in range(0, count, 64):
        encoded += encoder.encode_images([p.image for p in pages[i : i + 64]])
    batch = pad_encoded(encoded)
    coverage = [metrics.token_text_coverage(token_boxes(p.image.size, e.grid, cfg), p.meta["text_boxes"], p.image.size)
                for p, e in zip(pages, encoded)]
    return pages, batch, coverage


@torch.inference_mode()
def method_order_scores(method: str, selector: LearnedSelector, pages, batch, coverage) -> torch.Tensor:
    tokens, mask = batch.tokens, batch.mask
    if method == "oracle":
        scores = torch.full(mask.shape, float("-inf"))
        for row, (page, cov) in enumerate(zip(pages, coverage)):
            scores[row, : len(cov)] = torch.from_numpy(oracle_scores(cov, page.key))
        return scores
    if method == "random":
        return RandomSelector(0).scores(tokens, mask, keys=[p.key for p in pages])
    if method == "learned_oneshot":
        return selector.keep_probability(tokens, mask)
    ranks = selector.picking_order(tokens, mask) if method == "learned" else diversity_ranks(tokens, mask)
    return (1 - ranks.double() / mask.sum(1, keepdim=True)).float().masked_fill(~mask, float("-inf"))


def run(checkpoint_path: str, n_train: int, n_test: int, steps: int, seed: int = 0) -> dict[str, Any]:
    cfg = load_config(EncoderConfig, str(CONF_DIR / "encoder" / "tiny.yaml"))
    encoder = VisionEncoder.from_config(cfg)
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint.check_encoder(encoder.fingerprint())
    selector = LearnedSelector(checkpoint, "cpu")
    train_pages, train_batch, _ = encode_pages(encoder, cfg, 0, n_train, seed)
    test_pages, test_batch, coverage = encode_pages(encoder, cfg, n_train, n_test, seed)
    labels = torch.tensor([p.meta["code"] for p in train_pages])
    probe = train_probe(train_batch.tokens, train_batch.mask, labels, 4, steps=steps, batch_size=64, lr=3e-3)
    test_labels = torch.tensor([p.meta["code"] for p in test_pages])

    def accuracy(mask: torch.Tensor) -> dict[str, float]:
        correct = int((probe_predict(probe, test_batch.tokens, mask) == test_labels).sum())
        low, high = wilson(correct, n_test)
        return {"accuracy": correct / n_test, "ci95": [low, high]}

    result: dict[str, Any] = {
        "train_images": n_train, "test_images": n_test, "probe_steps": steps,
        "train_accuracy": float((probe_predict(probe, train_batch.tokens, train_batch.mask) == labels).float().mean()),
        "class_counts_train": torch.bincount(labels, minlength=4).tolist(),
        "text_patch_share": float(sum(float((c > 0).mean()) for c in coverage) / n_test),
        "all_tokens": accuracy(test_batch.mask), "methods": {},
    }
    for method in METHODS:
        scores = method_order_scores(method, selector, test_pages, test_batch, coverage)
        for ratio in RATIOS:
            keep = select_tokens(scores, test_batch.mask, SelectorConfig(mode="ratio", ratio=ratio, min_tokens=1))
            # Whether the code tag's patch survived: what the probe's answer hinges on.
            tag_kept = sum(bool(keep[row, int(c.argmax())]) for row, c in enumerate(coverage_tag(test_pages, coverage)))
            result["methods"].setdefault(method, {})[str(ratio)] = {**accuracy(keep), "tag_kept": tag_kept / n_test}
    full = result["all_tokens"]["accuracy"]
    random30, oracle30 = result["methods"]["random"]["0.3"]["accuracy"], result["methods"]["oracle"]["0.3"]["accuracy"]
    result["discriminates"] = bool(full - random30 >= 0.10 and full - oracle30 <= 0.02)
    result["learned_30_within_3_points"] = bool(full - result["methods"]["learned"]["0.3"]["accuracy"] <= 0.03)
    return result


def coverage_tag(pages, coverage):
    """Per page, a vector that peaks at the tag's token (its cell on the 14 × 14 grid)."""
    out = []
    for page, cov in zip(pages, coverage):
        row, col = page.meta["code_cell"]
        side = int(round(math.sqrt(len(cov))))
        vector = torch.zeros(len(cov))
        vector[row * side + col] = 1.0
        out.append(vector)
    return out


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_ratio in result["methods"].items():
        ratios = [float(r) for r in by_ratio]
        acc = [by_ratio[r]["accuracy"] for r in by_ratio]
        low = [by_ratio[r]["accuracy"] - by_ratio[r]["ci95"][0] for r in by_ratio]
        high = [by_ratio[r]["ci95"][1] - by_ratio[r]["accuracy"] for r in by_ratio]
        ax.errorbar(ratios, acc, yerr=[low, high], marker="o", capsize=3, label=method)
    ax.axhline(result["all_tokens"]["accuracy"], color="grey", linestyle="--", label="all tokens")
    ax.set_ylim(0, 1)
    ax.set_xlabel("keep ratio")
    ax.set_ylabel("code-probe accuracy (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_study")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.checkpoint, args.train, args.test, args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
