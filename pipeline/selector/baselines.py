"""Training-free selectors the learned one is measured against, behind the same ``TokenSelector`` interface."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from pipeline.config import ConfigError
from pipeline.selector.policy import mask_padding


def _per_image_max(values: Tensor, mask: Tensor) -> Tensor:
    return values.masked_fill(~mask, 0).amax(1, keepdim=True).clamp(min=1e-12)


class KeepAllSelector:
    """``none``: the full-token baseline (``select_tokens`` keeps every token for it in any mode)."""

    name = "none"

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        return mask_padding(torch.ones(mask.shape, device=mask.device), mask)

    def fingerprint(self) -> str:
        return self.name


class RandomSelector:
    """Uniform random scores from a generator seeded by (seed, sample key): the same image gets the same
    selection in any batch, on any worker, in any run."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _generator(self, key: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        if len(keys) != mask.shape[0]:
            raise ValueError(f"random selection needs one key per image: got {len(keys)} keys for {mask.shape[0]} images")
        scores = torch.zeros(mask.shape)
        cpu_mask = mask.cpu()
        for row, key in enumerate(keys):
            valid = cpu_mask[row]
            scores[row, valid] = torch.rand(int(valid.sum()), generator=self._generator(key))
        return mask_padding(scores.to(mask.device), mask)

    def fingerprint(self) -> str:
        return f"{self.name}:seed={self.seed}"


def bit_reversed_morton(rows: Tensor, cols: Tensor, bits: int) -> Tensor:
    """Interleave the bits of (row, col), then reverse them. Sorting a grid by this code visits a stride-2^k
    sub-grid before any cell of the next finer one, so its first k cells are spread evenly for any k."""
    code = torch.zeros_like(rows)
    for bit in range(bits):
        code |= ((cols >> bit) & 1) << (2 * bit)
        code |= ((rows >> bit) & 1) << (2 * bit + 1)
    reversed_code = torch.zeros_like(code)
    for bit in range(2 * bits):
        reversed_code |= ((code >> bit) & 1) << (2 * bits - 1 - bit)
    return reversed_code


class UniformSelector:
    """``uniform``: a spatial stride over each tile's grid, refined progressively (a coarse grid first, then the
    cells between), so ratio/budget keep an evenly spread subset and every tile gets its share."""

    name = "uniform"

    def __init__(self, side: int | None) -> None:
        self.side = side

    def _side(self, mask: Tensor) -> int:
        if self.side:
            return self.side
        counts = set(mask.sum(1).tolist())
        sides = {math.isqrt(n) for n in counts}
        if len(sides) != 1 or any(math.isqrt(n) ** 2 != n for n in counts):
            raise ConfigError(
                "selector.method=uniform needs the grid side for multi-tile (anyres) images; "
                "pass side=encoder.side to build_selector"
            )
        return sides.pop()

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        side = self._side(mask)
        position = torch.arange(mask.shape[1], device=mask.device)
        cell = position % (side * side)
        bits = max(1, math.ceil(math.log2(side)))
        # Equal codes in different tiles tie, and ties go in token order: tiles interleave at every level.
        code = bit_reversed_morton(cell // side, cell % side, bits).double()
        return mask_padding((1 - code / 4**bits).expand(mask.shape[0], -1), mask)

    def fingerprint(self) -> str:
        return self.name


class NormSelector:
    """``norm``: the token's L2 norm, as a fraction of the image's largest."""

    name = "norm"

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        norms = tokens.float().norm(dim=-1)
        return mask_padding(norms / _per_image_max(norms, mask), mask)

    def fingerprint(self) -> str:
        return self.name


class ClsAttentionSelector:
    """``cls_attention``: the encoder's last-layer [CLS]→patch attention (FasterVLM, VisionZip's dominant
    tokens), as a fraction of the image's largest."""

    name = "cls_attention"

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        if cls_attention is None:
            raise ConfigError(
                "selector.method=cls_attention needs the encoder's [CLS] attention, which this encoder did not "
                "supply (only CLIP towers have a [CLS] token); choose another selector.method or a CLIP encoder"
            )
        attention = cls_attention.float().to(mask.device)
        return mask_padding(attention / _per_image_max(attention, mask), mask)

    def fingerprint(self) -> str:
        return self.name


def diversity_ranks(tokens: Tensor, mask: Tensor, weight: Tensor | None = None) -> Tensor:
    """DivPrune's greedy max-min diversity over cosine distance: each token's place ``[B, N]`` in the picking
    order. The first pick is the token farthest from its nearest neighbour; each next one is the token farthest
    from everything picked so far.

    With ``weight [B, N]`` (e.g. learned keep scores) each candidate's min-distance is multiplied by its weight.
    Holds a ``[B, N, N]`` distance matrix; the loop is over picks, batched across images.
    """
    batch, length, _ = tokens.shape
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    distance = (1 - unit @ unit.transpose(1, 2)).clamp(min=0)
    others = mask[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=tokens.device)
    # A lone token has no neighbour (inf); any finite value lets it be picked.
    candidate = distance.masked_fill(~others, float("inf")).amin(-1).nan_to_num(posinf=0.0)
    weight = None if weight is None else weight.float().masked_fill(~mask, 0).clamp(min=0)
    if weight is not None:
        candidate = candidate * weight
    rows = torch.arange(batch, device=tokens.device)
    taken = torch.zeros_like(mask)
    ranks = torch.full(mask.shape, length, dtype=torch.long, device=tokens.device)
    min_distance: Tensor | None = None
    for step in range(int(mask.sum(1).max())):
        # Distances are >= 0, so real tokens go first, then padding (-1), never a token already taken (-2).
        pick = torch.where(taken, -2.0, torch.where(mask, candidate, -1.0)).argmax(1)
        ranks[rows, pick] = step
        taken[rows, pick] = True
        to_pick = distance[rows, pick]
        min_distance = to_pick if min_distance is None else torch.minimum(min_distance, to_pick)
        candidate = min_distance if weight is None else min_distance * weight
    return ranks


class DiversitySelector:
    """``diversity``: DivPrune's picking order as scores, so ratio/budget keep exactly its first k picks."""

    name = "diversity"

    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        valid = mask.sum(1, keepdim=True).clamp(min=1)
        return mask_padding(1 - diversity_ranks(tokens, mask).double() / valid, mask)

    def fingerprint(self) -> str:
        return self.name
