"""The evaluation loop: every method at every keep ratio (and the learned selector's thresholds) on held-out
images whose json holds ground truth, scored by text-patch recall, reconstruction error and a frozen probe.

Held-out images stream through in batches: each batch is encoded once, each method scores it once, and every
keep ratio is a cut of those scores. Only per-image numbers are kept, so memory does not grow with the set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, JobError, SelectorConfig
from pipeline.encoders import VisionEncoder, token_boxes
from pipeline.evaluation import metrics
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.oracle import oracle_scores
from pipeline.evaluation.plots import (
    plot_kept_histogram,
    plot_metrics_vs_ratio,
    plot_overlay,
)
from pipeline.evaluation.probe import (
    PROBE_TASKS,
    AttentionPoolProbe,
    probe_label,
    probe_predict,
    train_probe,
)
from pipeline.evaluation.report import ROW_METRICS, evaluation_markdown, write_report
from pipeline.evaluation.samples import (
    EncodedBatch,
    LabelledImage,
    batched,
    encode_batch,
    iter_labelled_images,
    pad_encoded,
)
from pipeline.selector import build_selector, load_checkpoint, select_tokens
from pipeline.selector.learned import LearnedSelector
from pipeline.selector.loss import image_spread, reconstruction_error
from pipeline.selector.model import SelectorAutoencoder

log = logging.getLogger(__name__)

HEADLINE_RATIOS = (0.3, 0.5)


@dataclass(frozen=True)
class Setting:
    """One way of cutting a method's scores into a keep-mask."""

    method: str
    mode: str  # "ratio", "threshold" or "error"
    keep_ratio: float | None = None
    threshold: float | None = None
    max_error: float | None = None


def settings_for(method: str, cfg: EvaluateConfig) -> list[Setting]:
    if method == "none":
        return [Setting("none", "ratio", keep_ratio=1.0)]
    settings = [Setting(method, "ratio", keep_ratio=r) for r in cfg.keep_ratios]
    if method in LEARNED_METHODS:
        settings += [Setting(method, "threshold", threshold=t) for t in cfg.thresholds]
        settings += [Setting(method, "error", max_error=e) for e in cfg.max_errors]
    return settings


LEARNED_METHODS = ("learned", "learned_oneshot")


