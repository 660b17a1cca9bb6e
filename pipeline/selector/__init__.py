"""Which vision tokens to keep: the paper's learned selector and the training-free baselines, one interface.

    selector = build_selector(cfg.selector, encoder.fingerprint(), device)
    scores, keep = choose_tokens(selector, tokens, mask, cfg.selector, keys=keys, cls_attention=cls_attention)
    # scores [B, N] (higher = keep), keep [B, N] bool; for a fixed-score method this is
    # scores = selector.scores(tokens, mask, keys=keys, ...); keep = select_tokens(scores, mask, cfg.selector)
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import ConfigError, SelectorConfig
from pipeline.selector.baselines import (
    ClsAttentionSelector,
    DiversitySelector,
    KeepAllSelector,
    NormSelector,
    RandomSelector,
    UniformSelector,
)
from pipeline.selector.checkpoint import load_checkpoint
from pipeline.selector.learned import LearnedSelector
from pipeline.selector.model import SelectorAutoencoder
from pipeline.selector.policy import TokenSelector, choose_tokens, select_tokens

# Bumped whenever a method picks different tokens from the same checkpoint and settings, so that cfg_hash
# changes and old and new selections never share an output prefix.
SELECTION_VERSIONS = {"learned": "set-aware-rounds-1", "learned_oneshot": "oneshot-1"}

__all__ = ["SELECTION_VERSIONS", "SelectorAutoencoder", "TokenSelector", "build_selector", "choose_tokens", "load_checkpoint", "select_tokens"]


def build_selector(
    cfg: SelectorConfig,
    encoder_fingerprint: str | None,
    device: torch.device | str = "cpu",
    *,
    side: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> TokenSelector:
    """The selector ``cfg.method`` names.

    ``learned`` (set-aware, in rounds with the trained reconstructor) and ``learned_oneshot`` (the paper's
    independent keep probabilities) load ``cfg.checkpoint`` (a checkpoint directory, its sidecar, or a training output's
    ``checkpoints/`` root) and refuses it when ``encoder_fingerprint`` is given and differs from the one it was
    trained on. ``side`` (patches per tile side) lets ``uniform`` place its stride on multi-tile images.
    """
    if cfg.method in ("learned", "learned_oneshot"):
        if not cfg.checkpoint:
            raise ConfigError(
                f"selector.checkpoint: method={cfg.method} needs a checkpoint; train one with python -m jobs.train_selector "
                "and pass selector.checkpoint=PATH, or pick a baseline with selector.method=..."
            )
        checkpoint = load_checkpoint(cfg.checkpoint, storage_options)
        if encoder_fingerprint is not None:
            checkpoint.check_encoder(encoder_fingerprint)
        return LearnedSelector(checkpoint, device, strategy="rounds" if cfg.method == "learned" else "oneshot")
    if cfg.method == "none":
        return KeepAllSelector()
    if cfg.method == "random":
        return RandomSelector(cfg.seed)
    if cfg.method == "uniform":
        return UniformSelector(side)
    if cfg.method == "norm":
        return NormSelector()
    if cfg.method == "cls_attention":
        return ClsAttentionSelector()
    assert cfg.method == "diversity", cfg.method  # SelectorConfig checks the method against its choices
    return DiversitySelector()
