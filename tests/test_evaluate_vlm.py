"""jobs.evaluate_vlm end to end on a tiny random LLaVA-NeXT saved to disk, and the benchmark readers."""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.config import EncoderConfig, SelectorConfig, SelectorModelConfig
from pipeline.encoders import VisionEncoder
from pipeline.evaluation.benchmark import metric_for, read_benchmark
from pipeline.evaluation.config import EvaluateVLMConfig
from pipeline.evaluation.metrics import vqa_accuracy
from pipeline.evaluation.vlm_runner import evaluate_vlm
from pipeline.selector.checkpoint import encoder_identity, save_checkpoint
from pipeline.selector.model import SelectorAutoencoder
from pipeline.vlm.config import VLMModelConfig
from pipeline.vlm.train import byte_tokenizer, tiny_vlm

# Anyres with 2x2 patches per tile: images get 1 + up to 4 tiles, so token counts differ per question.
ENCODER = EncoderConfig(name="tiny-vlm-test", image_size=32, patch_size=16, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, anyres=True, image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
QUESTIONS = [("What colour is it?", ["red"] * 10), ("How many shapes?", ["2", "two"]), ("Is it a page?", ["no"]),
             ("What is written?", ["hello"]), ("Which side?", ["left", "left side"])]


def png(size, colour) -> bytes:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).rectangle([2, 2, size[0] // 2, size[1] // 2], fill=(255 - colour[0], 40, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    tokenizer = byte_tokenizer()
    model = tiny_vlm(VLMModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
                     ENCODER.hidden_size, ENCODER.image_size // ENCODER.patch_size, len(tokenizer),
                     tokenizer.convert_tokens_to_ids("<image>"))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    encoder = VisionEncoder.from_config(ENCODER)
    autoencoder = SelectorAutoencoder(ENCODER.hidden_size, SelectorModelConfig(
        width=16, selector_layers=1, reconstructor_layers=1, num_heads=2, max_positions=64))
    checkpoint = save_checkpoint(str(root / "selector" / "step-00000000"), autoencoder, step=0,
                                 encoder=encoder_identity(ENCODER, encoder.fingerprint(), ENCODER.hidden_size),
                                 train={}, metrics={})
    sizes = [(40, 30), (30, 60), (64, 64), (50, 20), (20, 20)]
    lines = []
    for i, ((question, answers), size) in enumerate(zip(QUESTIONS, sizes)):
        (root / f"img{i}.png").write_bytes(png(size, (40 * i, 200, 100)))
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"img{i}.png", "question": question, "answers": answers}))
    (root / "textvqa_tiny.jsonl").write_text("\n".join(lines) + "\n")
    return root, checkpoint


def config(root, checkpoint, output, **overrides) -> EvaluateVLMConfig:
    values = dict(benchmark=str(root / "textvqa_tiny.jsonl"), model=str(root / "model"), local_files_only=True,
                  encoder=ENCODER, selector=SelectorConfig(checkpoint=checkpoint, min_tokens=1),
                  methods=["none", "learned", "random"], keep_ratios=[0.25, 0.5], prompt="Q: <image> {question} A:",
                  max_new_tokens=3, batch_size=3, device="cpu", output=str(root / output))
    return EvaluateVLMConfig(**{**values, **overrides})


def results_of(summary):
    with open(summary["results"]) as handle:
        return [json.loads(line) for line in handle]


def test_answers_every_question_for_every_setting_and_writes_reports(setup):
    root, checkpoint = setup
    summary = evaluate_vlm(config(root, checkpoint, "run"))
    assert summary["metric"] == "vqa_accuracy" and summary["questions"] == 5
    records = results_of(summary)
    settings = {(r["method"], r["keep_ratio"]) for r in records}
    assert settings == {("none", 1.0), ("learned", 0.25), ("learned", 0.5), ("random", 0.25), ("random", 0.5)}
    assert len(records) == 5 * len(settings)
    for record in records:
        assert isinstance(record["prediction"], str)
        assert record["score"] == vqa_accuracy(record["prediction"], record["answers"])
        expected = record["n_tokens"] if record["method"] == "none" else math.ceil(record["n_tokens"] * record["keep_ratio"])
        assert record["n_kept"] == expected
    assert len({r["n_tokens"] for r in records}) > 1  # anyres grids differ per image
    report = json.loads((root / "run" / "report.json").read_text())
    assert {(r["method"], r["keep_ratio"]) for r in report["rows"]} == settings
    assert all(r["n_questions"] == 5 for r in report["rows"])
    assert "| learned |" in (root / "run" / "report.md").read_text()
    assert (root / "run" / "plots" / "score_vs_keep_ratio.png").stat().st_size > 0


def test_batched_answers_equal_one_at_a_time(setup):
    """Left padding and per-sample image lengths must not change what the model reads."""
    root, checkpoint = setup
    batched = results_of(evaluate_vlm(config(root, checkpoint, "batched", batch_size=5)))
    single = results_of(evaluate_vlm(config(root, checkpoint, "single", batch_size=1)))
    key = lambda r: (r["question_id"], r["method"], r["keep_ratio"])  # noqa: E731
    assert {key(r): r["prediction"] for r in batched} == {key(r): r["prediction"] for r in single}


def test_rerun_resumes_after_a_crash_without_repeating_answers(setup):
    root, checkpoint = setup
    cfg = config(root, checkpoint, "resume", methods=["none", "random"])
    summary = evaluate_vlm(cfg)
    path = summary["results"]
    complete = open(path).read().splitlines()
    # A crash: the last three answers never written, the one before torn mid-line.
    torn = complete[:-4] + [complete[-4][:15]]
    with open(path, "w") as handle:
        handle.write("\n".join(torn))
    resumed = evaluate_vlm(cfg)
    lines = open(path).read().splitlines()
    assert sorted(lines) == sorted(complete)
    assert resumed["scores"] == summary["scores"]
    evaluate_vlm(cfg)  # nothing left to do: the file is unchanged
    assert open(path).read().splitlines() == lines


def test_benchmark_readers_accept_parquet_and_saved_datasets(tmp_path):
    image = png((20, 20), (10, 20, 30))
    table = pa.table({"question": ["q0", "q1"], "answers": [["a"], ["b", "c"]],
                      "image": [{"bytes": image, "path": None}, {"bytes": image, "path": None}]})
    pq.write_table(table, tmp_path / "docvqa_val.parquet")
    questions = read_benchmark(str(tmp_path / "docvqa_val.parquet"))
    assert [q.question_id for q in questions] == ["0", "1"] and questions[1].answers == ["b", "c"]
    assert questions[0].image == image
    # The layout `datasets` save_to_disk writes: a dict of splits, each Arrow stream files listed in state.json.
    split_dir = tmp_path / "saved" / "validation"
    split_dir.mkdir(parents=True)
    with pa.OSFile(str(split_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (split_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    saved = read_benchmark(str(tmp_path / "saved"), split="validation")
    assert [q.answers for q in saved] == [q.answers for q in questions]
    assert metric_for("docvqa_val") == "anls" and metric_for("ChartQA") == "relaxed_accuracy"
    assert metric_for("my_benchmark") == "exact_match"


def test_job_rejects_a_prompt_without_its_placeholders_with_exit_2():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "jobs.evaluate_vlm", "prompt=no placeholders", "methods=[none]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "prompt" in result.stderr and "Traceback" not in result.stderr