def keep_mask(setting: Setting, scores: torch.Tensor, mask: torch.Tensor, min_tokens: int,
              selector: Any = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The setting's keep-mask: a cut of ``scores`` in ratio mode (and for the baselines); the learned
    selector's own ``select`` in threshold and error modes, which needs the ``tokens``."""
    if setting.method == "none":
        return mask.clone()
    policy = SelectorConfig(
        mode=setting.mode, ratio=setting.keep_ratio or 1.0, threshold=setting.threshold or 0.0,
        max_error=setting.max_error or 0.3, min_tokens=min_tokens,
    )
    if setting.mode != "ratio" and isinstance(selector, LearnedSelector):
        assert tokens is not None
        return selector.select(tokens, mask, policy, keys=[])[1]
    return select_tokens(scores, mask, policy)


# --------------------------------------------------------------------------------------------- probe


def fit_probe(cfg: EvaluateConfig, encoder: VisionEncoder, device: torch.device) -> tuple[AttentionPoolProbe, dict[str, Any]]:
    """Train the probe on full token sets of the training split."""
    started = time.monotonic()
    num_classes = PROBE_TASKS[cfg.probe.task][0]
    images = iter_labelled_images(
        cfg.probe.train_input, cfg.decode, cfg.storage.storage_options(), cfg.probe.max_train_images
    )
    encoded, labels = [], []
    for chunk in batched(images, cfg.encoder.batch_size):
        encoded += encoder.encode_images([item.image for item in chunk])
        labels += [probe_label(item.meta, cfg.probe.task) for item in chunk]
    if not labels:
        raise JobError(f"probe.train_input.path: no labelled images in {cfg.probe.train_input.path}")
    train_set = pad_encoded(encoded)
    tokens, mask, targets = train_set.tokens, train_set.mask, torch.tensor(labels)
    probe = train_probe(
        tokens, mask, targets, num_classes, steps=cfg.probe.steps, batch_size=cfg.probe.batch_size, lr=cfg.probe.lr,
        width=cfg.probe.width, heads=cfg.probe.heads, seed=cfg.probe.seed,
    )
    train_accuracy = float((probe_predict(probe, tokens, mask) == targets).float().mean())
    info = {
        "task": cfg.probe.task,
        "train_images": len(labels),
        "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
        "train_accuracy": train_accuracy,
        "seconds": round(time.monotonic() - started, 1),
    }
    log.info(f"[evaluate] probe '{cfg.probe.task}' trained on {len(labels)} images: train accuracy {train_accuracy:.3f}")
    return probe.to(device), info


# --------------------------------------------------------------------------------------------- per batch


@dataclass
class GroundTruth:
    is_text: list[np.ndarray]  # per image, [n_tokens] bool
    boxes: list[np.ndarray]  # per image, [n_tokens, 4] token regions in original pixels
    coverage: list[np.ndarray]  # per image, [n_tokens] text fraction of each region


def ground_truth(images: list[LabelledImage], batch: EncodedBatch, cfg: EvaluateConfig) -> GroundTruth:
    truth = GroundTruth([], [], [])
    for item, encoded in zip(images, batch.encoded):
        boxes = token_boxes(item.image.size, encoded.grid, cfg.encoder)
        coverage = metrics.token_text_coverage(boxes, item.meta.get("text_boxes") or [], item.image.size)
        truth.boxes.append(boxes)
        truth.coverage.append(coverage)
        truth.is_text.append(metrics.text_patch_mask(coverage, cfg.text_patch_min_coverage))
    return truth


def method_scores(method: str, selectors: dict[str, Any], images: list[LabelledImage], batch: EncodedBatch,
                  truth: GroundTruth, device: torch.device) -> torch.Tensor:
    keys = [item.key for item in images]
    mask = batch.mask.to(device)
    if method == "oracle":
        scores = torch.full(batch.mask.shape, float("-inf"))
        for row, (key, coverage) in enumerate(zip(keys, truth.coverage)):
            scores[row, : len(coverage)] = torch.from_numpy(oracle_scores(coverage, key))
        return scores.to(device)
    cls_attention = batch.cls_attention.to(device) if batch.cls_attention is not None else None
    return selectors[method].scores(batch.tokens.to(device), mask, keys=keys, cls_attention=cls_attention)


@torch.inference_mode()
def image_records(keep: torch.Tensor, images: list[LabelledImage], batch: EncodedBatch, truth: GroundTruth,
                  autoencoder: SelectorAutoencoder, probe: AttentionPoolProbe, labels: torch.Tensor) -> list[dict[str, Any]]:
    tokens, mask = batch.tokens.to(keep.device), batch.mask.to(keep.device)
    recon = reconstruction_error(autoencoder.reconstruct(tokens, mask, keep), tokens, mask).cpu()
    spread = image_spread(tokens, mask).clamp(min=1e-12).cpu()
    correct = (probe_predict(probe, tokens, keep).cpu() == labels).tolist()
    keep = keep.cpu().numpy()
    records = []
    for row, item in enumerate(images):
        is_text = truth.is_text[row]
        kept = keep[row, : len(is_text)]
        records.append({
            "key": item.key,
            "family": item.family,
            "n_tokens": len(is_text),
            "n_kept": int(kept.sum()),
            "text_share": metrics.text_coverage(is_text),
            "text_patch_recall": metrics.text_patch_recall(kept, is_text),
            "nontext_patch_recall": metrics.nontext_patch_recall(kept, is_text),
            "recon_error": float(recon[row]),
            "relative_error": float(recon[row] / spread[row]),
            "correct": bool(correct[row]),
        })
    return records


# --------------------------------------------------------------------------------------------- aggregation


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def setting_row(setting: Setting, records: list[dict[str, Any]], family: str) -> dict[str, Any]:
    """One report row; recalls average over the images that have such patches (NaN-free per-image means)."""
    chosen = [r for r in records if family == "all" or r["family"] == family]
    return {
        "family": family,
        "method": setting.method,
        "mode": setting.mode,
        "keep_ratio": setting.keep_ratio,
        "threshold": setting.threshold,
        "max_error": setting.max_error,
        "text_patch_recall": _mean([r["text_patch_recall"] for r in chosen]),
        "nontext_patch_recall": _mean([r["nontext_patch_recall"] for r in chosen]),
        "recon_error": _mean([r["recon_error"] for r in chosen]),
        "relative_error": _mean([r["relative_error"] for r in chosen]),
        "within_max_error": (_mean([float(r["relative_error"] <= setting.max_error + 1e-6) for r in chosen])
                             if setting.max_error is not None else None),
        "probe_accuracy": _mean([float(r["correct"]) for r in chosen]),
        "mean_kept": _mean([float(r["n_kept"]) for r in chosen]),
        "kept_fraction": _mean([r["n_kept"] / r["n_tokens"] for r in chosen]),
        "n_images": len(chosen),
    }


def adaptive_summary(setting: Setting, records: list[dict[str, Any]], families: list[str]) -> dict[str, Any]:
    """Threshold mode: tokens kept per image per family, and whether pages with more text keep more."""
    kept = {f: [r["n_kept"] for r in records if r["family"] == f] for f in families}
    documents = [r for r in records if r["family"] == "document"]

    def correlation(chosen: list[dict[str, Any]]) -> float:
        return metrics.spearman([r["n_kept"] / r["n_tokens"] for r in chosen], [r["text_share"] for r in chosen])

    return {
        "method": setting.method,
        "mode": setting.mode,
        "threshold": setting.threshold,
        "max_error": setting.max_error,
        "kept_per_image": kept,
        "mean_kept": {f: _mean([float(k) for k in counts]) for f, counts in kept.items()},
        "spearman_kept_fraction_vs_text_share": {"all": correlation(records), "document": correlation(documents)},
    }


def image_table(records: dict[Setting, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per image: its share of text patches (which caps the recall any ratio below it can reach) and the tokens
    the learned selector keeps in each threshold setting."""
    per_image = next(iter(records.values()))
    table = [{"key": r["key"], "family": r["family"], "n_tokens": r["n_tokens"], "text_patch_share": r["text_share"]}
             for r in per_image]
    for setting, recs in records.items():
        if setting.mode in ("threshold", "error"):
            name = (f"threshold_{setting.threshold:g}" if setting.mode == "threshold"
                    else f"max_error_{setting.max_error:g}")
            name = f"kept_{name}" if setting.method == "learned" else f"kept_{setting.method}_{name}"
            for entry, record in zip(table, recs):
                entry[name] = record["n_kept"]
    return table


def headline(rows: list[dict[str, Any]], ratios: list[float]) -> dict[str, Any]:
    """The numbers a reader looks for first, at keep ratios 0.3 and 0.5 (where evaluated)."""

    def value(family: str, method: str, ratio: float, key: str) -> float | None:
        for row in rows:
            if (row["family"], row["method"], row["mode"], row["keep_ratio"]) == (family, method, "ratio", ratio):
                return row[key]
        return None

    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    result: dict[str, Any] = {"probe_accuracy_full": value("all", "none", 1.0, "probe_accuracy")}
    for ratio in [r for r in HEADLINE_RATIOS if r in ratios]:
        entry = {
            "document_text_patch_recall": {m: value("document", m, ratio, "text_patch_recall") for m in methods},
            "document_recon_error": {m: value("document", m, ratio, "recon_error") for m in methods},
            "recon_error": {m: value("all", m, ratio, "recon_error") for m in methods},
            "probe_accuracy": {m: value("all", m, ratio, "probe_accuracy") for m in methods},
        }
        learned, oracle = entry["document_text_patch_recall"].get("learned"), entry["document_text_patch_recall"].get("oracle")
        if learned is not None and oracle:
            entry["learned_over_oracle_recall"] = learned / oracle
        # Which method wins each figure (the oracle aside, it reads the ground truth): a baseline may.
        for key in ("document_text_patch_recall", "document_recon_error", "recon_error"):
            candidates = {m: v for m, v in entry[key].items() if m != "oracle" and v is not None and not math.isnan(v)}
            if candidates:
                pick = max if key.endswith("recall") else min
                entry.setdefault("best", {})[key] = pick(candidates, key=candidates.get)
        result[f"ratio_{ratio}"] = entry
    return result


# --------------------------------------------------------------------------------------------- overlays


@dataclass
class OverlayCase:
    item: LabelledImage
    boxes: np.ndarray
    panels: list[tuple[str, np.ndarray]]


def overlay_panels(cfg: EvaluateConfig, scores: dict[str, torch.Tensor], row: int, batch: EncodedBatch,
                   selectors: dict[str, Any] | None = None) -> list[tuple[str, np.ndarray]]:
    """random at r | learned at r | learned in threshold mode, for the methods that were evaluated."""
    selectors = selectors or {}
    mask = batch.mask[row : row + 1].to(next(iter(scores.values())).device)
    wanted = [
        ("random", Setting("random", "ratio", keep_ratio=cfg.overlay_ratio), f"random r={cfg.overlay_ratio:g}"),
        ("learned", Setting("learned", "ratio", keep_ratio=cfg.overlay_ratio), f"selector r={cfg.overlay_ratio:g}"),
    ]
    if cfg.thresholds:
        wanted.append(("learned", Setting("learned", "threshold", threshold=cfg.thresholds[0]), f"selector τ={cfg.thresholds[0]:g}"))
    n = int(batch.mask[row].sum())
    tokens = batch.tokens[row : row + 1].to(mask.device)
    return [
        (label, keep_mask(setting, scores[method][row : row + 1], mask, cfg.selector.min_tokens, selectors.get(method),
                          tokens)[0, :n].cpu().numpy())
        for method, setting, label in wanted
        if method in scores
    ]


def overlay_wanted(cfg: EvaluateConfig, chosen: list[OverlayCase], family: str) -> bool:
    """Documents fill the overlays, but one natural scene is shown too when there is room for two."""
    natural_slots = 1 if cfg.overlays > 1 else 0
    documents = sum(case.item.family == "document" for case in chosen)
    if family == "document":
        return documents < cfg.overlays - natural_slots
    return len(chosen) - documents < natural_slots


def grid_tile_tokens(batch: EncodedBatch, row: int) -> slice:
    """Anyres: the base tile's tokens cover the whole image coarsely; overlays draw the grid tiles only."""
    encoded = batch.encoded[row]
    return slice(encoded.side * encoded.side if encoded.grid != (0, 0) else 0, encoded.tokens.shape[0])


# --------------------------------------------------------------------------------------------- the job


def evaluate_heldout(cfg: EvaluateConfig, encoder: VisionEncoder, selectors: dict[str, Any], autoencoder: SelectorAutoencoder,
                     probe: AttentionPoolProbe, device: torch.device) -> tuple[dict[Setting, list[dict[str, Any]]], list[OverlayCase]]:
    """Per-image records of every setting, and the overlay cases, batch by batch over the held-out images."""
    started = time.monotonic()
    records: dict[Setting, list[dict[str, Any]]] = defaultdict(list)
    overlays: list[OverlayCase] = []
    n_images = 0
    heldout = iter_labelled_images(cfg.input, cfg.decode, cfg.storage.storage_options(), cfg.max_images)
    for images in batched(heldout, cfg.batch_size):
        batch = encode_batch(encoder, images, with_cls_attention="cls_attention" in cfg.methods)
        truth = ground_truth(images, batch, cfg)
        labels = torch.tensor([probe_label(item.meta, cfg.probe.task) for item in images])
        mask = batch.mask.to(device)
        scores = {}
        scored: dict[bytes, list[dict[str, Any]]] = {}  # settings that keep the same tokens (all at 1.0) score once
        for method in cfg.methods:
            scores[method] = method_scores(method, selectors, images, batch, truth, device)
            for setting in settings_for(method, cfg):
                keep = keep_mask(setting, scores[method], mask, cfg.selector.min_tokens, selectors.get(method),
                                 batch.tokens.to(device))
                digest = keep.cpu().numpy().tobytes()
                if digest not in scored:
                    scored[digest] = image_records(keep, images, batch, truth, autoencoder, probe, labels)
                records[setting] += scored[digest]
        for row, item in enumerate(images):
            if len(overlays) < cfg.overlays and overlay_wanted(cfg, overlays, item.family):
                tiles = grid_tile_tokens(batch, row)
                panels = [(label, keep[tiles]) for label, keep in overlay_panels(cfg, scores, row, batch, selectors)]
                overlays.append(OverlayCase(item, truth.boxes[row][tiles], panels))
        n_images += len(images)
        log.info(f"[evaluate] {n_images} held-out images evaluated ({time.monotonic() - started:.0f}s)")
    if not n_images:
        raise JobError(f"input.path: no labelled images in {cfg.input.path} (each sample needs a json with 'family')")
    return records, overlays


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    # The trained reconstructor scores every method, so the checkpoint is needed even without method learned.
    if not cfg.selector.checkpoint:
        raise ConfigError("selector.checkpoint: the evaluation needs a trained selector; train one with "
                          "python -m jobs.train_selector and pass selector.checkpoint=PATH")
    started = time.monotonic()
    encoder = VisionEncoder.from_config(cfg.encoder)
    device = torch.device(encoder.device)
    fingerprint = encoder.fingerprint()
    checkpoint = load_checkpoint(cfg.selector.checkpoint, cfg.storage.storage_options())
    checkpoint.check_encoder(fingerprint)
    autoencoder = checkpoint.model.to(device).eval()
    selectors: dict[str, Any] = {}
    for method in cfg.methods:
        if method in LEARNED_METHODS:
            selectors[method] = LearnedSelector(checkpoint, device, strategy="rounds" if method == "learned" else "oneshot")
        elif method != "oracle":
            selectors[method] = build_selector(dataclasses.replace(cfg.selector, method=method), fingerprint, device, side=encoder.side)
    probe, probe_info = fit_probe(cfg, encoder, device)
    records, overlays = evaluate_heldout(cfg, encoder, selectors, autoencoder, probe, device)

    per_image = next(iter(records.values()))  # what does not depend on the method: family, token count, text
    families = sorted({r["family"] for r in per_image})
    rows = [setting_row(s, recs, f) for s, recs in records.items() for f in [*families, "all"]]
    adaptive = [adaptive_summary(s, recs, families) for s, recs in records.items() if s.mode in ("threshold", "error")]
    plots = write_plots(cfg, rows, adaptive, overlays, families, n_tokens=max(r["n_tokens"] for r in per_image))
    images = image_table(records)
    summary = {
        "images": {f: sum(r["family"] == f for r in per_image) for f in families},
        "document_text_patch_share": _mean([r["text_share"] for r in per_image if r["family"] == "document"]),
        "probe": probe_info,
        **headline(rows, cfg.keep_ratios),
        "adaptive": [{k: v for k, v in a.items() if k != "kept_per_image"} for a in adaptive],
        "selector_checkpoint": checkpoint.path,
        "seconds": round(time.monotonic() - started, 1),
    }
    markdown = evaluation_markdown(rows, summary, [Path(p).relative_to(cfg.output).as_posix() for p in plots])
    paths = write_report(cfg.output, rows, summary, markdown, adaptive=adaptive, images=images, config=dataclasses.asdict(cfg))
    return {"report": paths["md"], "report_json": paths["json"], "plots": plots, **summary}


def write_plots(cfg: EvaluateConfig, rows: list[dict[str, Any]], adaptive: list[dict[str, Any]],
                overlays: list[OverlayCase], families: list[str], n_tokens: int) -> list[str]:
    directory = Path(cfg.output) / "plots"
    paths = [
        plot_metrics_vs_ratio([r for r in rows if r["family"] == f], ROW_METRICS[:4], directory / f"metrics_{f}.png", f"{f} images")
        for f in families
    ]
    for entry in adaptive:
        setting = (f"threshold_{entry['threshold']:g}" if entry["mode"] == "threshold" else f"max_error_{entry['max_error']:g}")
        paths.append(plot_kept_histogram(
            entry["kept_per_image"], n_tokens,
            directory / ("kept_counts_" + ("" if entry["method"] == "learned" else f"{entry['method']}_") + f"{setting}.png"),
            f"tokens kept per image, {entry['method']}, {setting.replace('_', ' ')}",
        ))
    for index, case in enumerate(overlays):
        paths.append(plot_overlay(
            case.item.image, case.boxes, case.panels, case.item.meta.get("text_boxes") or [],
            directory / f"overlay_{index:02d}_{case.item.family}.png", title=case.item.key,
        ))
    return [str(p) for p in paths]
