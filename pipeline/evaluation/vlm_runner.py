"""The VQA loop: a LLaVA-NeXT model answers each question from full, pruned and randomly pruned image tokens.

Each image goes through the vision tower once; each method scores its tokens once and every keep ratio is a
cut of those scores. The kept tokens (with their positions) go through ``pipeline.vlm.feed``, the same feed that
training on pruned shards uses, and the model answers by greedy decoding. Every answer is appended to a JSONL
results file as soon as its batch is done; a rerun with the same settings skips what is already there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pipeline.config import ConfigError, JobError, stable_hash, to_dict
from pipeline.encoders import VisionEncoder
from pipeline.evaluation.benchmark import Fields, Question, metric_for, read_benchmark
from pipeline.evaluation.config import EvaluateVLMConfig
from pipeline.evaluation.metrics import ANSWER_METRICS
from pipeline.evaluation.plots import plot_metrics_vs_ratio
from pipeline.evaluation.report import pivot_markdown, write_report
from pipeline.evaluation.runner import Setting, keep_mask
from pipeline.evaluation.samples import EncodedBatch, batched, pad_encoded
from pipeline.loader.collate import pad_collate
from pipeline.selector import build_selector
from pipeline.sources.decode import DecodeError, decode_image
from pipeline.vlm.feed import (
    embed_inputs,
    image_features,
    image_token_id,
    projector_input_dim,
    tokenize_prompts,
)
from pipeline.vlm.train import model_classes

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ResultsLog:
    """Append-only JSONL of answers. A line torn by a crash mid-write is cut off on open, so appends stay valid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            data = path.read_bytes()
            complete, _, torn = data.rpartition(b"\n")
            if torn:
                with path.open("r+b") as handle:
                    handle.truncate(len(data) - len(torn))
            self.records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.done = {(r["question_id"], r["method"], r["keep_ratio"]) for r in self.records}

    def append(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        self.records += records
        self.done |= {(r["question_id"], r["method"], r["keep_ratio"]) for r in records}


def vlm_settings(cfg: EvaluateVLMConfig) -> list[Setting]:
    settings = [Setting("none", "ratio", keep_ratio=1.0)] if "none" in cfg.methods else []
    return settings + [Setting(m, "ratio", keep_ratio=r) for m in cfg.methods if m != "none" for r in cfg.keep_ratios]


def resolve_device(cfg: EvaluateVLMConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[cfg.dtype]


def load_model(cfg: EvaluateVLMConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoTokenizer

    _, model_cls = model_classes(cfg.family)
    model = model_cls.from_pretrained(cfg.model, dtype=dtype, local_files_only=cfg.local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, local_files_only=cfg.local_files_only)
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------- one batch


def pruned_samples(batch: EncodedBatch, keep: torch.Tensor, rows: list[int], keys: list[str]) -> dict[str, Any]:
    """The kept tokens of ``rows`` as a :func:`pad_collate` batch, the form ``pipeline.vlm.feed`` reads."""
    samples = []
    for row in rows:
        encoded = batch.encoded[row]
        positions = torch.nonzero(keep[row, : encoded.tokens.shape[0]].cpu()).flatten()
        samples.append({"key": keys[row], "tokens": encoded.tokens[positions], "positions": positions,
                        "n_tokens": encoded.tokens.shape[0], "grid": tuple(encoded.grid), "side": encoded.side})
    return pad_collate(samples)


@torch.inference_mode()
def answer(model: torch.nn.Module, tokenizer: Any, feed: dict[str, Any], prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one per sample; prompts are left-padded so every answer starts at the same step."""
    features = image_features(model, feed)
    image_token = image_token_id(model)
    sequences = [
        tokenize_prompts(tokenizer, [f.shape[0]], image_token, prompt=prompt).input_ids[0]
        for prompt, f in zip(prompts, features)
    ]
    width = max(len(s) for s in sequences)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = sequence
        attention_mask[row, width - len(sequence) :] = 1
    device = model.get_input_embeddings().weight.device
    embeds = embed_inputs(model, input_ids.to(device), features, image_token)
    # Given embeddings and no ids, generate returns the new tokens only.
    generated = model.generate(
        inputs_embeds=embeds, attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=pad_id,
    )
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------- report


def vlm_rows(records: list[dict[str, Any]], settings: list[Setting], benchmark: str, metric: str) -> list[dict[str, Any]]:
    rows = []
    for setting in settings:
        chosen = [r for r in records if (r["method"], r["keep_ratio"]) == (setting.method, setting.keep_ratio)]
        if chosen:
            rows.append({
                "benchmark": benchmark, "metric": metric, "method": setting.method, "mode": setting.mode,
                "keep_ratio": setting.keep_ratio,
                "score": sum(r["score"] for r in chosen) / len(chosen),
                "mean_kept": sum(r["n_kept"] for r in chosen) / len(chosen),
                "kept_fraction": sum(r["n_kept"] / r["n_tokens"] for r in chosen) / len(chosen),
                "n_questions": len(chosen),
            })
    return rows


def vlm_markdown(rows: list[dict[str, Any]], summary: dict[str, Any], plot: str) -> str:
    return "\n".join([
        f"# {summary['benchmark']}: answers from pruned image tokens",
        "",
        f"Model {summary['model']}, {summary['questions']} questions, metric {summary['metric']}; "
        "`none` is the full token set.",
        "", f"### {summary['metric']}", "",
        pivot_markdown(rows, row_keys=["method"], column_key="keep_ratio", value_key="score"),
        "", "### image tokens kept per question", "",
        pivot_markdown(rows, row_keys=["method"], column_key="keep_ratio", value_key="mean_kept"),
        "", f"![score vs keep ratio]({plot})",
    ])


# --------------------------------------------------------------------------------------------- the job


@dataclass
class VQARun:
    """What answering needs, loaded once: the model, the vision tower, the selectors and the results so far."""

    cfg: EvaluateVLMConfig
    model: torch.nn.Module
    tokenizer: Any
    encoder: VisionEncoder
    selectors: dict[str, Any]
    device: torch.device
    score: Callable[[str, list[str]], float]
    results: ResultsLog

    def answer_chunk(self, chunk: list[Question], settings: list[Setting]) -> None:
        """Every setting's answers for the questions of ``chunk`` not answered yet, appended per setting."""
        todo = {s: [i for i, q in enumerate(chunk) if (q.question_id, s.method, s.keep_ratio) not in self.results.done]
                for s in settings}
        if not any(todo.values()):
            return
        images = [question_image(q, self.cfg) for q in chunk]
        batch = pad_encoded(self.encoder.encode_images(images, with_cls_attention="cls_attention" in self.cfg.methods))
        keys = [q.question_id for q in chunk]
        mask = batch.mask.to(self.device)
        scores: dict[str, torch.Tensor] = {}
        for setting, rows in todo.items():
            if not rows:
                continue
            if setting.method == "none":
                keep = mask
            else:
                if setting.method not in scores:
                    cls_attention = batch.cls_attention.to(self.device) if batch.cls_attention is not None else None
                    scores[setting.method] = self.selectors[setting.method].scores(
                        batch.tokens.to(self.device), mask, keys=keys, cls_attention=cls_attention)
                keep = keep_mask(setting, scores[setting.method], mask, self.cfg.selector.min_tokens)
            feed = pruned_samples(batch, keep, rows, keys)
            prompts = [self.cfg.prompt.replace("{question}", chunk[i].question) for i in rows]
            predictions = answer(self.model, self.tokenizer, feed, prompts, self.cfg.max_new_tokens)
            self.results.append([
                {"question_id": chunk[i].question_id, "method": setting.method, "keep_ratio": setting.keep_ratio,
                 "prediction": prediction, "answers": chunk[i].answers, "score": self.score(prediction, chunk[i].answers),
                 "n_kept": int(feed["lengths"][j]), "n_tokens": int(feed["n_tokens"][j])}
                for j, (i, prediction) in enumerate(zip(rows, predictions))
            ])


def start_run(cfg: EvaluateVLMConfig, metric: str) -> VQARun:
    device, dtype = resolve_device(cfg)
    model, tokenizer = load_model(cfg, device, dtype)
    encoder = VisionEncoder.from_config(cfg.encoder)
    if encoder.hidden_size != projector_input_dim(model):
        raise ConfigError(
            f"encoder: {cfg.encoder.name} gives {encoder.hidden_size}-dim tokens, but {cfg.model}'s projector takes "
            f"{projector_input_dim(model)}; set encoder to the model's vision tower and feature layer"
        )
    fingerprint = encoder.fingerprint()
    selectors = {
        m: build_selector(dataclasses.replace(cfg.selector, method=m), fingerprint, device, side=encoder.side,
                          storage_options=cfg.storage.storage_options())
        for m in cfg.methods if m != "none"
    }
    # Answers are only reused by a run that would give the same ones.
    run_identity = {
        "benchmark": cfg.benchmark, "split": cfg.split, "fields": [cfg.image_field, cfg.question_field, cfg.answers_field,
                                                                   cfg.id_field],
        "model": cfg.model, "dtype": str(dtype), "encoder_fingerprint": fingerprint, "prompt": cfg.prompt,
        "max_new_tokens": cfg.max_new_tokens, "min_tokens": cfg.selector.min_tokens,
        "selectors": {m: s.fingerprint() for m, s in selectors.items()},
    }
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    results = ResultsLog(output / f"results-{stable_hash(run_identity)}.jsonl")
    return VQARun(cfg, model, tokenizer, encoder, selectors, device, ANSWER_METRICS[metric], results)


def evaluate_vlm(cfg: EvaluateVLMConfig) -> dict[str, Any]:
    if "learned" in cfg.methods and not cfg.selector.checkpoint:  # before the model loads, not after
        raise ConfigError("selector.checkpoint: method learned needs selector.checkpoint=PATH (train one with "
                          "python -m jobs.train_selector)")
    started = time.monotonic()
    fields = Fields(cfg.image_field, cfg.question_field, cfg.answers_field, cfg.id_field)
    questions = read_benchmark(cfg.benchmark, cfg.split, fields, cfg.max_questions)
    benchmark = cfg.benchmark_name or Path(cfg.benchmark.rstrip("/")).stem
    metric = metric_for(benchmark) if cfg.metric == "auto" else cfg.metric
    run = start_run(cfg, metric)
    settings = vlm_settings(cfg)
    log.info(f"[evaluate_vlm] {len(questions)} questions, metric {metric}, {len(settings)} settings, "
        f"{len(run.results.records)} answers already in {run.results.path}")
    for chunk in batched(questions, cfg.batch_size):
        run.answer_chunk(chunk, settings)
        log.info(f"[evaluate_vlm] {len(run.results.records)} answers ({time.monotonic() - started:.0f}s)")

    asked = {q.question_id for q in questions}
    rows = vlm_rows([r for r in run.results.records if r["question_id"] in asked], settings, benchmark, metric)
    output = Path(cfg.output)
    plot = plot_metrics_vs_ratio(rows, [("score", metric)], output / "plots" / "score_vs_keep_ratio.png", benchmark)
    summary = {
        "benchmark": benchmark, "metric": metric, "model": cfg.model, "questions": len(questions),
        "scores": {m: {str(r["keep_ratio"]): r["score"] for r in rows if r["method"] == m} for m in cfg.methods},
        "results": str(run.results.path), "seconds": round(time.monotonic() - started, 1),
    }
    markdown = vlm_markdown(rows, summary, plot.relative_to(output).as_posix())
    paths = write_report(output, rows, summary, markdown, config=to_dict(cfg))
    return {"report": paths["md"], "report_json": paths["json"], "plots": [str(plot)], **summary}


def question_image(question: Question, cfg: EvaluateVLMConfig) -> Image.Image:
    try:
        return decode_image(question.image, cfg.decode)
    except DecodeError as exc:
        raise JobError(f"benchmark {cfg.benchmark}: question {question.question_id}: image does not decode: {exc.reason}") from None
