"""From uint8 tiles on the encoder's device to each image's kept tokens on the host, in the stored dtype.

Everything in between stays on the device: the tower's features, the per-image token sequences, the
selector's scores and keep-mask, the gather of the kept tokens and their cast to the stored dtype. Only the
kept tokens, their positions, counts and (optionally) scores cross to the host, in pinned asynchronous copies.
Nothing before the gather waits for the device, so a batch can be queued while the previous one is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.encoders import VisionEncoder
from pipeline.output.format import (
    MAX_BINARY_BYTES,
    binary_array,
    join_scales,
    quantize,
    storage_view,
    token_record_bytes,
)


def encode_tiles(encoder: VisionEncoder, tiles: Tensor, *, with_cls_attention: bool) -> tuple[Tensor, Tensor | None]:
    """uint8 ``[T, S, S, 3]`` on the encoder's device -> features ``[T, side*side, D]`` in the encoder's dtype
    (and the CLS attention ``[T, side*side]``), still on the device.

    Micro-batches of ``encoder.cfg.batch_size`` tiles; with ``encoder.compile`` the last one is padded, so the
    compiled graph sees a single batch shape.
    """
    batch = encoder.cfg.batch_size
    features, attentions = [], []
    for start in range(0, len(tiles), batch):
        chunk = tiles[start : start + batch]
        count = len(chunk)
        if encoder.cfg.compile and count < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - count, *chunk.shape[1:])])
        chunk_features, chunk_attention = encoder.encode_pixels(chunk, with_cls_attention=with_cls_attention)
        features.append(chunk_features[:count])
        if chunk_attention is not None:
            attentions.append(chunk_attention[:count])
    return _cat(features), _cat(attentions) if attentions else None


def _cat(chunks: list[Tensor]) -> Tensor:
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def per_image(per_tile: Tensor, tile_counts: list[int]) -> tuple[Tensor, Tensor]:
    """``[T, L, ...]`` per tile -> ``[B, N, ...]`` per image (tiles concatenated, zero-padded) and the valid mask.

    Never waits for the device: the layout comes from ``tile_counts``, on the host.
    """
    tokens_per_tile = per_tile.shape[1]
    rest = per_tile.shape[2:]
    if len(set(tile_counts)) == 1:  # every image has as many tiles (always so in plain mode): a free view
        tokens = per_tile.reshape(len(tile_counts), tile_counts[0] * tokens_per_tile, *rest)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    lengths = np.array(tile_counts) * tokens_per_tile
    longest = int(lengths.max())
    slots = np.concatenate([i * longest + np.arange(n) for i, n in enumerate(lengths)])
    valid = np.zeros(len(tile_counts) * longest, dtype=bool)
    valid[slots] = True
    tokens = per_tile.new_zeros(len(tile_counts) * longest, *rest)
    tokens.index_copy_(0, _to_device(torch.from_numpy(slots), per_tile.device), per_tile.reshape(-1, *rest))
    mask = _to_device(torch.from_numpy(valid), per_tile.device).view(len(tile_counts), longest)
    return tokens.view(len(tile_counts), longest, *rest), mask


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """An asynchronous copy: a pageable one would wait for everything queued on the stream."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


@dataclass
class KeptTokens:
    """A batch's kept tokens on the host: concatenated in image order, each image's in token order."""

    token_bytes: np.ndarray  # uint8: [sum n_kept, dim] little-endian in the stored dtype (+ float32 scale if quantized)
    bytes_per_token: int
    positions: np.ndarray  # int32 [sum n_kept]: each kept token's flat index in its image
    n_kept: np.ndarray  # int64 [B]
    scores: np.ndarray | None  # float16 [sum n_kept]

    def arrow_columns(self) -> Iterator[tuple[slice, dict[str, pa.Array]]]:
        """Per run of images whose tokens fit one Arrow binary array: the images, and their ``n_kept``,
        ``tokens``, ``positions`` and ``scores`` columns, built on these buffers without copying them."""
        ends = np.cumsum(self.n_kept)
        start = 0
        while start < len(self.n_kept):
            first = ends[start - 1] if start else 0
            fits = np.searchsorted(ends, first + MAX_BINARY_BYTES // self.bytes_per_token, side="right")
            stop = max(int(fits), start + 1)
            counts = self.n_kept[start:stop]
            tokens = slice(int(first), int(ends[stop - 1]))
            yield slice(start, stop), {
                "n_kept": pa.array(counts, pa.int32()),
                "tokens": binary_array(self.token_bytes[tokens.start * self.bytes_per_token
                                                         : tokens.stop * self.bytes_per_token],
                                        counts * self.bytes_per_token),
                "positions": binary_array(self.positions[tokens].view(np.uint8), counts * 4),
                "scores": (pa.nulls(len(counts), pa.binary()) if self.scores is None
                           else binary_array(self.scores[tokens].view(np.uint8), counts * 2)),
            }
            start = stop


def gather_kept(tokens: Tensor, scores: Tensor, keep: Tensor, dtype: str, *, with_scores: bool) -> KeptTokens:
    """The tokens where ``keep`` [B, N] is true, cast (or quantized, with per-token scales) to ``dtype`` on the
    device, then copied to the host."""
    index = keep.nonzero()  # [K, 2] (image, position), row-major: images in order, positions ascending
    kept, token_scales = quantize(tokens[index[:, 0], index[:, 1]], dtype)
    on_device = [kept, index[:, 1].to(torch.int32), keep.sum(1)]
    if with_scores:
        on_device.append(scores[index[:, 0], index[:, 1]].to(torch.float16))
    if token_scales is not None:
        on_device.append(token_scales)
    host = _to_host(on_device)
    stored = join_scales(storage_view(host[0], dtype), host[-1].numpy() if token_scales is not None else None)
    return KeptTokens(
        token_bytes=stored.reshape(-1).view(np.uint8),
        bytes_per_token=token_record_bytes(dtype, tokens.shape[-1]),
        positions=host[1].numpy().astype("<i4", copy=False),
        n_kept=host[2].numpy().astype(np.int64, copy=False),
        scores=host[3].numpy().astype("<f2", copy=False) if with_scores else None,
    )


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """Asynchronous copies into pinned memory, then one wait for all of them."""
    device = tensors[0].device
    if device.type != "cuda":
        return tensors
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    torch.cuda.current_stream(device).synchronize()
    return host
