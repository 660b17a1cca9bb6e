"""The interface every selector implements, and how keep scores become a keep-mask.

Scores are in [0, 1] for every method (higher = keep; padding = -inf), so ``threshold`` means the same kind of
thing whichever method produced them: a keep probability for the learned selector, a fraction of the strongest
token's value for norm and [CLS]-attention, a place in the picking order for uniform and diversity.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from pipeline.config import SelectorConfig


class TokenSelector(Protocol):
    name: str

    def scores(
        self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None
    ) -> Tensor:
        """``tokens [B, N, D]``, ``mask [B, N]`` (True = real token) → keep scores ``[B, N]``, -inf at padding."""
        ...

    def fingerprint(self) -> str:
        """Identifies what the scores depend on, for the run's ``cfg_hash``."""
        ...


def choose_tokens(selector: TokenSelector, tokens: Tensor, mask: Tensor, cfg: SelectorConfig, *, keys: list[str],
                  cls_attention: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(scores, keep-mask) of ``selector`` in ``cfg``'s mode. A selector whose choice is not a cut of fixed
    scores (the set-aware learned one in threshold and error modes) has a ``select`` of its own."""
    select = getattr(selector, "select", None)
    if select is not None:
        return select(tokens, mask, cfg, keys=keys, cls_attention=cls_attention)
    if cfg.mode == "error":
        raise ValueError(f"selector.mode=error needs a learned selector, not {selector.name}")
    scores = selector.scores(tokens, mask, keys=keys, cls_attention=cls_attention)
    return scores, select_tokens(scores, mask.to(scores.device), cfg)


def mask_padding(scores: Tensor, mask: Tensor) -> Tensor:
    return scores.float().masked_fill(~mask, float("-inf"))


def score_ranks(scores: Tensor, mask: Tensor) -> Tensor:
    """Each token's place ``[B, N]`` in its image's descending score order (0 = best); ties keep token order,
    padding comes last."""
    finite = torch.where(mask, scores.float().nan_to_num(nan=-1e30, neginf=-1e30), float("-inf"))
    order = finite.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def select_tokens(scores: Tensor, mask: Tensor, cfg: SelectorConfig) -> Tensor:
    """Keep-mask ``[B, N]`` bool. The kept tokens are those where it is True, in their original order.

    ``threshold``: score ≥ ``cfg.threshold`` (count varies per image); ``ratio``: the top ⌈ratio·n⌉;
    ``budget``: the top ``budget``. Every mode keeps at least ``min_tokens`` (or all n when fewer), never
    padding. ``method=none`` keeps every token whatever the mode.
    """
    if cfg.method == "none":
        return mask.clone()
    assert cfg.mode != "error", "mode=error is the learned selector's select(), not a cut of scores"
    valid = mask.sum(1)
    floor = valid.clamp(max=cfg.min_tokens)
    ranks = score_ranks(scores, mask)
    if cfg.mode == "threshold":
        # The top-`floor` tokens are kept anyway; when enough pass the threshold they are among them.
        return mask & ((scores >= cfg.threshold) | (ranks < floor[:, None]))
    if cfg.mode == "ratio":
        # The small epsilon keeps ratio·n that is an integer in exact arithmetic from rounding up a token.
        count = torch.ceil(valid.double() * cfg.ratio - 1e-9).long()
    else:
        count = torch.full_like(valid, cfg.budget)
    count = torch.maximum(count, floor).minimum(valid)
    return mask & (ranks < count[:, None])

