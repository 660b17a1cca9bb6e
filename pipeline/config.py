"""Typed job configs.

Dataclasses are the source of truth; OmegaConf only merges YAML files and ``key=value`` overrides into
plain dicts, and :func:`build` turns the result into dataclasses, rejecting unknown keys, wrong types and
values outside a ``Literal`` with a :class:`ConfigError` that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A user-caused configuration problem; jobs print it as one line and exit 2."""


# --------------------------------------------------------------------------------------------- sub-configs


@dataclass(kw_only=True)
class EncoderConfig:
    """A vision tower. ``pretrained`` set: ``from_pretrained(pretrained)``; unset: seeded random init."""

    name: str = "tiny"
    family: Literal["clip", "siglip"] = "clip"
    pretrained: str | None = None
    local_files_only: bool = False
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 3
    intermediate_size: int = 768
    select_layer: int = -2
    # CLIP drops its CLS token from the features (LLaVA's "patch" strategy); SigLIP has none.
    select_feature: Literal["patch", "cls_patch"] = "patch"
    # How a non-square image becomes the model's square input: CLIP's processor resizes the short side and
    # centre-crops; SigLIP's resizes both sides; "pad" letterboxes with the mean colour (LLaVA's "pad").
    resize_mode: Literal["shortest_edge_crop", "squash", "pad"] = "shortest_edge_crop"
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    anyres: bool = False
    image_grid_pinpoints: list[list[int]] = field(
        default_factory=lambda: [[448, 448], [224, 448], [448, 224], [672, 224], [224, 672]]
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    seed: int = 0
    batch_size: int = 32
    compile: bool = False

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.patch_size
        return side * side


@dataclass(kw_only=True)
class StorageConfig:
    """fsspec options for ``s3://`` paths. Keys and secrets come from the environment, never from here."""

    endpoint_url: str | None = None
    region: str | None = None
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


@dataclass(kw_only=True)
class InputConfig:
    path: str = "demo_output/corpus/train"
    format: Literal["auto", "webdataset", "parquet", "folder"] = "auto"
    image_column: str | None = None
    key_column: str = "key"
    # Folder inputs: how many images make one shard (the unit of work and of commit).
    folder_shard_size: int = 256


@dataclass(kw_only=True)
class DecodeConfig:
    max_pixels: int = 50_000_000
    max_bytes: int = 64 * 1024 * 1024
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(kw_only=True)
class SelectorConfig:
    """Which tokens to keep. ``method=none`` keeps all (the full-token baseline)."""

    method: Literal["learned", "none", "random", "uniform", "norm", "cls_attention", "diversity"] = "learned"
    checkpoint: str | None = None
    mode: Literal["threshold", "ratio", "budget"] = "threshold"
    threshold: float = 0.5
    ratio: float = 0.5
    budget: int = 64
    min_tokens: int = 1
    seed: int = 0
    store_scores: bool = False


@dataclass(kw_only=True)
class SelectorModelConfig:
    """The paper's selector (3 layers + keep/drop head) and reconstructor (3 layers)."""

    width: int = 256
    selector_layers: int = 3
    reconstructor_layers: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_positions: int = 4096


@dataclass(kw_only=True)
class OutputConfig:
    path: str = "demo_output/compressed"
    format: Literal["parquet", "webdataset"] = "parquet"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    row_group_size: int = 256


@dataclass(kw_only=True)
class RayConfig:
    address: str | None = None
    num_actors_min: int = 1
    num_actors_max: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    decode_num_cpus: float = 1.0
    max_restarts: int = 2
    max_task_retries: int = 2
    max_retries: int = 2


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    temperature_schedule: Literal["exponential", "cosine"] = "exponential"
    sparsity_weight: float = 0.5
    # None: the sparsity term is the mean keep probability; set: its squared distance to this rate.
    target_keep_rate: float | None = None
    loss: Literal["mse", "cosine"] = "mse"
    num_workers: int = 1
    use_gpu: bool = False
    # Torch threads (and Ray CPUs) per worker; None: the cluster's CPUs split evenly over the workers.
    cpus_per_worker: int | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # Images encoded and cached per run (split over the workers); None: every image of the input.
    max_images: int | None = None


# --------------------------------------------------------------------------------------------- job configs


@dataclass(kw_only=True)
class CorpusConfig:
    output: str = "demo_output/corpus"
    n: int = 256
    shard_size: int = 64
    heldout_fraction: float = 0.25
    seed: int = 0
    image_size: int = 448
    document_fraction: float = 0.5


@dataclass(kw_only=True)
class CompressConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    executor: Literal["ray", "local"] = "ray"
    dry_run: bool = False
    progress_interval_s: float = 10.0


@dataclass(kw_only=True)
class TrainSelectorConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: str = "demo_output/selector"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: SelectorModelConfig = field(default_factory=SelectorModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    resume: bool = True


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
    return cls(**kwargs)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"--config: file {path} does not exist")
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


def load_config(cls: type[T], config_path: str | None = None, overrides: list[str] | None = None) -> T:
    """Defaults ← YAML file ← ``key=value`` overrides, validated into ``cls``."""
    data: dict[str, Any] = {}
    if config_path:
        data = _resolve_presets(_load_yaml(Path(config_path)))
    for layer in _parse_dotlist(overrides or []):
        data = _merge(data, layer)
    return _build(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def stable_hash(payload: Any, length: int = 16) -> str:
    """A hash of JSON-able data that does not depend on key order or Python version."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
