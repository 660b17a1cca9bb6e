"""One interface over Hugging Face CLIP and SigLIP vision towers: uint8 tiles in, patch tokens of one layer out.

Features are LLaVA's: ``hidden_states[select_layer]`` (pre-final-norm), CLIP's CLS token dropped. The tower runs
only the layers that layer needs, so the default ``select_layer=-2`` skips the last layer (and SigLIP's pooling
head) instead of computing and discarding them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from pipeline.config import ConfigError, EncoderConfig, JobError
from pipeline.encoders.geometry import PreparedImage, check_geometry, prepare_image
from pipeline.failures import hub_failure, hub_offline, hub_reachable

log = logging.getLogger(__name__)

TOWERS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# EncoderConfig field -> the HF vision config attribute it must equal.
CHECKED_FIELDS = {
    "image_size": "image_size",
    "patch_size": "patch_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}


@dataclass
class EncodedImage:
    tokens: torch.Tensor  # float32 CPU [N, D], N = tiles * side**2
    positions: torch.Tensor  # int64 [N], arange(N)
    grid: tuple[int, int]  # anyres (rows, cols); (0, 0) in plain mode
    side: int
    cls_attention: torch.Tensor | None = None  # float32 [N]: last layer's CLS -> patch attention (CLIP only)


# --------------------------------------------------------------------------------------------- building


def build_tower(cfg: EncoderConfig) -> PreTrainedModel:
    """``cfg.pretrained`` loaded in float32, or a random init seeded by ``cfg.seed`` (same seed, same weights)."""
    config_cls, model_cls = TOWERS[cfg.family]
    if cfg.pretrained:
        # Offline, or a hub id on a host that cannot reach the hub: the cache alone, so a failure comes in
        # seconds rather than after huggingface_hub's retries.
        reachable = cfg.local_files_only or hub_offline() or os.path.isdir(cfg.pretrained) or hub_reachable()
        try:
            tower = model_cls.from_pretrained(
                cfg.pretrained, local_files_only=cfg.local_files_only or hub_offline() or not reachable,
                dtype=torch.float32, attn_implementation="sdpa",
            )
        except OSError as exc:
            message = hub_failure(exc, cfg.pretrained, cfg.local_files_only, reachable)
            if message is None:
                raise
            raise JobError(f"encoder {cfg.name!r}: {message}") from exc
        check_tower_matches(tower.config, cfg)
        return tower
    config = config_cls(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's random stream
        torch.manual_seed(cfg.seed)
        return model_cls(config)


PREPROCESSOR_FILE = "preprocessor_config.json"


@functools.lru_cache(maxsize=16)
def _checkpoint_processor(pretrained: str, local_files_only: bool) -> tuple[tuple[str, Any], ...] | None:
    """The checkpoint's image processor parameters (``preprocessor_config.json``), or None when it has none."""
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, PREPROCESSOR_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return tuple(sorted(json.load(handle).items()))
    from transformers.image_processing_utils import ImageProcessingMixin

    offline = local_files_only or hub_offline() or not hub_reachable()
    try:
        found, _ = ImageProcessingMixin.get_image_processor_dict(pretrained, local_files_only=offline)
    except OSError as exc:
        from huggingface_hub import try_to_load_from_cache

        if offline and not isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
            return None  # the model is not here at all: loading it next fails with the one line that says so
        log.warning(f"encoder.pretrained={pretrained!r}: no {PREPROCESSOR_FILE} could be read ({exc}); "
                    "using the preset's image_mean / image_std / resize_mode")
        return None
    return tuple(sorted(found.items()))


