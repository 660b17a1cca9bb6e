"""Evaluation: metrics on hand-made cases with known answers, the oracle, the frozen probe, reports, plots,
and the evaluate job end to end on a small corpus."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from pipeline.evaluation import metrics
from pipeline.evaluation.oracle import oracle_scores
from pipeline.evaluation.plots import (
    kept_region_image,
    plot_kept_histogram,
    plot_metrics_vs_ratio,
    plot_overlay,
)
from pipeline.evaluation.probe import probe_predict, train_probe
from pipeline.evaluation.report import pivot_markdown, write_report


def grid_boxes(width: int, height: int, patch: int) -> np.ndarray:
    """Token regions of a plain ``patch``-pixel grid over a ``width x height`` image, row-major."""
    return np.array(
        [[x, y, x + patch, y + patch] for y in range(0, height, patch) for x in range(0, width, patch)], dtype=float
    )


# --------------------------------------------------------------------------------------------- text patches


def test_coverage_counts_overlapping_boxes_once_and_empty_regions_as_zero():
    boxes = grid_boxes(64, 64, 16)
    text = [[0, 0, 16, 16], [0, 0, 16, 16], [24, 0, 40, 16]]  # a duplicate, and one straddling tokens 1 and 2
    coverage = metrics.token_text_coverage(np.vstack([boxes, [[70, 70, 70, 80]]]), text, (64, 64))
    assert coverage[0] == 1.0
    assert coverage[1] == pytest.approx(0.5) and coverage[2] == pytest.approx(0.5)
    assert coverage[3:16].sum() == 0.0
    assert coverage[16] == 0.0  # a padding region, clipped to nothing


def test_keeping_exactly_the_text_patches_gives_recall_one_and_nontext_recall_zero():
    boxes = grid_boxes(96, 64, 16)
    is_text = metrics.text_patch_mask(metrics.token_text_coverage(boxes, [[10, 5, 50, 20], [70, 40, 90, 60]], (96, 64)), 0.0)
    assert 0 < is_text.sum() < len(is_text)
    assert metrics.text_patch_recall(is_text, is_text) == 1.0
    assert metrics.nontext_patch_recall(is_text, is_text) == 0.0
    assert metrics.text_patch_recall(~is_text, is_text) == 0.0
    assert math.isnan(metrics.text_patch_recall(is_text, np.zeros_like(is_text)))  # nothing to recall


def test_min_coverage_separates_grazed_patches_from_covered_ones():
    coverage = metrics.token_text_coverage(grid_boxes(32, 16, 16), [[0, 0, 16, 16], [30, 0, 32, 16]], (32, 16))
    assert coverage.tolist() == pytest.approx([1.0, 2 / 16])
    assert metrics.text_patch_mask(coverage, 0.0).tolist() == [True, True]
    assert metrics.text_patch_mask(coverage, 0.25).tolist() == [True, False]


def test_random_keeps_about_r_of_text_and_nontext_patches():
    rng = np.random.default_rng(0)
    is_text = rng.random(20_000) < 0.6
    for ratio in (0.3, 0.5):
        keep = np.zeros(len(is_text), dtype=bool)
        keep[rng.permutation(len(is_text))[: int(ratio * len(is_text))]] = True
        assert metrics.text_patch_recall(keep, is_text) == pytest.approx(ratio, abs=0.02)
        assert metrics.nontext_patch_recall(keep, is_text) == pytest.approx(ratio, abs=0.02)


# --------------------------------------------------------------------------------------------- rank correlation


def test_spearman_matches_known_values_and_scipy_with_ties():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # d = rank differences (0, 0, 1, -1, 0) -> 1 - 6*2 / (5*24) = 0.9
    assert metrics.spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    x, y = [1, 2, 2, 3, 5, 5, 5], [3, 1, 4, 1, 5, 9, 2]
    assert metrics.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------------------------- answer scores


def test_vqa_accuracy_on_known_pairs():
    ten = ["two"] * 3 + ["three"] * 7
    # Official leave-one-out: 3 subsets hold 2 matches (2/3), 7 hold 3 (1) -> 0.9.
    assert metrics.vqa_accuracy("2", ten) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("three", ten) == pytest.approx(1.0)
    assert metrics.vqa_accuracy("four", ten) == 0.0
    assert metrics.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("The Cat.", ["cat"]) == 1.0
    assert metrics.vqa_accuracy("3.5", ["3.5"]) == 1.0  # a decimal point is not punctuation
    assert metrics.vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)


def test_anls_on_known_pairs():
    assert metrics.anls("hallo", ["hello"]) == pytest.approx(0.8)
    assert metrics.anls("Hello  World", ["hello world"]) == 1.0
    assert metrics.anls("abc", ["xyz"]) == 0.0
    assert metrics.anls("abcdef", ["abcxyz"]) == 0.0  # NL = 0.5 reaches the threshold
    assert metrics.anls("invoice", ["bill", "invoices"]) == pytest.approx(1 - 1 / 8)


def test_relaxed_accuracy_and_exact_match_on_known_pairs():
    assert metrics.relaxed_accuracy("10.4", ["10"]) == 1.0
    assert metrics.relaxed_accuracy("10.6", ["10"]) == 0.0
    assert metrics.relaxed_accuracy("12%", ["0.12"]) == 1.0
    assert metrics.relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert metrics.relaxed_accuracy("0", ["0"]) == 1.0 and metrics.relaxed_accuracy("0.01", ["0"]) == 0.0
    assert metrics.exact_match("Paris.", ["london", "paris"]) == 1.0
    assert metrics.exact_match("Pariss", ["paris"]) == 0.0


# --------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.9])
def test_oracle_keeps_text_patches_first(ratio):
    rng = np.random.default_rng(1)
    coverage = np.where(rng.random(400) < 0.5, rng.uniform(0.01, 1.0, 400), 0.0)
    is_text = coverage > 0
    k = math.ceil(ratio * len(coverage))
    keep = np.zeros(len(coverage), dtype=bool)
    keep[np.argsort(-oracle_scores(coverage, "key"), kind="stable")[:k]] = True
    assert metrics.text_patch_recall(keep, is_text) == pytest.approx(min(1.0, k / is_text.sum()))
    assert np.array_equal(oracle_scores(coverage, "key"), oracle_scores(coverage, "key"))


# --------------------------------------------------------------------------------------------- probe


def signature_dataset(n: int, length: int = 32, dim: int = 16, seed: int = 0):
    """Class 1 images hold 4 tokens carrying a signature direction among noise tokens; class 0 none."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, dim, generator=generator)
    labels = torch.arange(n) % 2
    signature = torch.zeros(dim)
    signature[0] = 6.0
    carriers = torch.zeros(n, length, dtype=torch.bool)
    carriers[labels == 1, :4] = True
    tokens[carriers] += signature
    return tokens, torch.ones(n, length, dtype=torch.bool), labels, carriers



