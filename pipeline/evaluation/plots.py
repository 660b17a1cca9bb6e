"""PNG figures: metric vs keep ratio per method, kept-count histograms, kept-patch overlays.

Figures are built on ``matplotlib.figure.Figure`` and saved through its Agg canvas, so nothing touches pyplot's
global state or needs a display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

Row = dict[str, Any]
DIM = 0.2  # brightness of dropped regions in overlays


def _present(value: Any) -> bool:
    return value is not None and np.isfinite(value)


def plot_metrics_vs_ratio(rows: Sequence[Row], metrics: Sequence[tuple[str, str]], path: str | Path, title: str) -> Path:
    """One panel per metric that has values: a line per method over keep ratios (ratio mode), the full-token
    baseline (``none``) as a dashed line, threshold-mode points at their realised kept fraction."""
    metrics = [(key, label) for key, label in metrics if any(_present(r.get(key)) for r in rows)]
    figure = Figure(figsize=(4.2 * max(len(metrics), 1), 3.6), layout="constrained")
    axes = figure.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["mode"] == "ratio"))
    for axis, (key, label) in zip(axes, metrics):
        for method in methods:
            points = sorted((r["keep_ratio"], r[key]) for r in rows if r["method"] == method and r["mode"] == "ratio" and _present(r.get(key)))
            if method == "none":
                for _, value in points:
                    axis.axhline(value, color="grey", linestyle="--", label="none (all tokens)")
            elif points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=method)
        adaptive = [(r["kept_fraction"], r[key]) for r in rows if r["mode"] in ("threshold", "error") and _present(r.get(key))]
        if adaptive:
            axis.scatter(*zip(*adaptive), marker="*", s=120, color="black", zorder=5, label="learned (threshold / error)")
        if key in ("probe_accuracy", "text_patch_recall", "nontext_patch_recall"):
            # A fraction: a zoomed axis would make a one-image difference look like a collapse.
            axis.set_ylim(0, 1.02)
        axis.set_xlabel("kept fraction of tokens")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    if metrics:
        axes[0].legend(fontsize=7)
    figure.suptitle(title)
    return _save(figure, path)


def plot_kept_histogram(kept_counts: Mapping[str, Sequence[int]], n_tokens: int, path: str | Path, title: str) -> Path:
    """Histogram of tokens kept per image, one colour per family."""
    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axis = figure.subplots()
    bins = np.linspace(0, n_tokens, 21)
    for family, counts in kept_counts.items():
        axis.hist(counts, bins=bins, alpha=0.6, label=f"{family} (n={len(counts)})")
    axis.set_xlabel(f"tokens kept per image (of {n_tokens})")
    axis.set_ylabel("images")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return _save(figure, path)


def kept_region_image(image: Image.Image, token_boxes: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The image with every region outside the kept tokens' boxes dimmed, as an ``[H, W, 3]`` uint8 array."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    lit = np.zeros(pixels.shape[:2], dtype=bool)
    height, width = lit.shape
    for x0, y0, x1, y1 in np.asarray(token_boxes)[np.asarray(keep, dtype=bool)]:
        lit[max(int(round(y0)), 0) : min(int(round(y1)), height), max(int(round(x0)), 0) : min(int(round(x1)), width)] = True
    return np.where(lit[..., None], pixels, pixels * DIM).astype(np.uint8)


def plot_overlay(
    image: Image.Image,
    token_boxes: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray]],
    text_boxes: Sequence[Sequence[float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """``original | panel | panel ...``: the original with its text boxes outlined, then each keep-mask as the
    image lit only where the kept tokens are."""
    figure = Figure(figsize=(3.4 * (1 + len(panels)), 3.8), layout="constrained")
    axes = figure.subplots(1, 1 + len(panels), squeeze=False)[0]
    axes[0].imshow(image)
    for x0, y0, x1, y1 in text_boxes:
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=0.6))
    axes[0].set_title("original (text boxes)", fontsize=9)
    for axis, (label, keep) in zip(axes[1:], panels):
        axis.imshow(kept_region_image(image, token_boxes, keep))
        axis.set_title(f"{label}: {int(np.sum(keep))}/{len(keep)} kept", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