def checkpoint_preprocessing(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` with image_mean, image_std and resize_mode taken from the checkpoint's image processor when
    ``pretrained`` is set (and ``preprocessor=checkpoint``): a checkpoint saved with its own normalisation is
    encoded with it. A preset value that disagrees is replaced, with one warning naming both values."""
    if not cfg.pretrained or cfg.preprocessor == "config":
        return cfg
    items = _checkpoint_processor(cfg.pretrained, cfg.local_files_only)
    if items is None:
        return cfg
    processor = dict(items)
    found: dict[str, Any] = {}
    for name in ("image_mean", "image_std"):
        value = processor.get(name)
        if isinstance(value, (list, tuple)) and len(value) == 3:
            found[name] = [float(v) for v in value]
        elif isinstance(value, (int, float)):
            found[name] = [float(value)] * 3
    size = processor.get("size") or {}
    if cfg.resize_mode != "pad":  # letterboxing is LLaVA's choice on top of the processor, kept as configured
        if processor.get("do_center_crop"):
            found["resize_mode"] = "shortest_edge_crop"
        elif isinstance(size, dict) and "height" in size and "width" in size:
            found["resize_mode"] = "squash"
    changed = {}
    for name, value in found.items():
        current = getattr(cfg, name)
        same = (current == value if isinstance(value, str)
                else np.allclose(np.asarray(current, dtype=float), value, rtol=0, atol=1e-7))
        if not same:
            changed[name] = value
            log.warning(f"encoder.{name}={current} (preset {cfg.name!r}) disagrees with {cfg.pretrained}'s "
                        f"{PREPROCESSOR_FILE} ({name}={value}); using the checkpoint's value "
                        "(encoder.preprocessor=config keeps the preset's)")
    return dataclasses.replace(cfg, **changed) if changed else cfg


def check_tower_matches(tower_config, cfg: EncoderConfig) -> None:
    wrong = [
        f"encoder.{field}={getattr(cfg, field)} (the checkpoint has {getattr(tower_config, attr)})"
        for field, attr in CHECKED_FIELDS.items()
        if getattr(cfg, field) != getattr(tower_config, attr)
    ]
    if wrong:
        raise ConfigError(
            f"encoder.pretrained={cfg.pretrained!r} does not match " + ", ".join(wrong) + "; fix those keys"
        )


def weights_fingerprint(tower: torch.nn.Module) -> str:
    """sha256 over the state dict: names, shapes, dtypes and bytes, in name order.

    Names drop transformers 4's ``vision_model.`` prefix so the same checkpoint hashes alike under 4.x and 5.x.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(f"{name.removeprefix('vision_model.')}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"encoder.device={name}: this process sees {torch.cuda.device_count()} CUDA devices "
                          f"(torch {torch.__version__}); use auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --------------------------------------------------------------------------------------------- maths


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W]: rescale to [0, 1], then (x - mean) / std, as the processors do."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def cls_patch_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``layer``'s attention from the CLS query to each patch key, averaged over heads: [B, L - 1] float32.

    Only the CLS row is computed, from the layer's own q/k projections, so the tower keeps its SDPA kernels
    instead of materialising every attention map in eager mode.
    """
    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    batch, length, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(x).view(batch, length, heads, head_dim).transpose(1, 2)
    logits = query.float() @ keys.float().transpose(-1, -2) * attention.scale
    return logits.softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


# --------------------------------------------------------------------------------------------- encoder


class VisionEncoder(torch.nn.Module):
    """A frozen vision tower on ``cfg.device``; ``prepare`` is CPU-only, everything after runs on the device.

    Tensors from ``forward``/``encode_pixels`` are inference tensors (clone them before autograd use); those in
    ``EncodedImage`` are ordinary tensors.
    """

    def __init__(self, tower: PreTrainedModel, cfg: EncoderConfig) -> None:
        super().__init__()
        check_geometry(cfg)
        num_layers = tower.config.num_hidden_layers
        if not -num_layers - 1 <= cfg.select_layer <= num_layers:
            raise ConfigError(
                f"encoder.select_layer={cfg.select_layer}: the tower has hidden states -{num_layers + 1}..{num_layers}"
            )
        self.cfg = cfg
        # Hashed before the dtype cast, so one checkpoint has one fingerprint on every device and dtype.
        self._fingerprint = weights_fingerprint(tower)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.tower = tower.eval().requires_grad_(False).to(self.device, self.dtype)
        self.hidden_size = tower.config.hidden_size
        self.side = cfg.image_size // cfg.patch_size
        self.tokens_per_tile = self.side * self.side
        self._feature_depth = cfg.select_layer % (num_layers + 1)  # hidden_states[k] is the output of k layers
        self.register_buffer("_mean", torch.tensor(cfg.image_mean, device=self.device), persistent=False)
        self.register_buffer("_std", torch.tensor(cfg.image_std, device=self.device), persistent=False)
        self._compiled = torch.compile(self._run, dynamic=False) if cfg.compile else None

    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> VisionEncoder:
        cfg = checkpoint_preprocessing(cfg)  # a pretrained tower is fed as its own image processor would feed it
        return cls(build_tower(cfg), cfg)

    def fingerprint(self) -> str:
        return self._fingerprint

    def prepare(self, image: Image.Image) -> PreparedImage:
        return prepare_image(image, self.cfg)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, image_size, image_size, 3] -> features [B, side*side, D] in the encoder's dtype, on its device."""
        return self.encode_pixels(pixels)[0]

    @torch.inference_mode()
    def encode_pixels(
        self, pixels: torch.Tensor, *, with_cls_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``, plus the last layer's CLS -> patch attention [B, side*side] when asked (CLIP only)."""
        if with_cls_attention and self.cfg.family != "clip":
            raise ConfigError(
                f"CLS attention needs encoder.family=clip; {self.cfg.name} is {self.cfg.family} (no CLS token)"
            )
        pixels = pixels.to(self.device, non_blocking=True)
        if self._compiled is not None:
            try:
                return self._compiled(pixels, with_cls_attention)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to the same eager code
                log.warning("encoder.compile: torch.compile failed (%s: %s); running eagerly", type(exc).__name__, exc)
                self._compiled = None
        return self._run(pixels, with_cls_attention)

    def _run(self, pixels: torch.Tensor, with_cls_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.tower.embeddings(normalize_pixels(pixels, self._mean, self._std).to(self.dtype))
        if self.cfg.family == "clip":
            hidden = self.tower.pre_layrnorm(hidden)
        layers = self.tower.encoder.layers
        last = len(layers) - 1
        # CLS attention needs the last layer's input, hidden_states[last], whatever layer the features come from.
        stop = max(self._feature_depth, last) if with_cls_attention else self._feature_depth
        features = cls_attention = None
        for depth in range(stop + 1):  # here ``hidden`` is hidden_states[depth]
            if depth == self._feature_depth:
                features = hidden
            if with_cls_attention and depth == last:
                cls_attention = cls_patch_attention(layers[last], hidden)
            if depth < stop:
                hidden = layers[depth](hidden, None)
        if self.cfg.family == "clip":
            features = features[:, 1:]
        return features, cls_attention

    def encode_prepared(self, images: list[PreparedImage], *, with_cls_attention: bool = False) -> list[EncodedImage]:
        """All tiles of all images in micro-batches of ``cfg.batch_size``; tokens come back per image."""
        if not images:
            return []
        tiles = np.concatenate([image.tiles for image in images])
        batch = self.cfg.batch_size
        on_cuda = self.device.type == "cuda"
        feature_chunks, attention_chunks = [], []
        for start in range(0, len(tiles), batch):
            chunk = torch.from_numpy(tiles[start : start + batch])
            count = len(chunk)
            if self._compiled is not None and count < batch:  # one fixed shape: the compiled graph is reused
                chunk = torch.cat([chunk, chunk.new_zeros(batch - count, *chunk.shape[1:])])
            chunk = chunk.pin_memory() if on_cuda else chunk
            features, attention = self.encode_pixels(chunk, with_cls_attention=with_cls_attention)
            # Asynchronous copies (into pinned memory, in the tower's dtype) overlap the next micro-batch.
            feature_chunks.append(features[:count].to("cpu", non_blocking=True))
            if attention is not None:
                attention_chunks.append(attention[:count].to("cpu", non_blocking=True))
        if on_cuda:
            torch.cuda.synchronize(self.device)
        # Outside inference mode, cat makes ordinary tensors that training code may feed to autograd.
        features = torch.cat(feature_chunks).float().reshape(-1, self.hidden_size)
        counts = [len(image.tiles) * self.tokens_per_tile for image in images]
        attentions = (
            torch.cat(attention_chunks).reshape(-1).split(counts) if with_cls_attention else [None] * len(images)
        )
        return [
            EncodedImage(tokens=tokens, positions=torch.arange(len(tokens)), grid=tuple(image.grid), side=self.side,
                         cls_attention=attention)
            for image, tokens, attention in zip(images, features.split(counts), attentions)
        ]

    def encode_images(self, images: list[Image.Image], *, with_cls_attention: bool = False) -> list[EncodedImage]:
        return self.encode_prepared([self.prepare(image) for image in images], with_cls_attention=with_cls_attention)
