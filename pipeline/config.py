"""Typed job configs.

Dataclasses are the source of truth; OmegaConf only merges YAML files and ``key=value`` overrides into
plain dicts, and :func:`load_config` turns the result into dataclasses, rejecting unknown keys and wrong types
with a :class:`ConfigError` that names the key and what is allowed.

Every config derives from :class:`Config`, whose ``__post_init__`` checks its values (``Literal`` choices
included) whenever one is made: from YAML, in code or by ``dataclasses.replace``. So a config that exists is a
valid one, and code that reads it need not check its values again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Presets and job configs ship inside the package, so an installed wheel finds them from any directory.
CONF_DIR = Path(__file__).resolve().parent / "conf"
SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A user-caused configuration problem; jobs print it as one line and exit 2."""


class JobError(RuntimeError):
    """A systemic runtime failure with a message a user can act on; jobs print it as one line and exit 1."""


def require(condition: bool, key: str, allowed: str) -> None:
    """For :meth:`Config.check`: reject a value, naming the key (relative to its config) and what is allowed."""
    if not condition:
        raise ConfigError(f"{key}: {allowed}")


def names_a_bucket(url: str) -> bool:
    """False for a bare ``s3://`` (or ``gs://``, ...): a scheme with no bucket would mean the whole store."""
    _, sep, rest = url.partition("://")
    return not sep or bool(rest.strip("/"))


