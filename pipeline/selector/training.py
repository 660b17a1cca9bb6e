"""The selector's training loop, free of Ray and of I/O: batches of token sets in, a trained autoencoder out."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.selector.loss import selector_loss

# The learning rate decays (cosine) from cfg.lr after warm-up to this fraction of it at the last step.
FINAL_LR_FRACTION = 0.1


@dataclass
class TokenBatch:
    """Token sets padded to a common length."""

    tokens: Tensor  # [B, N, D] float32, zeros at padding
    mask: Tensor  # [B, N] bool, True = real token
    cls_attention: Tensor | None = None  # [B, N], when the encoder supplies it
    keys: list[str] | None = None  # the samples' keys, when the stream knows them

    def to(self, device: torch.device | str) -> TokenBatch:
        attention = self.cls_attention.to(device) if self.cls_attention is not None else None
        return TokenBatch(self.tokens.to(device), self.mask.to(device), attention, self.keys)


def pad_token_sets(token_sets: Sequence[Tensor], cls_attention: Sequence[Tensor] | None = None) -> TokenBatch:
    """Variable-length token sets ``[n_i, D]`` (anyres images differ in n), and optionally each set's CLS
    attention ``[n_i]``, -> one padded batch."""
    length = max(t.shape[0] for t in token_sets)
    tokens = torch.zeros(len(token_sets), length, token_sets[0].shape[1])
    mask = torch.zeros(len(token_sets), length, dtype=torch.bool)
    attention = torch.zeros(len(token_sets), length) if cls_attention is not None else None
    for row, t in enumerate(token_sets):
        tokens[row, : t.shape[0]] = t
        mask[row, : t.shape[0]] = True
        if attention is not None:
            attention[row, : t.shape[0]] = cls_attention[row]
    return TokenBatch(tokens, mask, attention)


def sample_batches(token_sets: list[Tensor], batch_size: int, seed: int) -> Iterator[TokenBatch]:
    """Endless batches: a fresh seeded permutation of the cache every epoch."""
    if not token_sets:
        raise ValueError("no token sets to train on")
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(token_sets))
    while True:
        order = torch.randperm(len(token_sets), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield pad_token_sets([token_sets[i] for i in order[start : start + batch_size]])


def temperature_at(step: int, cfg: TrainConfig) -> float:
    """Gumbel-Softmax temperature, annealed from ``temperature_start`` to ``temperature_end`` over the run."""
    progress = min(step / max(cfg.steps - 1, 1), 1.0)
    start, end = cfg.temperature_start, cfg.temperature_end
    if cfg.temperature_schedule == "cosine":
        return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
    return start * (end / start) ** progress


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps - 1, 1), 1.0)
    return cfg.lr * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with a parameter group per (network, decay): weight decay on matrices only, not on biases, norms,
    position embeddings or the mask embedding; ``network`` lets the loop hold the selector back."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        network = "selector" if "selector" in name.split(".") else "reconstructor"
        decay = parameter.ndim >= 2 and "position_embedding" not in name
        groups.setdefault((network, decay), []).append(parameter)
    return torch.optim.AdamW(
        [
            {"params": params, "network": network, "weight_decay": cfg.weight_decay if decay else 0.0}
            for (network, decay), params in groups.items()
        ],
        lr=cfg.lr,
    )


LogFn = Callable[[dict[str, float]], None]
CheckpointFn = Callable[[int, dict[str, float]], None]


def train_loop(
    model: nn.Module,
    batches: Iterator[TokenBatch],
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    on_log: LogFn | None = None,
    on_checkpoint: CheckpointFn | None = None,
) -> dict[str, float]:
    """Train ``model`` (a SelectorAutoencoder, possibly DDP-wrapped) from ``start_step`` to ``cfg.steps``.

    Every ``log_every`` steps ``on_log`` gets the metrics averaged over those steps (loss, recon_error,
    relative_error, sparsity, keep_probability, keep_rate, temperature, lr); every ``checkpoint_every``
    steps and at the end ``on_checkpoint(step, metrics)`` runs. Returns the last logged metrics.
    """
    optimizer = optimizer or make_optimizer(model, cfg)
    model.train()
    window: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    for step in range(start_step, cfg.steps):
        batch = next(batches).to(device)
        temperature, lr = temperature_at(step, cfg), learning_rate_at(step, cfg)
        selector_lr = lr if step >= cfg.selector_warmup_steps else 0.0
        for group in optimizer.param_groups:
            group["lr"] = selector_lr if group["network"] == "selector" else lr
        output = model(batch.tokens, batch.mask, temperature=temperature)
        terms = selector_loss(
            output,
            batch.tokens,
            batch.mask,
            kind=cfg.loss,
            sparsity_weight=cfg.sparsity_weight,
            target_keep_rate=cfg.target_keep_rate,
            relative_error_floor=cfg.relative_error_floor,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        window.append(terms.as_floats())
        done = step + 1
        checkpoint_now = on_checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
        if done % cfg.log_every == 0 or done == cfg.steps or checkpoint_now:
            metrics = {name: sum(m[name] for m in window) / len(window) for name in window[0]}
            metrics = {"step": done, **metrics, "temperature": temperature, "lr": lr}
            window.clear()
            if on_log:
                on_log(metrics)
        if checkpoint_now:
            on_checkpoint(done, metrics)
    return metrics
