"""Configs of the evaluation jobs, built from the pipeline's own sub-configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from pipeline.config import (
    Config,
    DecodeConfig,
    EncoderConfig,
    InputConfig,
    SelectorConfig,
    StorageConfig,
    require,
)

Method = Literal["learned", "learned_oneshot", "none", "random", "uniform", "norm", "cls_attention", "diversity",
                 "oracle"]
DEFAULT_KEEP_RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@dataclass(kw_only=True)
class ProbeConfig(Config):
    """The frozen probe: trained on full token sets of ``train_input``, then read pruned sets unchanged."""

    SECTION = "probe"

    task: Literal["family", "has_digits", "family_digits", "n_shapes", "code"] = "family_digits"
    train_input: InputConfig = field(default_factory=lambda: InputConfig(path="demo_output/corpus/train"))
    max_train_images: int | None = None
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 64
    heads: int = 4
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "width", "heads"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.width % self.heads == 0, "width", f"must be a multiple of heads ({self.heads}), got {self.width}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")


@dataclass(kw_only=True)
class EvaluateConfig(Config):
    """Evaluate token selection on held-out images with ground-truth text boxes.

    ``selector`` supplies the trained checkpoint (``selector.checkpoint``: needed whatever the methods, since the
    trained reconstructor scores them all; :func:`pipeline.evaluation.runner.evaluate` checks it is set), the seed
    of the random baseline and ``min_tokens``; the method, mode, ratio and threshold are set by the evaluation for
    each method it runs.
    """

    input: InputConfig = field(default_factory=lambda: InputConfig(path="demo_output/corpus/heldout"))
    output: str = "demo_output/evaluation"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    methods: list[Method] = field(
        default_factory=lambda: ["learned", "learned_oneshot", "oracle", "random", "uniform", "norm", "cls_attention",
                                 "diversity", "none"]
    )
    keep_ratios: list[float] = field(default_factory=lambda: list(DEFAULT_KEEP_RATIOS))
    # The learned selector's adaptive mode: keep every token whose keep probability reaches the threshold.
    thresholds: list[float] = field(default_factory=lambda: [0.5])
    # The learned selector's error-bounded mode: per image the fewest tokens whose reconstruction error is at
    # most this fraction of the image's spread.
    max_errors: list[float] = field(default_factory=lambda: [0.3])
    # A token is a text patch when text covers more than this fraction of its region (0: any overlap, the
    # corpus's density measure).
    text_patch_min_coverage: float = 0.0
    max_images: int | None = None
    batch_size: int = 32
    overlays: int = 4
    overlay_ratio: float = 0.3

    def check(self) -> None:
        require(bool(self.methods), "methods", "must name at least one of " + ", ".join(get_args(Method)))
        require(bool(self.keep_ratios) and all(0 < r <= 1 for r in self.keep_ratios), "keep_ratios",
                f"must be numbers in (0, 1], got {self.keep_ratios}")
        require(all(0 <= t <= 1 for t in self.thresholds), "thresholds",
                f"must be keep probabilities in [0, 1], got {self.thresholds}")
        require(all(0 < e < 1 for e in self.max_errors), "max_errors",
                f"must be fractions of an image's spread in (0, 1), got {self.max_errors}")
        require(0 < self.overlay_ratio <= 1, "overlay_ratio", f"must be in (0, 1], got {self.overlay_ratio}")
        require(0 <= self.text_patch_min_coverage < 1, "text_patch_min_coverage",
                f"must be in [0, 1), got {self.text_patch_min_coverage}")
        require(self.batch_size > 0 and self.overlays >= 0, "batch_size", "batch_size must be positive, overlays >= 0")


@dataclass(kw_only=True)
class EvaluateVLMConfig(Config):
    """Answer a local VQA benchmark with a LLaVA-NeXT model fed full, selector-pruned and random-pruned features.

    ``encoder`` must be the model's own vision tower at its feature layer (the selector was trained on its
    tokens); its tokens go through the model's projector, so its width must be the projector's input width.
    Method ``learned`` needs ``selector.checkpoint``; :func:`pipeline.evaluation.vlm_runner.evaluate_vlm` checks it.
    """

    benchmark: str = "demo_output/vqa/benchmark.jsonl"
    # Picks the metric when metric=auto (textvqa, docvqa, chartqa, ...); unset: the benchmark path.
    benchmark_name: str | None = None
    split: str = "test"
    image_field: str = "image"
    question_field: str = "question"
    answers_field: str = "answers"
    id_field: str = "question_id"
    metric: Literal["auto", "vqa_accuracy", "anls", "relaxed_accuracy", "exact_match"] = "auto"
    model: str = "llava-hf/llava-v1.6-mistral-7b-hf"
    family: Literal["llava_next", "llava_onevision"] = "llava_next"
    local_files_only: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    methods: list[Literal["none", "learned", "learned_oneshot", "random", "uniform", "norm", "cls_attention",
                          "diversity"]] = field(
        default_factory=lambda: ["none", "learned", "random"]
    )
    keep_ratios: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    # One <image> placeholder and one {question}; the default is LLaVA-1.6-Mistral's chat format with the
    # short-answer instruction VQA evaluations use.
    prompt: str = "[INST] <image>\n{question}\nAnswer the question using a single word or phrase. [/INST]"
    max_new_tokens: int = 16
    batch_size: int = 8
    max_questions: int | None = None
    output: str = "demo_output/evaluate_vlm"

    def check(self) -> None:
        require(bool(self.methods), "methods", "must name at least one of none, learned, random, ...")
        require(bool(self.keep_ratios) and all(0 < r <= 1 for r in self.keep_ratios), "keep_ratios",
                f"must be numbers in (0, 1], got {self.keep_ratios}")
        require(self.prompt.count("<image>") == 1 and self.prompt.count("{question}") == 1, "prompt",
                f"must hold one <image> and one {{question}}, got {self.prompt!r}")
        require(self.max_new_tokens > 0 and self.batch_size > 0, "batch_size",
                "batch_size and max_new_tokens must be positive integers")
