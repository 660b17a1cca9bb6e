"""Report files: ``report.json`` (rows + summary), ``report.csv`` (the rows) and ``report.md`` (tables)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them and readers choke on ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v) for v in line) + " |" for line in body]
    return "\n".join(lines)


def pivot_markdown(rows: Sequence[Row], *, row_keys: Sequence[str], column_key: str, value_key: str) -> str:
    """One line per distinct ``row_keys`` (in order of first appearance), one column per ``column_key`` value."""
    columns = sorted({row[column_key] for row in rows})
    cells: dict[tuple, dict[Any, Any]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in row_keys), {})[row[column_key]] = row.get(value_key)
    header = [*row_keys, *(format_value(c) for c in columns)]
    body = [[*label, *(values.get(c) for c in columns)] for label, values in cells.items()]
    return markdown_table(header, body)


def _columns(rows: Sequence[Row]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns)


def write_report(output_dir: str | Path, rows: Sequence[Row], summary: dict[str, Any], markdown: str, **extra: Any) -> dict[str, str]:
    """Write the three report files into ``output_dir``; returns their paths by name."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: output_dir / f"report.{name}" for name in ("json", "csv", "md")}
    payload = json_safe({"summary": summary, "rows": list(rows), **extra})
    paths["json"].write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows(json_safe(list(rows)))
    paths["md"].write_text(markdown.rstrip() + "\n")
    return {name: str(path) for name, path in paths.items()}


ROW_METRICS = [
    ("text_patch_recall", "text-patch recall"),
    ("nontext_patch_recall", "non-text patch recall"),
    ("recon_error", "reconstruction error (MSE, normalised tokens)"),
    ("probe_accuracy", "frozen-probe accuracy"),
    ("mean_kept", "tokens kept per image"),
]


def _has_values(rows: Sequence[Row], key: str) -> bool:
    return any(format_value(r.get(key)) != "–" for r in rows)


def _same_for_every_method(rows: Sequence[Row], key: str) -> bool:
    by_ratio: dict[Any, set[str]] = {}
    for row in rows:
        if row["method"] != "none":
            by_ratio.setdefault(row["keep_ratio"], set()).add(format_value(row.get(key)))
    return all(len(values) == 1 for values in by_ratio.values()) and len({r["method"] for r in rows}) > 2


def evaluation_markdown(rows: Sequence[Row], summary: dict[str, Any], plots: Sequence[str]) -> str:
    """``report.md`` of ``jobs.evaluate``: per family, a method × keep ratio table per metric, then the
    threshold-mode table and the plots."""
    probe = summary["probe"]
    lines = [
        "# Token selection: held-out evaluation",
        "",
        f"Images: {summary['images']}. Share of text patches on documents: {format_value(summary['document_text_patch_share'])}.",
        f"Frozen probe ({probe['task']}, trained on {probe['train_images']} full token sets): "
        f"accuracy with all tokens {format_value(summary['probe_accuracy_full'])}.",
        "Recall is averaged over the images that have such patches; the oracle keeps text patches first and bounds "
        "what any method can reach at a ratio below a page's text share.",
    ]
    for family in dict.fromkeys(r["family"] for r in rows):
        ratio_rows = [r for r in rows if r["family"] == family and r["mode"] == "ratio"]
        lines += ["", f"## {family} images"]
        for key, label in ROW_METRICS:
            # A table in which every method has the same value at every ratio (kept counts in ratio mode) says nothing.
            if _has_values(ratio_rows, key) and not _same_for_every_method(ratio_rows, key):
                lines += ["", f"### {label}", "", pivot_markdown(ratio_rows, row_keys=["method"], column_key="keep_ratio", value_key=key)]
        adaptive = [r for r in rows if r["family"] == family and r["mode"] == "threshold"]
        if adaptive:
            columns = ["method", "threshold", "mean_kept", "kept_fraction"] + [k for k, _ in ROW_METRICS[:4] if _has_values(adaptive, k)]
            lines += ["", "### learned selector, threshold mode (adaptive)", "",
                      markdown_table(columns, [[r[c] for c in columns] for r in adaptive])]
        bounded = [r for r in rows if r["family"] == family and r["mode"] == "error"]
        if bounded:
            columns = ["method", "max_error", "within_max_error", "relative_error", "mean_kept", "kept_fraction"] + [
                k for k, _ in ROW_METRICS[:4] if _has_values(bounded, k)]
            lines += ["", "### learned selector, error-bounded mode (adaptive)", "",
                      markdown_table(columns, [[r[c] for c in columns] for r in bounded])]
    for entry in summary.get("adaptive", []):
        correlation = entry["spearman_kept_fraction_vs_text_share"]
        setting = (f"threshold {entry['threshold']:g}" if entry.get("mode", "threshold") == "threshold"
                   else f"max_error {entry['max_error']:g}")
        lines += ["", f"{entry.get('method', 'learned')}, {setting}: mean tokens kept {json.dumps(json_safe(entry['mean_kept']))}; "
                  f"Spearman of kept fraction vs text share: all {format_value(correlation['all'])}, "
                  f"documents {format_value(correlation['document'])}."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines)
