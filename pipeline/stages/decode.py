"""The decode stage (CPU): one input shard -> sample rows with uint8 tiles, quarantine rows and an end row."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from pipeline.config import CompressConfig
from pipeline.encoders import prepare_image
from pipeline.output.format import wds_key_problem
from pipeline.sources import Quarantined, ShardRef, iter_shard
from pipeline.sources.decode import DecodeError, decode_image
from pipeline.stages.gpu_decode import gpu_decode_requested, jpeg_size_for_gpu
from pipeline.stages.records import END, QUARANTINE, SAMPLE, decoded_row


def decode_on_cpu(data: bytes | None, cfg: CompressConfig) -> dict[str, Any]:
    """A sample row's image fields from its bytes: size, uint8 tiles, anyres grid. Raises DecodeError."""
    prepared = prepare_image(decode_image(data, cfg.decode), cfg.encoder)
    return {
        "width": prepared.original_size[0], "height": prepared.original_size[1],
        "pixels": np.ascontiguousarray(prepared.tiles).tobytes(), "n_tiles": prepared.tiles.shape[0],
        "grid_rows": prepared.grid[0], "grid_cols": prepared.grid[1],
    }


def decode_shard(shard: ShardRef, cfg: CompressConfig) -> Iterator[dict[str, Any]]:
    """CPU stage: read one input shard, decode and prepare each image; bad samples become quarantine rows.

    When JPEGs are decoded on the GPU, those nvJPEG can take pass on as bytes, checked from their header only.
    """
    storage_options = cfg.storage.storage_options()
    jpegs_to_gpu = gpu_decode_requested(cfg)
    emitted = 0
    for item in iter_shard(shard, cfg.input, storage_options):
        emitted += 1
        if isinstance(item, Quarantined):
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=item.reason)
            continue
        problem = wds_key_problem(item.key) if cfg.output.format == "webdataset" else None
        if problem:
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=problem)
            continue
        sample = {"kind": SAMPLE, "shard_id": shard.shard_id, "key": item.key,
                  "caption": item.meta.get("caption"), "json": item.meta.get("json")}
        size = jpeg_size_for_gpu(item.image, cfg.decode) if jpegs_to_gpu else None
        if size is not None:
            yield decoded_row(**sample, width=size[0], height=size[1], image=item.image)
            continue
        try:
            yield decoded_row(**sample, **decode_on_cpu(item.image, cfg))
        except DecodeError as exc:
            yield decoded_row(kind=QUARANTINE, shard_id=shard.shard_id, key=item.key, reason=str(exc))
    yield decoded_row(kind=END, shard_id=shard.shard_id, total=emitted, source_url=shard.url,
               source_fingerprint=shard.fingerprint)