def test_frozen_probe_reads_content_and_suffers_when_pruning_drops_it(one_thread):
    tokens, mask, labels, carriers = signature_dataset(256)
    probe = train_probe(tokens, mask, labels, 2, steps=150, batch_size=32, lr=3e-3, width=16, heads=2)
    test_tokens, test_mask, test_labels, test_carriers = signature_dataset(128, seed=1)
    full = (probe_predict(probe, test_tokens, test_mask) == test_labels).float().mean()
    # A pruned set keeps half the tokens; padded positions are masked out.
    kept_signature = test_mask.clone()
    kept_signature[:, 16:] = False
    drop_signature = test_mask & ~test_carriers
    drop_signature[:, 20:] = False
    on_kept = (probe_predict(probe, test_tokens, kept_signature) == test_labels).float().mean()
    on_dropped = (probe_predict(probe, test_tokens, drop_signature) == test_labels).float().mean()
    assert full > 0.95 and on_kept > 0.95
    assert on_dropped < 0.7
    assert not any(p.requires_grad for p in probe.parameters())


# --------------------------------------------------------------------------------------------- report and plots


def sample_rows():
    rows = []
    for family in ("document", "natural"):
        for method in ("learned", "random"):
            for ratio in (0.3, 0.5):
                recall = ratio if method == "random" else 0.9
                rows.append({"family": family, "method": method, "mode": "ratio", "keep_ratio": ratio, "threshold": None,
                             "text_patch_recall": recall if family == "document" else float("nan"),
                             "recon_error": 1 - ratio, "mean_kept": ratio * 196, "kept_fraction": ratio})
        rows.append({"family": family, "method": "none", "mode": "ratio", "keep_ratio": 1.0, "threshold": None,
                     "text_patch_recall": 1.0 if family == "document" else float("nan"), "recon_error": 0.0,
                     "mean_kept": 196.0, "kept_fraction": 1.0})
        rows.append({"family": family, "method": "learned", "mode": "threshold", "keep_ratio": None, "threshold": 0.5,
                     "text_patch_recall": 0.8 if family == "document" else float("nan"), "recon_error": 0.4,
                     "mean_kept": 80.0, "kept_fraction": 80 / 196})
    return rows


