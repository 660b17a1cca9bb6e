"""The training objective: rebuild every token from the kept ones, keep as few as that allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from pipeline.selector.model import AutoencoderOutput, normalize_tokens

ReconstructionLoss = Literal["mse", "cosine"]


def reconstruction_error(reconstruction: Tensor, tokens: Tensor, mask: Tensor, kind: ReconstructionLoss = "mse") -> Tensor:
    """Per-image error ``[B]`` over all valid tokens, in the normalised token space.

    ``mse`` is the mean squared error per feature (a normalised token has unit variance over its features);
    ``cosine`` is 1 - cosine similarity per token.
    """
    target = normalize_tokens(tokens)
    if kind == "mse":
        per_token = (reconstruction - target).pow(2).mean(-1)
    else:
        per_token = 1 - F.cosine_similarity(reconstruction, target, dim=-1)
    return masked_mean(per_token, mask, dim=-1)


def image_spread(tokens: Tensor, mask: Tensor, kind: ReconstructionLoss = "mse") -> Tensor:
    """Per-image error ``[B]`` of the trivial reconstruction that predicts every token as the image's mean token."""
    target = normalize_tokens(tokens)
    mean = (target * mask.unsqueeze(-1)).sum(1, keepdim=True) / mask.sum(1).clamp(min=1)[:, None, None]
    return reconstruction_error(mean.expand_as(target), tokens, mask, kind)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    weights = mask.to(values.dtype)
    if dim is None:
        return (values * weights).sum() / weights.sum().clamp(min=1)
    return (values * weights).sum(dim) / weights.sum(dim).clamp(min=1)


@dataclass
class LossTerms:
    loss: Tensor
    recon_error: Tensor  # plain reconstruction error, the mean over images
    relative_error: Tensor  # each image's error over its spread (+ floor), the mean over images
    sparsity: Tensor
    keep_probability: Tensor  # mean keep probability over valid tokens
    keep_rate: Tensor  # fraction of valid tokens the hard sample kept

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items()}


def selector_loss(
    output: AutoencoderOutput,
    tokens: Tensor,
    mask: Tensor,
    *,
    kind: ReconstructionLoss,
    sparsity_weight: float,
    target_keep_rate: float | None,
    relative_error_floor: float | None,
) -> LossTerms:
    """Reconstruction error of all tokens + ``sparsity_weight`` × sparsity.

    With ``relative_error_floor`` set, each image's error is divided by its spread (the error of predicting its
    mean token) plus that floor: an image then counts by the share of its own variation that is lost, so a page
    whose text moves its tokens only a little weighs as much as a busy photo, while the floor keeps a blank
    image's noise from counting. Unset, the plain error is optimised, as in the paper.

    The sparsity term is the batch's mean keep probability: linear in every token's keep probability, so a
    token is kept exactly when keeping it saves more (relative) error than ``sparsity_weight``. That is one
    price for the whole batch, which lets busy images keep more tokens than plain ones: the difference that
    threshold mode turns into an adaptive count. With ``target_keep_rate`` set it is instead the squared
    distance of that mean to the target, which holds the kept fraction near the target but stops pushing
    worthless tokens out once the batch is there (threshold mode then adapts less; ratio/budget modes don't care).
    """
    per_image = reconstruction_error(output.reconstruction, tokens, mask, kind)
    if relative_error_floor is None:
        relative = per_image
    else:
        relative = per_image / (image_spread(tokens, mask, kind) + relative_error_floor)
    keep_probability = masked_mean(output.keep_probability, mask)
    if target_keep_rate is None:
        sparsity = keep_probability
    else:
        sparsity = (keep_probability - target_keep_rate).pow(2)
    return LossTerms(
        loss=relative.mean() + sparsity_weight * sparsity,
        recon_error=per_image.mean(),
        relative_error=relative.mean(),
        sparsity=sparsity,
        keep_probability=keep_probability,
        keep_rate=masked_mean(output.keep, mask),
    )