def _names_choices(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal or any(_names_choices(arg) for arg in typing.get_args(tp))


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """The fields of dataclass ``cls`` whose type has ``Literal`` choices (``Literal[...]``, a list of them, ...)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls) if _names_choices(hints[f.name]))


def check_choices(config: Config) -> None:
    """Reject a ``Literal`` field's value outside its choices, in :func:`load_config`'s words:
    ``mode: got 'sometimes', expected one of 'threshold', 'ratio', 'budget'``."""
    for name, tp in _choice_fields(type(config)):
        _coerce(getattr(config, name), tp, name)


@dataclass(kw_only=True)
class Config:
    """Base of the config dataclasses: ``__post_init__`` checks every value whenever a config is made.

    A subclass puts its checks in :meth:`check`, naming keys relative to itself; ``Literal`` choices are checked
    for it. An error names the key under ``SECTION``, where the config sits in a job config
    (``selector.ratio: must be in (0, 1], got 1.5``); :func:`load_config` names the key's full path instead
    (``probe.train_input.path: ...`` for the probe's :class:`InputConfig`).
    """

    SECTION: ClassVar[str] = ""  # "" for a job's own config

    def __post_init__(self) -> None:
        try:
            check_choices(self)
            self.check()
        except ConfigError as exc:
            raise ConfigError(f"{self.SECTION}.{exc}" if self.SECTION else str(exc)) from None

    def check(self) -> None:
        """Checks of this config's values beyond their types; reject one with :func:`require`."""


# --------------------------------------------------------------------------------------------- sub-configs


@dataclass(kw_only=True)
class EncoderConfig(Config):
    """A vision tower. ``pretrained`` set: ``from_pretrained(pretrained)``; unset: seeded random init."""

    SECTION = "encoder"

    # The preset's name; part of the output path {output.path}/{name}/{cfg_hash}.
    name: str = "tiny"
    # The tower architecture.
    family: Literal["clip", "siglip"] = "clip"
    # A hub model id or local folder for from_pretrained; null: a seeded random init.
    pretrained: str | None = None
    # Load pretrained from the local hub cache only (no network).
    local_files_only: bool = False
    # The model's square input side in pixels.
    image_size: int = 224
    # Pixels per patch side; tokens per tile = (image_size // patch_size) ** 2.
    patch_size: int = 16
    # Token width (the stored dim).
    hidden_size: int = 192
    # Transformer layers (random init only; pretrained towers bring their own).
    num_layers: int = 6
    # Attention heads (random init only).
    num_heads: int = 3
    # MLP width (random init only).
    intermediate_size: int = 768
    # The hidden state whose tokens are kept (LLaVA: -2, the penultimate layer).
    select_layer: int = -2
    # CLIP drops its CLS token from the features (LLaVA's "patch" strategy); SigLIP has none.
    select_feature: Literal["patch", "cls_patch"] = "patch"
    # How a non-square image becomes the model's square input: CLIP's processor resizes the short side and
    # centre-crops; SigLIP's resizes both sides; "pad" letterboxes with the mean colour (LLaVA's "pad").
    resize_mode: Literal["shortest_edge_crop", "squash", "pad"] = "shortest_edge_crop"
    # Per-channel normalisation mean (RGB).
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    # Per-channel normalisation std (RGB).
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    # LLaVA-NeXT anyres: a base tile plus a grid of tiles picked from image_grid_pinpoints.
    anyres: bool = False
    # anyres grids as [height, width] in pixels.
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[448, 448], [224, 448], [448, 224], [672, 224], [224, 672]]
    )
    # Compute dtype on the device; auto: bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto, cpu, cuda or cuda:N.
    device: str = "auto"
    # Seed of the random init.
    seed: int = 0
    # Images (tiles) per encoder forward pass.
    batch_size: int = 32
    # torch.compile the tower.
    compile: bool = False
    # With pretrained set, where image_mean / image_std / resize_mode come from: checkpoint (its
    # preprocessor_config.json wins over the preset, with a warning naming both) or config (these keys as given).
    preprocessor: Literal["checkpoint", "config"] = "checkpoint"

    def check(self) -> None:
        for name in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "batch_size"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        # Not a multiple is fine: the patch convolution drops the remainder (SigLIP so400m: 384 px, patch 14).
        require(self.image_size >= self.patch_size, "image_size",
                f"must be at least patch_size ({self.patch_size}), got {self.image_size}")
        require(-self.num_layers - 1 <= self.select_layer <= self.num_layers, "select_layer",
                f"must index a hidden state in [-{self.num_layers + 1}, {self.num_layers}], got {self.select_layer}")
        require(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean",
                "image_mean and image_std need 3 values (RGB)")
        require(all(len(p) == 2 and min(p) > 0 for p in self.image_grid_pinpoints), "image_grid_pinpoints",
                "must be a list of [height, width] pairs of positive integers")

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return side * side

    @property
    def max_tiles(self) -> int:
        """Tiles of one image at the most: 1, or with ``anyres`` the base tile and the largest pinpoint grid."""
        if not self.anyres:
            return 1
        return 1 + max((h // self.image_size) * (w // self.image_size) for h, w in self.image_grid_pinpoints)


@dataclass(kw_only=True)
class StorageConfig(Config):
    """fsspec options for ``s3://`` paths. Keys and secrets come from the environment, never from here."""

    SECTION = "storage"

    # S3-compatible endpoint (MinIO, Ceph, a VPC endpoint); null: AWS's.
    endpoint_url: str | None = None
    # S3 region; null: from the environment.
    region: str | None = None
    # Unsigned requests, for public buckets.
    anon: bool = False

    def storage_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"anon": self.anon}
        client_kwargs = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


# Up to the URL's last "@": a password pasted unescaped may hold "/" or "@" (a path's "@" is redacted too).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)\S*@")


def redact_credentials(value: Any) -> Any:
    """``value`` (a config as :func:`to_dict` gives it) with the userinfo of every URL in it replaced by
    ``***``: ``storage.endpoint_url=https://key:secret@minio:9000`` is printed and stored without the secret."""
    if isinstance(value, dict):
        return {k: redact_credentials(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_credentials(v) for v in value)
    return _URL_USERINFO.sub(r"\1***@", value) if isinstance(value, str) else value


@dataclass(kw_only=True)
class InputConfig(Config):
    """The image corpus to read."""

    SECTION = "input"

    # A file, glob, {a,b} / {000..009} brace pattern or folder; local or s3://.
    path: str = "demo_output/corpus/train"
    # Shard format; auto: from the file extension.
    format: Literal["auto", "webdataset", "parquet", "folder"] = "auto"
    # The image member's extension (WebDataset) or column (Parquet); unset: jpg, jpeg, png, webp / jpg, image, ...
    image_column: str | None = None
    # Parquet inputs: the column holding each sample's key.
    key_column: str = "key"
    # Folder inputs: how many images make one shard (the unit of work and of commit).
    folder_shard_size: int = 256
    # A larger tar member or file is quarantined unread, so one sample never takes more memory than this.
    max_member_bytes: int = 256 * 1024 * 1024
    # The dataset root: shard ids are paths relative to it, and it (not the pattern) is the dataset's identity
    # in cfg_hash, so a glob, a folder and a brace range over the same shards share one output prefix.
    # Unset: the longest fixed prefix of path (up to its first glob or brace character, cut at a '/').
    root: str | None = None
    # A brace member that does not exist: skip (counted as missing in the summary; for nightly runs over a
    # range that fills up) or error.
    missing: Literal["skip", "error"] = "skip"

    def check(self) -> None:
        require(bool(self.path), "path", "must name a file, glob, brace pattern or folder (local or s3://)")
        require(names_a_bucket(self.path), "path", f"{self.path!r} names no bucket; give s3://BUCKET/PREFIX/...")
        require(self.folder_shard_size > 0, "folder_shard_size", "must be a positive integer")
        require(self.max_member_bytes > 0, "max_member_bytes", "must be a positive integer")


@dataclass(kw_only=True)
class DecodeConfig(Config):
    """Image decoding and its bounds."""

    SECTION = "decode"

    # Images above this many pixels are quarantined (decompression-bomb bound).
    max_pixels: int = 50_000_000
    # Encoded images above this size are quarantined unread.
    max_bytes: int = 64 * 1024 * 1024
    # Images longer than this many times their width (or wider than their height) are quarantined from the
    # header, "extreme aspect ratio": a 1x60000 strip holds no picture, and preparing it can cost gigabytes.
    max_aspect_ratio: float = 10_000.0
    # Where JPEGs are decoded; auto: the GPU when the encoder runs on one.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def check(self) -> None:
        require(self.max_pixels > 0, "max_pixels", "must be a positive integer")
        require(self.max_bytes > 0, "max_bytes", "must be a positive integer")
        require(self.max_aspect_ratio >= 1, "max_aspect_ratio", f"must be >= 1, got {self.max_aspect_ratio}")


@dataclass(kw_only=True)
class SelectorConfig(Config):
    """Which tokens to keep. ``method=none`` keeps all (the full-token baseline).

    ``method=learned`` needs ``checkpoint``, which has no default; :func:`pipeline.selector.build_selector` says
    so when it builds the selector (a check here would reject the default config and every policy made in code).
    """

    SECTION = "selector"

    # learned: the trained selector; none keeps every token; the rest are training-free baselines.
    # learned is set-aware (the trained reconstructor picks in rounds); learned_oneshot is the paper's top-k of
    # independent keep probabilities.
    method: Literal["learned", "learned_oneshot", "none", "random", "uniform", "norm", "cls_attention",
                    "diversity"] = "learned"
    # The trained selector (a checkpoint folder or file; local or s3://); needed by method=learned.
    checkpoint: str | None = None
    # threshold: keep tokens whose keep probability >= threshold; ratio: a fixed fraction; budget: a fixed count;
    # error (learned methods only): per image, the fewest tokens whose reconstruction error is <= max_error.
    mode: Literal["threshold", "ratio", "budget", "error"] = "threshold"
    # Keep probability a token needs in mode=threshold.
    threshold: float = 0.5
    # Fraction of tokens kept in mode=ratio.
    ratio: float = 0.5
    # Tokens kept per image in mode=budget.
    budget: int = 64
    # mode=error: the bound on each image's reconstruction error, as a fraction of its spread (the error of
    # rebuilding every token as the image's mean token), so it means the same for every encoder.
    max_error: float = 0.3
    # Never keep fewer tokens than this per image.
    min_tokens: int = 1
    # Seed of the random baseline.
    seed: int = 0
    # Also store each kept token's score.
    store_scores: bool = False

    def check(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "threshold", f"must be a keep probability in [0, 1], got {self.threshold}")
        require(0.0 < self.ratio <= 1.0, "ratio", f"must be in (0, 1], got {self.ratio}")
        require(self.budget > 0, "budget", f"must be a positive integer, got {self.budget}")
        require(0.0 < self.max_error < 1.0, "max_error", f"must be a fraction of the image's spread in (0, 1), got {self.max_error}")
        require(self.mode != "error" or self.method in ("learned", "learned_oneshot"), "mode",
                f"mode=error needs the trained reconstructor: method learned or learned_oneshot, got {self.method}")
        require(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")


@dataclass(kw_only=True)
class SelectorModelConfig(Config):
    """The paper's selector (3 layers + keep/drop head) and reconstructor (3 layers)."""

    SECTION = "model"

    # The selector's own width (a linear projection in from the encoder's); its cost next to the encoder's is
    # what keeps selection cheap: at 64 about 0.07% of a ViT-L/14-336's FLOPs, at 256 about 0.9%.
    width: int = 64
    selector_layers: int = 3
    reconstructor_layers: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_positions: int = 4096

    def check(self) -> None:
        require(self.width > 0 and self.width % self.num_heads == 0, "width",
                f"must be a positive multiple of num_heads={self.num_heads}, got {self.width}")
        require(self.selector_layers > 0 and self.reconstructor_layers > 0, "selector_layers",
                "selector_layers and reconstructor_layers must be positive")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.max_positions > 0, "max_positions", f"must be positive, got {self.max_positions}")


@dataclass(kw_only=True)
class OutputConfig(Config):
    """Where and how the kept tokens are written."""

    SECTION = "output"

    # Output root (local or s3://); the run writes under {path}/{encoder}/{cfg_hash}/.
    path: str = "demo_output/compressed"
    # Shard format of the kept tokens.
    format: Literal["parquet", "webdataset"] = "parquet"
    # Storage dtype of the kept tokens; int8 and float8_e4m3 store a float32 absmax scale per token beside them.
    dtype: Literal["float16", "bfloat16", "float32", "int8", "float8_e4m3"] = "float16"
    # Parquet rows per row group.
    row_group_size: int = 256
    # false (mirror): the manifest shows exactly the current input shards; a removed input's rows drop out and
    # jobs.gc collects them. true: append-only, a removed input keeps its last committed version.
    keep_removed_inputs: bool = False
    # A key in two visible shards: error (the run fails naming both shards; the manifest is not updated) or
    # keep_first (the shard first in shard-id order keeps the key; later shards' rows with it are hidden).
    on_duplicate_key: Literal["error", "keep_first"] = "error"

    def check(self) -> None:
        require(bool(self.path), "path", "must name an output folder (local or s3://)")
        require(names_a_bucket(self.path), "path", f"{self.path!r} names no bucket; give s3://BUCKET/PREFIX")
        require(self.row_group_size > 0, "row_group_size", "must be a positive integer")


@dataclass(kw_only=True)
class RayConfig(Config):
    """The Ray cluster and the resources of each actor, task and retry."""

    SECTION = "ray"

    # Ray cluster to join; null: RAY_ADDRESS, else a private in-process cluster.
    address: str | None = None
    # Encode actors kept alive at the least.
    num_actors_min: int = 1
    # Encode actors at the most (the pool autoscales in between).
    num_actors_max: int = 1
    # GPUs per encode actor (0: encode on CPU).
    num_gpus_per_actor: float = 0.0
    # CPUs reserved per encode actor.
    num_cpus_per_actor: float = 1.0
    # CPUs per decode task.
    decode_num_cpus: float = 1.0
    # Restarts of a failed encode actor.
    max_restarts: int = 2
    # Retries of a call on a restarted actor.
    max_task_retries: int = 2
    # Retries of a failed decode or write task.
    max_retries: int = 2
    # Encoder batches per actor call: the actor stages the next while the GPU encodes one. None: 4 on GPU
    # actors, 1 on CPU ones (where there is nothing to overlap with).
    batches_per_call: int | None = None
    # Before any work is submitted, how long to wait for nodes that can hold one actor or worker to join (an
    # autoscaling cluster starting them); a private in-process cluster cannot grow and is not waited for.
    resource_wait_s: float = 600.0

    def check(self) -> None:
        require(self.resource_wait_s >= 0, "resource_wait_s", f"must be >= 0, got {self.resource_wait_s}")
        require(self.batches_per_call is None or self.batches_per_call >= 1, "batches_per_call",
                "must be >= 1, or null for 4 on GPU actors and 1 on CPU ones")
        require(1 <= self.num_actors_min <= self.num_actors_max, "num_actors_min",
                f"need 1 <= num_actors_min <= num_actors_max, got {self.num_actors_min} and {self.num_actors_max}")
        require(self.num_gpus_per_actor >= 0 and self.num_cpus_per_actor >= 0, "num_gpus_per_actor",
                "resources must be >= 0")
        for name in ("max_restarts", "max_task_retries", "max_retries"):
            require(getattr(self, name) >= 0, name, "must be a finite count >= 0")


@dataclass(kw_only=True)
class TrainConfig(Config):
    """Defaults tuned on the demo corpus with the tiny encoder (about a minute on 2 CPU cores)."""

    SECTION = "train"

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    # For these first steps the selector stays as initialised (every token kept with probability 1/2), so the
    # reconstructor learns to fill gaps before the selector judges which tokens it cannot do without.
    selector_warmup_steps: int = 100
    grad_clip: float | None = 1.0
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    temperature_schedule: Literal["exponential", "cosine"] = "exponential"
    # The price of keeping a token: a token is kept when keeping it saves more relative error than this.
    sparsity_weight: float = 1.0
    # None: the sparsity term is the mean keep probability; set: its squared distance to this rate.
    target_keep_rate: float | None = None
    loss: Literal["mse", "cosine"] = "mse"
    # Set: each image's error is divided by its own token spread plus this floor, so images count equally
    # (see pipeline/selector/loss.py); None: the plain error, as in the paper.
    relative_error_floor: float | None = 0.02
    num_workers: int = 1
    use_gpu: bool = False
    # Torch threads (and Ray CPUs) per worker; None: the cluster's CPUs split evenly over the workers. One
    # thread suits the small default selector: on a busy 2-core host two threads ran 2-10x slower, not faster.
    cpus_per_worker: int | None = 1
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # Where token sets come from: "images" decodes and encodes input.path's image shards on the fly with the
    # frozen encoder; "features" reads a compress output of full tokens (jobs.compress selector.method=none)
    # at input.path, so one encode serves many trainings. Both stream: memory does not grow with the corpus.
    source: Literal["images", "features"] = "images"
    # A sample of about this many images of the whole corpus, the same every epoch (images: each shard's first
    # images, its share of max_images; features: a seeded keep decision per row); None: every image.
    max_images: int | None = None
    # Samples a worker's bounded shuffle window holds (images: undecoded image bytes; features: stored rows).
    shuffle_buffer: int = 256
    # images: threads decoding and resizing images; features: DataLoader processes reading rows. 0: inline.
    loader_workers: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "num_workers"):
            require(getattr(self, name) > 0, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        # Below steps too, or the selector never trains; TrainSelectorConfig checks that, so a TrainConfig made
        # in code for a few steps needs no selector_warmup_steps of its own.
        require(self.selector_warmup_steps >= 0, "selector_warmup_steps",
                f"must be in [0, steps={self.steps}), got {self.selector_warmup_steps}")
        require(0 < self.temperature_end <= self.temperature_start, "temperature_end",
                "must be positive and at most temperature_start")
        require(self.sparsity_weight >= 0, "sparsity_weight", f"must be >= 0, got {self.sparsity_weight}")
        require(self.target_keep_rate is None or 0 < self.target_keep_rate <= 1, "target_keep_rate",
                f"must be null or in (0, 1], got {self.target_keep_rate}")
        require(self.relative_error_floor is None or self.relative_error_floor > 0, "relative_error_floor",
                f"must be null or positive, got {self.relative_error_floor}")
        require(self.max_images is None or self.max_images > 0, "max_images",
                f"must be null or a positive integer, got {self.max_images}")
        require(self.shuffle_buffer > 0, "shuffle_buffer", f"must be a positive integer, got {self.shuffle_buffer}")
        require(self.loader_workers >= 0, "loader_workers", f"must be >= 0, got {self.loader_workers}")
        require(self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker",
                f"must be null or positive, got {self.cpus_per_worker}")


# --------------------------------------------------------------------------------------------- job configs


@dataclass(kw_only=True)
class CorpusConfig(Config):
    output: str = "demo_output/corpus"
    n: int = 256
    shard_size: int = 64
    heldout_fraction: float = 0.25
    seed: int = 0
    image_size: int = 448
    document_fraction: float = 0.5

    def check(self) -> None:
        require(self.n >= 1, "n", f"got {self.n}, expected at least 1 sample")
        require(self.shard_size >= 1, "shard_size", f"got {self.shard_size}, expected at least 1")
        require(0.0 <= self.heldout_fraction < 1.0, "heldout_fraction",
                f"got {self.heldout_fraction}, expected a number in [0, 1)")
        require(0.0 <= self.document_fraction <= 1.0, "document_fraction",
                f"got {self.document_fraction}, expected a number in [0, 1]")
        require(self.image_size >= 64, "image_size", f"got {self.image_size}, expected at least 64 pixels")


@dataclass(kw_only=True)
class CompressConfig(Config):
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # ray: Ray Data over the cluster; local: the same stages in this process.
    executor: Literal["ray", "local"] = "ray"
    # List the shards still to do, write nothing.
    dry_run: bool = False
    # Seconds between progress lines.
    progress_interval_s: float = 10.0


@dataclass(kw_only=True)
class TrainSelectorConfig(Config):
    input: InputConfig = field(default_factory=InputConfig)
    output: str = "demo_output/selector"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resume: bool = True

    def check(self) -> None:
        require(self.train.selector_warmup_steps < self.train.steps, "train.selector_warmup_steps",
                f"must be in [0, steps={self.train.steps}), got {self.train.selector_warmup_steps}")


# --------------------------------------------------------------------------------------------- loading

T = TypeVar("T")
PRESET_SECTIONS = {"encoder": "encoder"}


def _allowed(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_allowed(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {_allowed(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: got {value!r}, expected null")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected {_allowed(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}, expected {_allowed(tp)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping of {tp.__name__} fields")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: got {value!r}, expected a string")
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # ``__post_init__`` named the key under the class's usual SECTION; name it under its path here instead.
        # (Sub-configs in ``kwargs`` were built, and their errors prefixed, by ``_coerce`` above.)
        section = getattr(cls, "SECTION", "")
        message = str(exc).removeprefix(f"{section}.") if section else str(exc)
        raise ConfigError(f"{prefix}{message}") from None


def config_file(name: str) -> Path:
    """``--config NAME``: the file as given when it exists, else the packaged one, so ``conf/compress.yaml``
    (or ``compress.yaml``, or ``compress``) works from any directory."""
    given = Path(name)
    if given.exists() or given.is_absolute():
        return given
    relative = Path(*given.parts[1:]) if given.parts[:1] == ("conf",) else given
    for candidate in (CONF_DIR / relative, CONF_DIR / relative.with_suffix(".yaml")):
        if candidate.is_file():
            return candidate
    return given


def config_names() -> list[str]:
    return sorted(p.name for p in CONF_DIR.glob("*.yaml"))


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"--config: file {path} does not exist; packaged configs: {', '.join(config_names())}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"--config: cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping")
    return data


def preset_names(section: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / section).glob("*.yaml"))


def _resolve_presets(data: dict[str, Any]) -> dict[str, Any]:
    """``encoder: clip-vit-l-336`` (a string where a section belongs) loads ``conf/encoder/clip-vit-l-336.yaml``."""
    for key, section in PRESET_SECTIONS.items():
        value = data.get(key)
        if isinstance(value, str):
            path = CONF_DIR / section / f"{value}.yaml"
            if not path.exists():
                raise ConfigError(f"{key}: unknown preset {value!r}; allowed: {', '.join(preset_names(section))}")
            data[key] = _load_yaml(path)
    return data


def _parse_dotlist(overrides: list[str]) -> list[dict[str, Any]]:
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value")
        key, _, raw = item.partition("=")
        try:
            value = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.from_dotlist([f"v={raw}"]).v}))["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
        node: dict[str, Any] = {}
        cursor = node
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        layers.append(node)
    return layers


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    for key, value in layer.items():
        if isinstance(value, str) and key in PRESET_SECTIONS:
            base[key] = _resolve_presets({key: value})[key]
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def _path_section(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds when that dataclass has a ``path`` field, else None."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for option in options:
        if dataclasses.is_dataclass(option) and "path" in {f.name for f in dataclasses.fields(option)}:
            return option
    return None


def _expand_shorthands(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``input=URL`` means ``input.path=URL`` wherever ``input`` is a section with a ``path`` field."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints or key in PRESET_SECTIONS:
            continue
        section = _path_section(hints[key]) if isinstance(value, str) else None
        if section is not None:
            data[key] = {"path": value}
        elif isinstance(value, dict):
            nested = next((a for a in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(a)), None)
            if nested is not None:
                _expand_shorthands(nested, value)
    return data


def load_config(cls: type[T], config_path: str | None = None, overrides: list[str] | None = None) -> T:
    """Defaults ← YAML file ← ``key=value`` overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if config_path:
        data = _expand_shorthands(cls, _resolve_presets(_load_yaml(config_file(config_path))))
    for layer in _parse_dotlist(overrides or []):
        data = _merge(data, _expand_shorthands(cls, layer))
    return _build(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def stable_hash(payload: Any, length: int = 16) -> str:
    """A hash of JSON-able data that does not depend on key order or Python version."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