def test_report_files_hold_rows_summary_and_tables(tmp_path):
    rows = sample_rows()
    table = pivot_markdown([r for r in rows if r["mode"] == "ratio"], row_keys=["method"], column_key="keep_ratio",
                           value_key="recon_error")
    paths = write_report(tmp_path, rows, {"headline": 1.5}, "# Report\n\n" + table)
    report = json.loads(open(paths["json"]).read())
    assert report["summary"] == {"headline": 1.5}
    assert len(report["rows"]) == len(rows)
    assert report["rows"][6]["text_patch_recall"] is None  # NaN is written as null
    with open(paths["csv"]) as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows) and float(read[0]["recon_error"]) == pytest.approx(0.7)
    markdown = open(paths["md"]).read()
    assert "| method | 0.300 | 0.500 | 1.000 |" in markdown
    assert "| random | 0.700 | 0.500 | – |" in markdown


def test_a_table_with_the_same_value_for_every_method_is_left_out():
    from pipeline.evaluation.report import evaluation_markdown

    rows = [dict(r, method=m, recon_error=r["recon_error"] + i / 10)
            for r in sample_rows() if r["method"] == "random" for i, m in enumerate(("random", "learned", "oracle"))]
    summary = {"images": {"document": 1}, "document_text_patch_share": 0.5, "probe_accuracy_full": 1.0,
               "probe": {"task": "code", "train_images": 4}}
    markdown = evaluation_markdown(rows, summary, [])
    assert "### reconstruction error" in markdown
    assert "### tokens kept per image" not in markdown  # ratio mode: every method keeps the same count


def test_plots_are_written_as_png(tmp_path):
    rows = sample_rows()
    metric_names = [("text_patch_recall", "text recall"), ("recon_error", "reconstruction error")]
    for family in ("document", "natural"):
        family_rows = [r for r in rows if r["family"] == family]
        path = plot_metrics_vs_ratio(family_rows, metric_names, tmp_path / f"metrics_{family}.png", family)
        assert Image.open(path).format == "PNG"
    path = plot_kept_histogram({"document": [120, 130, 150], "natural": [20, 35]}, 196, tmp_path / "hist.png", "kept")
    assert Image.open(path).format == "PNG"


def test_overlay_lights_only_kept_regions(tmp_path):
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    boxes = grid_boxes(32, 32, 16)
    keep = np.array([True, False, False, True])
    lit = kept_region_image(image, boxes, keep)
    assert tuple(lit[0, 0]) == (200, 100, 50) and tuple(lit[31, 31]) == (200, 100, 50)
    assert tuple(lit[0, 31]) == (40, 20, 10)
    path = plot_overlay(image, boxes, [("random", ~keep), ("learned", keep)], [[0, 0, 10, 10]], tmp_path / "o.png")
    assert Image.open(path).format == "PNG"


# --------------------------------------------------------------------------------------------- the job


