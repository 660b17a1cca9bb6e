"""The benchmarks run at toy sizes, emit their JSON keys, and keep their page sections apart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import all as bench_all
from bench import common, pipeline, scaling, selector_overhead, selector_training, storage
from pipeline.config import SelectorModelConfig


@pytest.fixture(autouse=True)
def bench_out(tmp_path, monkeypatch):
    monkeypatch.setenv("ATR_BENCH_OUT", str(tmp_path / "bench"))
    return tmp_path / "bench"


def stored(bench_out, name: str) -> dict:
    return json.loads((bench_out / "results" / f"{name}.json").read_text())


def test_page_sections_are_replaced_in_place_and_others_kept(bench_out):
    info = common.machine()
    common.update_doc("a", common.section_text("a", "A", "first", info, "cmd a"))
    common.update_doc("b", common.section_text("b", "B", "bee", info, "cmd b"))
    common.update_doc("a", common.section_text("a", "A", "second", info, "cmd a"))
    common.update_doc("b", common.section_text("b", "B", "ignored", info, "cmd b"), replace=False)
    text = (bench_out / "benchmarks.md").read_text()
    assert "second" in text and "first" not in text and "bee" in text and "ignored" not in text
    assert text.index("## A") < text.index("## B") and text.count("<!-- bench:a -->") == 1
    assert common.today() in text and "cmd a" in text


def test_sampler_sees_a_child_process_peak_memory():
    common.import_psutil()  # imported ahead: through Ray's vendored copy that takes seconds
    allocate = "import time; block = bytearray(200 * 1024 * 1024); block[::4096] = b'x' * len(block[::4096]); time.sleep(1)"
    child = subprocess.Popen([sys.executable, "-c", allocate])
    with common.ProcessTreeSampler(child.pid, interval_s=0.05) as sampler:
        child.wait()
    assert sampler.peak_by_role()["driver"] >= 200 * 1024 * 1024


def test_selector_overhead_counts_vitl_flops_including_attention(bench_out):
    result = selector_overhead.run(rounds=0, time_vitl=False)
    vitl = result["settings"]["vit-l-14-336"]
    # 23 of 24 layers run (select_layer=-2): linear 12·L·D² plus attention 2·L²·D multiply-adds per layer.
    tokens, dim = 577, 1024
    expected_gflops = 2 * 23 * (12 * tokens * dim**2 + 2 * tokens**2 * dim) / 1e9
    assert vitl["encoder_gflops"] == pytest.approx(expected_gflops, rel=0.03)
    assert 0 < result["selector_flops_ratio_vitl336"] < result["selector_flops_ratio_vitl336_anyres"]
    # The set-aware default (selector + reconstructor rounds) stays within 3% of the plain ViT-L/14-336 encoder.
    assert result["selector_flops_ratio_vitl336"] < result["set_aware_flops_ratio_vitl336"] <= selector_overhead.TARGET
    assert stored(bench_out, "selector_overhead")["selector_width"] == SelectorModelConfig().width


def test_storage_bench_pruned_bytes_follow_the_kept_fraction(bench_out):
    result = storage.run(images=16, encoder="tiny", ratios=[0.5])
    assert result["pruned"]["0.5"]["kept_fraction"] == 0.5
    assert 0.95 < result["storage_vs_kept"] < 1.1
    assert "storage_vs_kept" in stored(bench_out, "storage")
    assert "Storage (bench.storage)" in (bench_out / "benchmarks.md").read_text()


def test_pipeline_bench_compares_the_local_run_with_the_bare_encoder(bench_out):
    result = pipeline.run({"tiny": 32}, ["local"], rounds=1)
    local = result["encoders"]["tiny"]["executors"]["local"]
    assert result["encoders"]["tiny"]["images"] == 32 and result["selector"] == "learned"
    # At toy size the steady rate (a difference of two runs) is noise and may even be negative; the
    # end-to-end rate is a plain quotient.
    assert local["end_to_end_images_per_s"] > 0 and "steady_images_per_s" in local
    assert result["pipeline_vs_encoder"] == local["steady_vs_encoder"]
    assert "pipeline_vs_encoder" in stored(bench_out, "pipeline")


def test_scaling_bench_samples_the_ray_workers_of_a_job_process(bench_out):
    result = scaling.run(images=4, encoder="tiny", actor_counts=[1])
    small, large = result["cases"]["1"]["1x"], result["cases"]["1"]["4x"]
    assert (small["images"], large["images"]) == (4, 16)
    for run in (small, large):
        assert 0 < run["driver_peak_rss_mib"] < run["tree_peak_rss_mib"] and run["worker_peak_rss_mib"] > 0
    assert result["rss_4x_vs_1x"] == max(result["rss_4x_vs_1x_by_role"]["driver"],
                                         result["rss_4x_vs_1x_by_role"]["worker"])
    assert "rss_4x_vs_1x" in stored(bench_out, "scaling")


def test_summary_has_every_headline_and_judges_its_target():
    results = {
        "pipeline": {"pipeline_vs_encoder": 0.85, "seconds": 1},
        "selector_overhead": {"selector_flops_ratio_vitl336": 0.011, "seconds": 1},
        "storage": {"storage_vs_kept": 1.07, "seconds": 1},
        "loader": {"loader_vs_pyarrow": 0.5, "seconds": 1},
        "scaling": {"rss_4x_vs_1x": 1.02, "seconds": 1},
    }
    summary = bench_all.summarise(results)
    assert summary["targets_met"] == {"pipeline_vs_encoder": True, "selector_flops_ratio_vitl336": True,
                                      "storage_vs_kept": False, "loader_vs_pyarrow": False, "rss_4x_vs_1x": True}
    assert set(bench_all.HEADLINES) <= set(summary)


def test_selector_training_bench_trains_an_epoch_from_each_source(tmp_path, one_thread):
    corpus = common.synthetic_corpus(tmp_path / "corpus", 8, shard_size=4)
    features = selector_training.full_tokens(corpus, tmp_path / "features", "tiny")
    for source, path in (("images", str(corpus)), ("features", features), ("cached", str(corpus))):
        case = selector_training.child(source, path, "tiny", 8)
        assert (case["steps"], case["token_sets"]) == (1, 8), source
        assert case["peak_rss_mib"] >= case["baseline_rss_mib"] > 0 and case["token_sets_per_s"] > 0


def test_peers_bench_reads_each_sample_once_per_reader_and_rates_int8_storage(bench_out, tmp_path, one_thread):
    import argparse

    from bench import peers
    from pipeline.loader import PrunedTokenDataset

    root = tmp_path / "corpus"
    corpus = peers.write_corpus(root, samples=24, kept=(4, 9), dim=1024, shards=3)
    readers = ["atr", "atr_int8", "webdataset", "pyarrow_read_table"]  # the peers installed without the bench extra
    corpus["bytes"] = peers.copy_formats(root, readers)
    assert corpus["bytes"]["parquet_int8"] < corpus["bytes"]["parquet"]
    window = PrunedTokenDataset(str(root / "atr" / "tiny" / "bench")).shuffle_buffer
    runs = {(reader, dtype, 0): [peers.run_one(root, reader, dtype, 0, window)]
            for reader in readers for dtype in ("float32", "float16")}
    summary = peers.summarise(runs, corpus, window, [0.5], common.machine(), argparse.Namespace(rounds=1))
    assert summary["ratios"]["float16_w0"]["best_peer"] == "webdataset"
    assert summary["ratios"]["int8_vs_float16_tokens_per_s_float16_w0"]["atr_vs_best_peer"] > 0
    peers.write_section(summary)
    page = (bench_out / "benchmarks.md").read_text()
    assert "int8 + scales" in page and "int8_vs_float16_tokens_per_s_float16_w0" in page
