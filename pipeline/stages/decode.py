"""The decode stage (CPU): one input shard -> sample rows with uint8 tiles, quarantine rows and an end row.

One sample never ends a shard: the key policy, the size bounds (checked from the header, before any pixel is
decoded) and any failure while decoding or preparing an image, MemoryError included, quarantine that sample.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from pipeline.config import CompressConfig
from pipeline.encoders import prepare_image
from pipeline.encoders.geometry import preparation_pixels
from pipeline.output.format import key_problem
from pipeline.sources import Quarantined, ShardRef, iter_shard
from pipeline.sources.decode import DecodeError, aspect_ratio_problem, decode_image
from pipeline.stages.gpu_decode import gpu_decode_requested, jpeg_size_for_gpu
from pipeline.stages.records import END, QUARANTINE, SAMPLE, decoded_row

log = logging.getLogger(__name__)

# How many pixels preparing an image may hold beyond the image, in units of decode.max_pixels.
PREPARATION_PIXELS_PER_MAX_PIXELS = 2


def size_problem(size: tuple[int, int], cfg: CompressConfig) -> str | None:
    """Why an image of ``size`` (width, height) costs too much to prepare for the encoder, or None."""
    problem = aspect_ratio_problem(size, cfg.decode)
    if problem:
        return problem
    needed, bound = preparation_pixels(size, cfg.encoder), PREPARATION_PIXELS_PER_MAX_PIXELS * cfg.decode.max_pixels
    if needed > bound:
        return (f"extreme aspect ratio: preparing {size[0]}x{size[1]} for encoder.resize_mode="
                f"{'anyres' if cfg.encoder.anyres else cfg.encoder.resize_mode} takes {needed} pixels > {bound} "
                f"({PREPARATION_PIXELS_PER_MAX_PIXELS} x decode.max_pixels)")
    return None


def decode_on_cpu(data: bytes | None, cfg: CompressConfig) -> dict[str, Any]:
    """A sample row's image fields from its bytes: size, uint8 tiles, anyres grid. Raises DecodeError."""
    image = decode_image(data, cfg.decode, lambda size: size_problem(size, cfg))
    try:
        prepared = prepare_image(image, cfg.encoder)
    except MemoryError as exc:
        raise DecodeError(f"out of memory: preparing a {image.width}x{image.height} image: {exc}") from None
    return {
        "width": prepared.original_size[0], "height": prepared.original_size[1],
        "pixels": np.ascontiguousarray(prepared.tiles).tobytes(), "n_tiles": prepared.tiles.shape[0],
        "grid_rows": prepared.grid[0], "grid_cols": prepared.grid[1],
    }


def decode_shard(shard: ShardRef, cfg: CompressConfig) -> Iterator[dict[str, Any]]:
    """CPU stage: read one input shard, decode and prepare each image; bad samples become quarantine rows.

    When JPEGs are decoded on the GPU, those nvJPEG can take pass on as bytes, checked from their header only.
    The end row counts the rows (what the committer waits for) and the input samples they stand for.
    """
    storage_options = cfg.storage.storage_options()
    jpegs_to_gpu = gpu_decode_requested(cfg)
    emitted = samples = 0
    for item in iter_shard(shard, cfg.input, storage_options):
        emitted += 1
        if isinstance(item, Quarantined):
            samples += 1 if item.samples is None else item.samples
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=item.reason,
                              samples=item.samples)
            continue
        samples += 1
        problem = key_problem(item.key)
        if problem:
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=problem, samples=1)
            continue
        sample = {"kind": SAMPLE, "shard_id": shard.shard_id, "key": item.key, "source_bytes": len(item.image or b""),
                  "caption": item.meta.get("caption"), "json": item.meta.get("json")}
        size = jpeg_size_for_gpu(item.image, cfg.decode) if jpegs_to_gpu else None
        if size is not None and size_problem(size, cfg) is None:
            yield decoded_row(**sample, width=size[0], height=size[1], image=item.image)
            continue
        try:
            yield decoded_row(**sample, **decode_on_cpu(item.image, cfg))
        except DecodeError as exc:
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=str(exc), samples=1)
        except Exception as exc:  # noqa: BLE001 - a bug or a library's surprise on one image must not end the shard
            log.warning(f"[decode] {shard.shard_id}/{item.key}: {type(exc).__name__}: {exc}")
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, samples=1,
                              reason=f"corrupt: preparing the image failed: {type(exc).__name__}: {exc}")
    yield decoded_row(kind=END, shard_id=shard.shard_id, total=emitted, samples=samples, source_url=shard.url,
                      source_fingerprint=shard.fingerprint)