SMALL_ENCODER = dict(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def corpus_and_checkpoint(tmp_path_factory):
    from pipeline.config import CorpusConfig, EncoderConfig, SelectorModelConfig
    from pipeline.corpus import write_corpus
    from pipeline.encoders import VisionEncoder
    from pipeline.selector.checkpoint import encoder_identity, save_checkpoint
    from pipeline.selector.model import SelectorAutoencoder

    root = tmp_path_factory.mktemp("evaluate")
    write_corpus(CorpusConfig(output=str(root / "corpus"), n=32, shard_size=8, heldout_fraction=0.5, image_size=128))
    encoder_cfg = EncoderConfig(name="small", **SMALL_ENCODER)
    encoder = VisionEncoder.from_config(encoder_cfg)
    # An untrained selector: the job's plumbing does not depend on how good it is.
    model = SelectorAutoencoder(encoder.hidden_size, SelectorModelConfig(width=32, selector_layers=1, reconstructor_layers=1,
                                                                         num_heads=2, max_positions=64))
    checkpoint = save_checkpoint(str(root / "selector" / "step-00000000"), model, step=0, train={}, metrics={},
                                 encoder=encoder_identity(encoder_cfg, encoder.fingerprint(), encoder.hidden_size))
    return root, encoder_cfg, checkpoint


def test_evaluate_job_reports_every_method_and_ratio(corpus_and_checkpoint):
    from pipeline.config import InputConfig, SelectorConfig
    from pipeline.evaluation.config import EvaluateConfig, ProbeConfig
    from pipeline.evaluation.runner import evaluate

    root, encoder_cfg, checkpoint = corpus_and_checkpoint
    cfg = EvaluateConfig(
        input=InputConfig(path=str(root / "corpus" / "heldout")), output=str(root / "report"), encoder=encoder_cfg,
        selector=SelectorConfig(checkpoint=checkpoint, min_tokens=1),
        probe=ProbeConfig(train_input=InputConfig(path=str(root / "corpus" / "train")), steps=20, width=16, heads=2),
        keep_ratios=[0.3, 0.5, 1.0], thresholds=[0.5], batch_size=5, overlays=3,
    )
    summary = evaluate(cfg)
    report = json.loads((root / "report" / "report.json").read_text())
    rows = report["rows"]
    n_tokens = (64 // 16) ** 2
    by = {(r["family"], r["method"], r["mode"], r["keep_ratio"]): r for r in rows}
    ratio_methods = ["learned", "learned_oneshot", "oracle", "random", "uniform", "norm", "cls_attention", "diversity"]
    # (document, natural, all) x settings: the ratios, none, and each learned method's threshold and error settings
    assert len(rows) == 3 * (len(ratio_methods) * 3 + 1 + 2 + 2)
    for method in ratio_methods:
        for ratio in cfg.keep_ratios:
            row = by[("all", method, "ratio", ratio)]
            assert row["mean_kept"] == math.ceil(ratio * n_tokens)
            # The oracle keeps text first: no method keeps more of a page's text at the same count.
            oracle = by[("document", "oracle", "ratio", ratio)]["text_patch_recall"]
            assert by[("document", method, "ratio", ratio)]["text_patch_recall"] <= oracle + 1e-9
    full = by[("document", "none", "ratio", 1.0)]
    assert full["text_patch_recall"] == 1.0 and full["mean_kept"] == n_tokens
    assert by[("natural", "oracle", "ratio", 0.5)]["text_patch_recall"] is None  # no text to recall
    assert 0 <= by[("all", "learned", "threshold", None)]["kept_fraction"] <= 1
    bounded = [r for r in rows if r["mode"] == "error" and r["family"] == "all"]
    assert {r["method"] for r in bounded} == {"learned", "learned_oneshot"}
    assert all(r["within_max_error"] >= 0.95 for r in bounded)  # the bound holds per image by construction
    assert summary["probe_accuracy_full"] == by[("all", "none", "ratio", 1.0)]["probe_accuracy"]
    assert set(summary["ratio_0.3"]["document_text_patch_recall"]) >= set(ratio_methods)
    assert len(report["images"]) == sum(summary["images"].values())
    assert all(0 <= i["text_patch_share"] <= 1 and "kept_threshold_0.5" in i for i in report["images"])
    adaptive = report["adaptive"][0]
    assert sum(len(v) for v in adaptive["kept_per_image"].values()) == sum(summary["images"].values())
    with open(root / "report" / "report.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    markdown = (root / "report" / "report.md").read_text()
    assert "## document images" in markdown and "| oracle |" in markdown
    plots = {p.rsplit("/", 1)[-1] for p in summary["plots"]}
    assert {"metrics_document.png", "metrics_natural.png", "kept_counts_threshold_0.5.png"} <= plots
    assert sum(p.startswith("overlay_") for p in plots) == 3
    assert all(Image.open(p).format == "PNG" for p in summary["plots"])


def test_evaluate_job_rejects_bad_settings_with_exit_2(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "jobs.evaluate", "keep_ratios=[0,0.5]", "selector.checkpoint=x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "keep_ratios" in result.stderr and "Traceback" not in result.stderr
