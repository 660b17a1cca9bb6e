"""Labelled images for evaluation: read any input the pipeline reads, keep each sample's json ground truth,
encode in batches and pad to a common length."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from PIL import Image

from pipeline.config import DecodeConfig, InputConfig
from pipeline.encoders import EncodedImage, VisionEncoder
from pipeline.selector.training import TokenBatch, pad_token_sets
from pipeline.sources import Quarantined, iter_shard, list_shards
from pipeline.sources.decode import DecodeError, decode_image

log = logging.getLogger(__name__)


@dataclass
class LabelledImage:
    key: str
    image: Image.Image
    meta: dict[str, Any]  # the sample's json: family, text_boxes, probe labels

    @property
    def family(self) -> str:
        return str(self.meta.get("family", "unknown"))


def sample_json(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The sample's ``json`` member as a dict (sources pass it through as bytes, text or already parsed)."""
    raw = meta.get("json")
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (bytes, str)):
        try:
            parsed = json.loads(raw)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def iter_labelled_images(
    input_cfg: InputConfig, decode_cfg: DecodeConfig, storage_options: dict[str, Any], limit: int | None = None
) -> Iterator[LabelledImage]:
    """Decoded images with their ground truth, in shard order; samples that cannot be read or carry no json
    ``family`` are skipped and counted in one log line at the end."""
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    def labelled() -> Iterator[LabelledImage]:
        for shard in list_shards(input_cfg, storage_options):
            for item in iter_shard(shard, input_cfg, storage_options):
                if isinstance(item, Quarantined):
                    skip("unreadable")
                    continue
                meta = sample_json(item.meta)
                if meta is None or "family" not in meta:
                    skip("no json family")
                    continue
                try:
                    image = decode_image(item.image, decode_cfg)
                except DecodeError:
                    skip("undecodable")
                    continue
                yield LabelledImage(item.key, image, meta)

    yield from islice(labelled(), limit)
    if skipped:
        log.info(f"[evaluate] {input_cfg.path}: skipped " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


@dataclass(kw_only=True)
class EncodedBatch(TokenBatch):
    """Encoded images padded to a common length, with the images' own records (size, grid)."""

    encoded: list[EncodedImage]


def pad_encoded(encoded: list[EncodedImage]) -> EncodedBatch:
    attention = [e.cls_attention for e in encoded] if all(e.cls_attention is not None for e in encoded) else None
    padded = pad_token_sets([e.tokens for e in encoded], attention)
    return EncodedBatch(padded.tokens, padded.mask, padded.cls_attention, encoded=encoded)


def encode_batch(encoder: VisionEncoder, images: list[LabelledImage], with_cls_attention: bool = False) -> EncodedBatch:
    return pad_encoded(encoder.encode_images([item.image for item in images], with_cls_attention=with_cls_attention))
