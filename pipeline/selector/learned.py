"""The trained selector behind the ``TokenSelector`` interface: keep probability = softmax(logits)[keep]."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.selector.checkpoint import SelectorCheckpoint
from pipeline.selector.policy import mask_padding


class LearnedSelector:
    name = "learned"

    def __init__(self, checkpoint: SelectorCheckpoint, device: torch.device | str = "cpu") -> None:
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        # The reconstructor is only for training and evaluation; inference runs the selector alone.
        self.model = checkpoint.model.selector.to(self.device).eval()

    @torch.inference_mode()
    def scores(self, tokens: Tensor, mask: Tensor, *, keys: list[str], cls_attention: Tensor | None = None) -> Tensor:
        mask = mask.to(self.device)
        probability = self.model.keep_probability(tokens.to(self.device), mask)
        return mask_padding(probability, mask)

    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint
