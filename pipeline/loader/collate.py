"""Batches of pruned samples: padded to the longest sequence, or packed to a token budget.

A sample (from :class:`pipeline.loader.PrunedTokenDataset`) is a dict with ``key``, ``tokens`` ``[n_kept, D]``
(float32 unless the dataset was asked for another dtype; batches keep it), ``positions`` int64 ``[n_kept]``,
``n_tokens``, ``grid`` ``(rows, cols)``, ``side`` and any passthrough columns (``caption`` ...). Packing is
where adaptive token counts pay off: a batch holds as many samples as fit the budget instead of padding every
sample to the longest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.loader.shared_batches import pooled_empty

SAMPLE_FIELDS = ("key", "tokens", "token_scales", "positions", "n_tokens", "grid", "side")


def _common(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What padded and packed batches share: keys, per-sample geometry and passthrough lists."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    sides = {s["side"] for s in samples}
    if len(sides) != 1:
        raise ValueError(f"samples mix token grids of side {sorted(sides)}; they come from different outputs")
    passthrough = [name for name in samples[0] if name not in SAMPLE_FIELDS]
    return {
        "keys": [s["key"] for s in samples],
        "n_tokens": _in_batch(torch.tensor([s["n_tokens"] for s in samples], dtype=torch.int64)),
        "grid": _in_batch(torch.tensor([s["grid"] for s in samples], dtype=torch.int64).reshape(len(samples), 2)),
        "side": sides.pop(),
        **{name: [s[name] for s in samples] for name in passthrough},
    }


def _lengths(samples: Sequence[dict[str, Any]]) -> torch.Tensor:
    return torch.tensor([s["tokens"].shape[0] for s in samples], dtype=torch.int64)


def _empty(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor for a batch; inside a DataLoader worker in shared memory already, as ``default_collate`` does, so
    handing it to the training loop does not copy it again (from the worker's reused buffers under
    :class:`pipeline.loader.shared_batches.PooledCollate`)."""
    pooled = pooled_empty()
    if pooled is not None:
        return pooled(like.dtype, shape)
    if get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype)
    numel = 1
    for size in shape:
        numel *= size
    return like.new(like._typed_storage()._new_shared(numel, device="cpu")).view(shape)


def _in_batch(values: torch.Tensor) -> torch.Tensor:
    """A small computed tensor, copied into the batch's pooled buffer while one is active (one shared-memory
    segment per batch); else as it is."""
    pooled = pooled_empty()
    if pooled is None:
        return values
    out = pooled(values.dtype, tuple(values.shape))
    out.copy_(values)
    return out


def _padded(tensors: Sequence[torch.Tensor], length: int, value: float) -> torch.Tensor:
    out = _empty(tensors[0], (len(tensors), length, *tensors[0].shape[1:]))
    for row, tensor in zip(out, tensors):
        n = tensor.shape[0]
        row[:n].copy_(tensor)
        row[n:].fill_(value)
    return out


def pad_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``tokens [B, L, D]`` (zeros in padding), ``attention_mask [B, L]`` bool, ``positions [B, L]`` (-1 in padding).

    Tokens keep the samples' dtype: with the stored float16 the batch is half the bytes; cast on the device.
    Quantized samples as stored add ``token_scales [B, L]`` (0 in padding).
    """
    batch = _common(samples)
    lengths = _lengths(samples)
    longest = int(lengths.max())
    tokens = _padded([s["tokens"] for s in samples], longest, 0)
    positions = _padded([s["positions"] for s in samples], longest, -1)
    attention_mask = _in_batch(torch.arange(tokens.shape[1])[None, :] < lengths[:, None])
    if "token_scales" in samples[0]:  # quantized, as stored: dequantized on the device
        batch["token_scales"] = _padded([s["token_scales"] for s in samples], longest, 0)
    return {"tokens": tokens, "attention_mask": attention_mask, "positions": positions, "lengths": _in_batch(lengths),
            **batch}


def pack_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sequences concatenated: ``tokens [T, D]``, ``positions [T]``, ``cu_seqlens [B+1]`` int32 (varlen attention)."""
    batch = _common(samples)
    lengths = _lengths(samples)
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    token_list = [s["tokens"] for s in samples]
    tokens = _empty(token_list[0], (int(lengths.sum()), *token_list[0].shape[1:]))
    torch.cat(token_list, out=tokens)
    if "token_scales" in samples[0]:
        batch["token_scales"] = _in_batch(torch.cat([s["token_scales"] for s in samples]))
    return {
        "tokens": tokens,
        "positions": _in_batch(torch.cat([s["positions"] for s in samples])),
        "cu_seqlens": _in_batch(cu_seqlens),
        "max_seqlen": int(lengths.max()),
        "lengths": _in_batch(lengths),
        **batch,
    }


def pack_samples(
    samples: Iterable[dict[str, Any]], max_tokens: int, max_samples: int | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Greedy, order-preserving groups of at most ``max_tokens`` kept tokens (and ``max_samples`` samples)."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    group: list[dict[str, Any]] = []
    total = 0
    for sample in samples:
        n = sample["tokens"].shape[0]
        if n > max_tokens:
            raise ValueError(
                f"sample {sample['key']!r} keeps {n} tokens, more than max_tokens={max_tokens}; raise max_tokens"
            )
        if group and (total + n > max_tokens or len(group) == max_samples):
            yield group
            group, total = [], 0
        group.append(sample)
        total += n
    if group:
        yield group


class TokenBudgetBatcher(IterableDataset):
    """Wraps a sample dataset; yields collated batches of at most ``max_tokens`` kept tokens each.

    Run it inside DataLoader workers (``batch_size=None``) so each worker packs its own stream.
    """

    def __init__(
        self,
        dataset: Iterable[dict[str, Any]],
        max_tokens: int,
        collate: Callable[[list[dict[str, Any]]], Any] = pack_collate,
        max_samples: int | None = None,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.dataset = dataset
        self.max_tokens = max_tokens
        self.collate = collate
        self.max_samples = max_samples

    def __iter__(self) -> Iterator[Any]:
        for group in pack_samples(self.dataset, self.max_tokens, self.max_samples):
            yield self.collate(group)
