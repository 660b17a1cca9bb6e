"""Config of ``python -m jobs.train_vlm``: caption training of a LLaVA-NeXT projector on pruned tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import Config, RayConfig, StorageConfig, require

# Here, not in pipeline.vlm.feed, so the config (and --help) loads without torch.
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_PROMPT = "USER: <image>\nDescribe the image. ASSISTANT: "


@dataclass(kw_only=True)
class VLMModelConfig(Config):
    """``name_or_path`` set: ``from_pretrained`` (model and tokenizer); null: a tiny random model built in code."""

    SECTION = "model"

    name_or_path: str | None = None
    family: Literal["llava_next", "llava_onevision"] = "llava_next"
    local_files_only: bool = False
    # Frozen weights load in this dtype; trained weights are kept in float32 and the forward runs under
    # autocast to it, so optimizer updates are not lost to bfloat16 rounding. No float16: it would need loss
    # scaling (a GradScaler), which the training loop does not have.
    dtype: Literal["float32", "bfloat16"] = "float32"
    prompt: str = DEFAULT_PROMPT
    # The tiny random model (name_or_path null): a Llama text model over a byte-level tokenizer.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    seed: int = 0

    def check(self) -> None:
        require(self.prompt.count(IMAGE_PLACEHOLDER) == 1, "prompt",
                f"must hold exactly one {IMAGE_PLACEHOLDER} placeholder, got {self.prompt!r}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0, "hidden_size",
                f"must be a multiple of num_heads ({self.num_heads}), got {self.hidden_size}")


@dataclass(kw_only=True)
class VLMTrainConfig(Config):
    SECTION = "train"

    steps: int = 200
    batch_size: int = 8
    # Set: batches hold at most this many kept tokens (packed, up to batch_size samples) instead of batch_size.
    max_tokens: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    language_model: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int | None = None
    loader_workers: int = 0
    shuffle_buffer: int = 256
    log_every: int = 10
    seed: int = 0
    # Every this many steps a resume point (weights, optimizer, scheduler, each rank's loader state) is written
    # under {output}/checkpoint/resume/; 0: only the final checkpoint.
    checkpoint_every: int = 0
    # A rerun with the same output continues from its last resume point (any world size / loader workers).
    resume: bool = True

    def check(self) -> None:
        require(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        for name in ("steps", "batch_size", "num_workers", "log_every"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        for name in ("warmup_steps", "loader_workers"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        require(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be a positive integer or null")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(self.shuffle_buffer >= 1, "shuffle_buffer", "must be a positive integer")


@dataclass(kw_only=True)
class TrainVLMConfig(Config):
    """Train a LLaVA-NeXT projector (optionally its language model) to caption images from pruned tokens."""

    input: str = "demo_output/compressed"  # a compress output dir ({output}/{encoder}/{cfg_hash}) or its manifest
    output: str = "demo_output/vlm"
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    train: VLMTrainConfig = field(default_factory=VLMTrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> None:
        require(bool(self.input), "input", "must name a compress output directory or its manifest.parquet")
        require(bool(self.output), "output", "must name an output folder")
