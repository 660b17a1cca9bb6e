"""The paper's feature selector and feature reconstructor (Allakhverdov, Goncharova, Kuznetsov 2025).

The selector reads an image's patch tokens and gives each a pair of logits (drop, keep). In training a hard
Gumbel-Softmax sample of those logits is the keep-mask; dropped tokens are replaced by one shared learnable
embedding, and the reconstructor rebuilds *all* tokens from what is left (kept ones pass through, dropped ones
are filled in). A token is worth keeping when the others cannot stand in for it. At inference only the
selector runs.

Every token is layer-normalised on its own (no affine) before either network sees it, and the reconstructor
predicts those normalised tokens. The loss then means the same for every encoder whatever its feature scale,
and the few huge-norm tokens of large ViTs cannot dominate it. A token's position is its flat index in the
image's token sequence (tiles concatenated), so anyres images are selected over all tiles together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import SelectorModelConfig

DROP, KEEP = 0, 1


def normalize_tokens(tokens: Tensor) -> Tensor:
    return F.layer_norm(tokens.float(), tokens.shape[-1:])


class Block(nn.Module):
    """Pre-norm Transformer encoder layer; padding tokens are never attended to."""

    def __init__(self, cfg: SelectorModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width))

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)), dropout, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), dropout, self.training)


class TokenTransformer(nn.Module):
    """Learned flat-position embeddings, ``num_layers`` blocks, a final norm."""

    def __init__(self, cfg: SelectorModelConfig, num_layers: int) -> None:
        super().__init__()
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_positions, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(
                f"{length} tokens per image exceed model.max_positions={self.position_embedding.shape[0]}; "
                "train a selector with a larger max_positions for this encoder"
            )
        x = x + self.position_embedding[:length]
        attend = mask[:, None, None, :]
        for block in self.blocks:
            x = block(x, attend)
        return self.norm(x)


class FeatureSelector(nn.Module):
    """Encoder tokens ``[B, N, in_dim]`` → (drop, keep) logits ``[B, N, 2]``."""

    def __init__(self, in_dim: int, cfg: SelectorModelConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, cfg.width)
        self.transformer = TokenTransformer(cfg, cfg.selector_layers)
        self.head = nn.Linear(cfg.width, 2)
        # Every token starts at keep probability 1/2: the first masks are unbiased coin flips.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(self.transformer(self.proj_in(normalize_tokens(tokens)), mask))

    def keep_probability(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self(tokens, mask).softmax(-1)[..., KEEP]


class FeatureReconstructor(nn.Module):
    """Kept tokens plus the shared mask embedding in place of dropped ones → all normalised tokens: the kept
    ones exactly, the dropped ones filled in from the rest."""

    def __init__(self, in_dim: int, cfg: SelectorModelConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_dim, cfg.width)
        self.mask_embedding = nn.Parameter(torch.randn(cfg.width) * 0.02)
        self.transformer = TokenTransformer(cfg, cfg.reconstructor_layers)
        self.proj_out = nn.Linear(cfg.width, in_dim)

    def masked_input(self, tokens: Tensor, keep: Tensor) -> Tensor:
        # A product rather than torch.where, so the straight-through gradient of ``keep`` reaches the selector.
        keep = keep.unsqueeze(-1).to(self.mask_embedding.dtype)
        return keep * self.proj_in(normalize_tokens(tokens)) + (1 - keep) * self.mask_embedding

    def forward(self, tokens: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
        # Kept tokens are known, so they pass through exactly; the network only fills in the dropped ones. The
        # error then measures just what dropping lost, and keeping a token saves exactly its fill-in error,
        # which is the straight-through gradient the selector learns from.
        filled = self.proj_out(self.transformer(self.masked_input(tokens, keep), mask))
        keep = keep.unsqueeze(-1).to(filled.dtype)
        return keep * normalize_tokens(tokens) + (1 - keep) * filled


@dataclass
class AutoencoderOutput:
    logits: Tensor  # [B, N, 2] (drop, keep)
    keep: Tensor  # [B, N] hard 0/1 sample, straight-through gradients; 0 at padding
    reconstruction: Tensor  # [B, N, in_dim] in the normalised token space

    @property
    def keep_probability(self) -> Tensor:
        return self.logits.softmax(-1)[..., KEEP]


class SelectorAutoencoder(nn.Module):
    """Selector and reconstructor trained together; ``selector`` alone is what inference loads."""

    def __init__(self, in_dim: int, cfg: SelectorModelConfig) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.cfg = cfg
        self.selector = FeatureSelector(in_dim, cfg)
        self.reconstructor = FeatureReconstructor(in_dim, cfg)

    def forward(self, tokens: Tensor, mask: Tensor, temperature: float) -> AutoencoderOutput:
        logits = self.selector(tokens, mask)
        keep = F.gumbel_softmax(logits, tau=temperature, hard=True)[..., KEEP] * mask
        return AutoencoderOutput(logits, keep, self.reconstructor(tokens, mask, keep))

    def reconstruct(self, tokens: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
        """Rebuild all (normalised) tokens from a given keep-mask: how evaluation scores any selection."""
        return self.reconstructor(tokens, mask, keep & mask)
