"""A frozen probe: attention pooling over a token set and a linear head.

Trained once on full token sets, then applied to pruned sets without retraining, as a frozen VLM would read
them. Attention pooling does not care how many tokens come in or in which order, so a pruned set is a valid
input as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


def _family_digits(meta: Mapping[str, Any]) -> int:
    if meta.get("family") != "document":
        return 0
    return 2 if meta.get("has_digits") else 1


def _shape_count(meta: Mapping[str, Any]) -> int:
    return min(int(meta.get("n_shapes", 0)), 3)


# name -> (number of classes, label of a sample's json). Each needs the image content, not its mere presence.
PROBE_TASKS: dict[str, tuple[int, Callable[[Mapping[str, Any]], int]]] = {
    "family": (2, lambda meta: int(meta.get("family") == "document")),
    "has_digits": (2, lambda meta: int(bool(meta.get("has_digits")))),
    "family_digits": (3, _family_digits),
    "n_shapes": (4, _shape_count),
    # Code pages (pipeline.corpus.generate_code_page): which digit a one-patch tag shows.
    "code": (4, lambda meta: int(meta.get("code", 0))),
}


def probe_label(meta: Mapping[str, Any], task: str) -> int:
    return PROBE_TASKS[task][1](meta)


class AttentionPoolProbe(nn.Module):
    """``heads`` learned queries attend over the valid tokens; their pooled values feed a linear head."""

    def __init__(self, dim: int, num_classes: int, width: int = 64, heads: int = 4):
        super().__init__()
        assert width % heads == 0, "probe width must divide into heads"
        self.heads, self.head_dim = heads, width // heads
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.query = nn.Parameter(torch.randn(heads, self.head_dim) / math.sqrt(self.head_dim))
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, D]`` with ``mask [B, L]`` (True = a real token) -> logits ``[B, classes]``."""
        batch, length, _ = tokens.shape
        x = self.norm(tokens)
        keys = self.key(x).view(batch, length, self.heads, self.head_dim)
        values = self.value(x).view(batch, length, self.heads, self.head_dim)
        logits = torch.einsum("blhd,hd->bhl", keys, self.query) / math.sqrt(self.head_dim)
        weights = logits.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("bhl,blhd->bhd", weights, values).reshape(batch, -1)
        return self.head(pooled)


def train_probe(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    width: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> AttentionPoolProbe:
    """Fit a probe on ``tokens [B, L, D]`` / ``mask [B, L]`` / ``labels [B]``; returned frozen, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = AttentionPoolProbe(tokens.shape[-1], num_classes, width=width, heads=heads)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01)
    probe.train()
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (min(batch_size, len(labels)),), generator=generator)
        loss = nn.functional.cross_entropy(probe(tokens[batch], mask[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    probe.eval()
    probe.requires_grad_(False)
    return probe


@torch.inference_mode()
def probe_predict(probe: AttentionPoolProbe, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per sample; only the tokens where ``mask`` is True are read."""
    return torch.cat([
        probe(tokens[i : i + batch_size], mask[i : i + batch_size]).argmax(-1) for i in range(0, len(tokens), batch_size)
    ])
