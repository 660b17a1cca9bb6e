"""The trained selector behind the ``TokenSelector`` interface, one-shot (the paper) or set-aware (the default).

``oneshot`` is the paper's inference: each token's keep probability, softmax(logits)[keep], scored on its own,
and ratio/budget take the top k. Tokens are scored independently, so a group of mutually redundant tokens (a
line of text patches that look alike to the selector) is kept or dropped together.

``rounds`` (``selector.method=learned``, the default) makes the choice set-aware with the trained reconstructor:
the most confident tokens first (up to ``ROUND_FRACTIONS[0]`` of the image: DivPrune's max-min greedy with each
candidate weighted by its keep probability), then, round after round, the tokens the reconstructor fills in worst
from what is kept so far, spread by the same max-min term, until the next cumulative fraction is reached. The
picking order that results is the score, so ratio/budget keep its first k tokens and a ratio on a round boundary
is exactly that round's set. Each round costs one reconstructor pass (3 layers at the selector's width), about
the selector's own cost: ``bench.selector_overhead`` reports the total against the encoder (2% of ViT-L/14-336
with 11 rounds; 6% at anyres's 2880 tokens, where attention's n² dominates). ``bench.selection_study`` measured
the variants (docs/evaluation.md).

Modes (``select``): ``threshold`` keeps as many tokens as pass the keep probability (the paper's adaptive count)
but picks which in the set-aware order; ``error`` keeps, per image, the shortest prefix of the picking order
whose reconstruction error is at most ``max_error`` times the error of rebuilding every token as the image's mean
token (the image's spread), a relative measure that means the same for every encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import SelectorConfig
from pipeline.selector.checkpoint import SelectorCheckpoint
from pipeline.selector.loss import image_spread
from pipeline.selector.model import normalize_tokens
from pipeline.selector.policy import mask_padding, score_ranks, select_tokens

# Cumulative kept fractions at which a round ends; ratio cuts at 0.1, 0.3 and 0.5 fall on boundaries.
ROUND_FRACTIONS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7)
# The exponent of the max-min distance term in rounds after the first (bench.selection_study chose it).
ROUND_REDUNDANCY = 0.5


def fraction_count(valid: Tensor, fraction: float) -> Tensor:
    """⌈fraction·n⌉ as ``select_tokens`` rounds it in mode=ratio."""
    return torch.ceil(valid.double() * fraction - 1e-9).long().minimum(valid)


def _take_best(priority: Tensor, available: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
    """The ``need`` highest-priority available tokens per image: (chosen mask, their place among them)."""
    order = priority.masked_fill(~available, float("-inf")).argsort(dim=1, descending=True, stable=True)
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return available & (place < need[:, None]), place


class LearnedSelector:
    name = "learned"

    def __init__(self, checkpoint: SelectorCheckpoint, device: torch.device | str = "cpu", *,
                 strategy: str = "rounds", rounds: tuple[float, ...] = ROUND_FRACTIONS,
                 steps_per_round: int | None = None) -> None:
        assert strategy in ("rounds", "oneshot"), strategy
        assert list(rounds) == sorted(rounds) and all(0 < f < 1 for f in rounds), rounds
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.strategy = strategy
        self.rounds = tuple(rounds)
        self.steps_per_round = steps_per_round or 1 << 30
        model = checkpoint.model.to(self.device).eval()
        self.model = model.selector
        # The one-shot selector runs alone; set-aware selection and error mode also need the reconstructor.
        self.reconstructor = model.reconstructor if strategy == "rounds" else None

    def to_device(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return tokens.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def keep_probability(self, tokens: Tensor, mask: Tensor) -> Tensor:
        tokens, mask = self.to_device(tokens, mask)
        return mask_padding(self.model.keep_probability(tokens, mask), mask)

    def token_errors(self, tokens: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
        """Per-token squared error ``[B, N]`` of the reconstruction from ``keep`` (0 at kept tokens)."""
        if self.reconstructor is None:  # the one-shot selector in error mode
            self.reconstructor = self.checkpoint.model.reconstructor.to(self.device).eval()
        filled = self.reconstructor(tokens, mask, keep & mask)
        return (filled - normalize_tokens(tokens)).pow(2).mean(-1).masked_fill(~mask, 0.0)

    @torch.inference_mode()
    def picking_order(self, tokens: Tensor, mask: Tensor, probability: Tensor | None = None) -> Tensor:
        """Each token's place ``[B, N]`` in the set-aware picking order (0 first; padding after every token).

        Within a round tokens are picked one at a time, each the best of ``priority × d^γ`` where ``d`` is its
        cosine distance to the nearest token kept so far (DivPrune's max-min term): a token the reconstructor
        misses but that looks like one just picked waits for the next round, which will know whether it is
        still missed. The first round's priority is the keep probability (γ = 1: DivPrune weighted by the
        learned score), later rounds' the fill-in error (γ = ``ROUND_REDUNDANCY``); after the last round the
        rest follow by fill-in error alone.
        """
        tokens, mask = self.to_device(tokens, mask)
        if probability is None:
            probability = self.keep_probability(tokens, mask)
        length = mask.shape[1]
        valid = mask.sum(1)
        unit = F.normalize(tokens.float(), dim=-1)
        distance = (1 - unit @ unit.transpose(1, 2)).clamp(min=0)
        others = mask[:, None, :] & ~torch.eye(length, dtype=torch.bool, device=mask.device)
        # Before the first pick: the distance to the nearest other token (a lone token has none: 0).
        min_distance = distance.masked_fill(~others, float("inf")).amin(-1).nan_to_num(posinf=0.0)
        taken = torch.zeros_like(mask)
        picked = torch.zeros_like(valid)
        ranks = torch.full(mask.shape, length, dtype=torch.long, device=mask.device)
        priority, redundancy = probability.masked_fill(~mask, 0.0), 1.0
        for fraction in self.rounds:
            target = fraction_count(valid, fraction)
            # Picks per step: 1 gives the exact greedy; more bound the loop at about ``self.steps_per_round`` steps.
            step = ((target - picked + self.steps_per_round - 1) // self.steps_per_round).clamp(min=1)
            while bool((picked < target).any()):
                score = (priority * min_distance.pow(redundancy)).masked_fill(taken | ~mask, -1.0)
                chosen, place = _take_best(score, mask & ~taken, torch.minimum(step, target - picked).clamp(min=0))
                ranks = torch.where(chosen, picked[:, None] + place, ranks)
                taken |= chosen
                to_chosen = distance.masked_fill(~chosen[:, :, None], float("inf")).amin(1)
                first = (picked == 0)[:, None] & chosen.any(1, keepdim=True)
                min_distance = torch.where(first, to_chosen, torch.minimum(min_distance, to_chosen))
                picked = picked + chosen.sum(1)
            priority, redundancy = self.token_errors(tokens, mask, taken), ROUND_REDUNDANCY
        chosen, place = _take_best(priority, mask & ~taken, valid - picked)
        return torch.where(chosen, picked[:, None] + place, ranks)

    @torch.inference_mode()
    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        """Keep probability (``oneshot``) or the place in the set-aware picking order (``rounds``), in [0, 1]."""
        tokens, mask = self.to_device(tokens, mask)
        if self.strategy == "oneshot":
            return self.keep_probability(tokens, mask)
        ranks = self.picking_order(tokens, mask)
        return mask_padding(1 - ranks.double() / mask.sum(1, keepdim=True).clamp(min=1), mask)

    @torch.inference_mode()
    def select(self, tokens: Tensor, mask: Tensor, cfg: SelectorConfig, *, keys: list[str],
               cls_attention: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(scores, keep-mask) in ``cfg.mode``; see the module docstring for threshold and error modes."""
        tokens, mask = self.to_device(tokens, mask)
        if self.strategy == "oneshot" and cfg.mode != "error":
            scores = self.keep_probability(tokens, mask)
            return scores, select_tokens(scores, mask, cfg)
        probability = self.keep_probability(tokens, mask)
        if self.strategy == "oneshot":  # error mode over the paper's order: most probable first
            ranks = score_ranks(probability, mask)
        else:
            ranks = self.picking_order(tokens, mask, probability)
        valid = mask.sum(1)
        scores = mask_padding(1 - ranks.double() / valid[:, None].clamp(min=1), mask)
        floor = valid.clamp(max=cfg.min_tokens)
        if cfg.mode == "threshold":
            count = ((probability >= cfg.threshold) & mask).sum(1)
        elif cfg.mode == "error":
            count = self.error_bounded_count(tokens, mask, ranks, cfg.max_error)
        else:
            return scores, select_tokens(scores, mask, cfg)
        count = torch.maximum(count, floor).minimum(valid)
        return scores, mask & (ranks < count[:, None])

    def relative_error(self, tokens: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
        """Per-image reconstruction error ``[B]`` from ``keep`` over the image's spread (its all-mean-token error)."""
        per_image = (self.token_errors(tokens, mask, keep).sum(1) / mask.sum(1).clamp(min=1))
        return per_image / image_spread(tokens, mask).clamp(min=1e-12)

    @torch.inference_mode()
    def error_bounded_count(self, tokens: Tensor, mask: Tensor, ranks: Tensor, max_error: float) -> Tensor:
        """Per image, the fewest tokens of the picking order whose relative error is ≤ ``max_error``: a binary
        search over the prefix length (about log2 n reconstructor passes; the error falls as tokens are added,
        so the search finds the shortest prefix within the bound up to that near-monotone error)."""
        valid = mask.sum(1)
        low = torch.zeros_like(valid)  # the bound is not met with `low` tokens (0 never meets a bound < 1)
        high = valid.clone()  # ... and is met with `high` (all tokens: error 0)
        while bool((high - low > 1).any()):
            middle = (low + high) // 2
            within = self.relative_error(tokens, mask, ranks < middle[:, None]) <= max_error
            searching = high - low > 1
            high = torch.where(searching & within, middle, high)
            low = torch.where(searching & ~within, middle, low)
        return high

    def fingerprint(self) -> str:
        # The weights; which strategy ran is ``selector.method`` (learned / learned_oneshot) in the run's cfg_hash.
        return self.checkpoint.fingerprint
