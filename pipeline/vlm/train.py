"""Caption training of a LLaVA-NeXT projector on pruned tokens: model loading, the step loop, the checkpoint.

The Ray Train wiring lives in ``pipeline/ray_train/vlm.py``; everything here runs in one process too (tests, notebooks).

Checkpoint (``{output}/checkpoint/``, local or ``s3://``)::

    projector.safetensors        multi_modal_projector.* and image_newline
    language_model.safetensors   language model and lm_head (train.language_model=true only)
    train_vlm.json               config, token geometry, steps, losses (written last: it marks a complete checkpoint)
    resume/step-NNNNNNNN/        every train.checkpoint_every steps: trained weights, optimizer and scheduler,
                                 loader-rankRRRRR.json (each rank's loader state)
    resume/latest.json           the last complete resume point (written last, after every rank's loader state)

A rerun with the same output resumes from ``resume/latest.json`` (``train.resume``): weights, optimizer, scheduler and
the loader states (every rank's, so another world size or loader worker count splits the rest of the epoch anew);
the batches after the resume point are the ones the uninterrupted run would have drawn.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from pipeline.config import ConfigError
from pipeline.storage import filesystem_for, join_url, read_bytes, write_bytes
from pipeline.vlm.config import TrainVLMConfig, VLMModelConfig, VLMTrainConfig
from pipeline.vlm.feed import IMAGE_PLACEHOLDER, projector_input_dim, vlm_core

PROJECTOR_FILE = "projector.safetensors"
LANGUAGE_MODEL_FILE = "language_model.safetensors"
SIDECAR_FILE = "train_vlm.json"
RESUME_DIR = "resume"
LATEST_FILE = "latest.json"
# Tests: when set, each step's sample keys are appended to this file, one JSON line per step and rank.
BATCH_LOG_ENV = "ATR_VLM_BATCH_LOG"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY_PATCH_SIZE = 14


def model_classes(family: str) -> tuple[type, type]:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    return {
        "llava_next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
        "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
    }[family]


# --------------------------------------------------------------------------------------------- tiny model


def byte_tokenizer():
    """An offline byte-level tokenizer (every UTF-8 text encodes; no merges, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", IMAGE_PLACEHOLDER]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )


def tiny_vlm(cfg: VLMModelConfig, token_dim: int, side: int, vocab_size: int, image_token_id: int) -> nn.Module:
    """A random LLaVA-NeXT/OneVision whose vision width is ``token_dim``: the projector takes the stored tokens.

    The vision tower exists (the classes build one) but never runs; its geometry matches the stored ``side``.
    """
    from transformers import CLIPVisionConfig, LlamaConfig

    config_cls, model_cls = model_classes(cfg.family)
    image_size = side * TINY_PATCH_SIZE
    config = config_cls(
        vision_config=CLIPVisionConfig(
            hidden_size=token_dim, intermediate_size=2 * token_dim, num_hidden_layers=1, num_attention_heads=1,
            image_size=image_size, patch_size=TINY_PATCH_SIZE,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
            max_position_embeddings=8192,
        ),
        image_token_index=image_token_id,
        image_grid_pinpoints=[[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size] * 2],
    )
    torch.manual_seed(cfg.seed)
    return model_cls(config)


def load_vlm(cfg: VLMModelConfig, token_dim: int, side: int) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: ``from_pretrained(cfg.name_or_path)``, or the tiny random model when it is null."""
    if cfg.name_or_path is None:
        tokenizer = byte_tokenizer()
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        model = tiny_vlm(cfg, token_dim, side, len(tokenizer), image_token_id)
    else:
        from transformers import AutoTokenizer

        _, model_cls = model_classes(cfg.family)
        model = model_cls.from_pretrained(cfg.name_or_path, dtype=TORCH_DTYPES[cfg.dtype],
                                          local_files_only=cfg.local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, local_files_only=cfg.local_files_only)
    require_token_dim(cfg, projector_input_dim(model), token_dim)
    return model.to(TORCH_DTYPES[cfg.dtype]), tokenizer


def pretrained_projector_dim(cfg: VLMModelConfig) -> int | None:
    """The projector's input width from the model's config alone (no weights load); None for the tiny model."""
    if cfg.name_or_path is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, local_files_only=cfg.local_files_only)
    except OSError as exc:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {exc}") from None
    layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    return config.vision_config.hidden_size * layers


def require_token_dim(cfg: VLMModelConfig, expected: int | None, token_dim: int) -> None:
    if expected is not None and expected != token_dim:
        raise ConfigError(
            f"model.name_or_path: {cfg.name_or_path}'s projector takes {expected}-dim vision features, but the "
            f"input's tokens are {token_dim}-dim; compress with this model's vision tower and feature layer"
        )


# --------------------------------------------------------------------------------------------- training


def trainable_modules(model: nn.Module, language_model: bool) -> dict[str, nn.Module | nn.Parameter]:
    """What trains, by checkpoint file: projector and newline always; language model and lm_head on request."""
    core = vlm_core(model)
    projector: dict[str, Any] = {"multi_modal_projector": core.multi_modal_projector}
    if getattr(core, "image_newline", None) is not None:
        projector["image_newline"] = core.image_newline
    parts = {PROJECTOR_FILE: projector}
    if language_model:
        parts[LANGUAGE_MODEL_FILE] = {"language_model": core.language_model, "lm_head": model.get_output_embeddings()}
    return parts


def _named_tensors(modules: dict[str, nn.Module | nn.Parameter]) -> dict[str, Tensor]:
    tensors = {}
    for prefix, module in modules.items():
        if isinstance(module, nn.Parameter):
            tensors[prefix] = module
        else:
            tensors.update({f"{prefix}.{name}": p for name, p in module.named_parameters()})
    return tensors


def prepare_for_training(model: nn.Module, language_model: bool) -> list[nn.Parameter]:
    """Freeze all but the trained parts, which move to float32 (the forward autocasts to the model's dtype)."""
    model.requires_grad_(False)
    params = []
    for modules in trainable_modules(model, language_model).values():
        for tensor in _named_tensors(modules).values():
            tensor.data = tensor.data.float()
            tensor.requires_grad_(True)
            params.append(tensor)
    return params


def make_optimizer(params: list[nn.Parameter], cfg: VLMTrainConfig):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warmup, then cosine to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def endless(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Batches over epochs (the loader moves to its next epoch after a finished one)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batches for this worker: fewer samples than workers?")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to ``device``; tokens arrive in the stored dtype (float16: half the bytes through the DataLoader
    and the host-to-device copy) and are widened there."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if isinstance(moved.get("tokens"), Tensor) and moved["tokens"].is_floating_point():
        moved["tokens"] = moved["tokens"].float()
    return moved


def train_steps(
    loss_module: nn.Module,
    batches: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: VLMTrainConfig,
    *,
    device: torch.device,
    autocast_dtype: torch.dtype = torch.float32,
    on_log: Callable[[int, list[float]], None] | None = None,
    start_step: int = 0,
    losses: list[float] | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """Optimizer steps ``start_step + 1 .. cfg.steps`` (after a resume, ``losses`` holds the earlier ones); returns
    each step's loss. ``on_log(step, window)`` every ``log_every``; ``on_step(step, losses)`` after each step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = list(losses or [])
    batch_log = os.environ.get(BATCH_LOG_ENV)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
    loss_module.train()
    for step in range(start_step + 1, cfg.steps + 1):
        batch = next(batches)
        if batch_log:
            with open(batch_log, "a") as handle:
                handle.write(json.dumps({"step": step, "rank": rank, "keys": list(batch["keys"])}) + "\n")
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            loss = loss_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if on_log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            on_log(step, losses[-cfg.log_every:])
        if on_step is not None:
            on_step(step, losses)
    return losses


def loss_summary(losses: list[float], window: int) -> dict[str, float]:
    """First and final loss, each the mean over a log window (single steps are noisy)."""
    window = max(1, min(window, len(losses) // 2 or 1))
    return {"first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window}


# --------------------------------------------------------------------------------------------- checkpoint


def checkpoint_url(output: str) -> str:
    return join_url(output, "checkpoint")


def save_checkpoint(
    directory: str, model: nn.Module, cfg: TrainVLMConfig, info: dict[str, Any], storage_options: dict[str, Any]
) -> str:
    for name, modules in trainable_modules(model, cfg.train.language_model).items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in _named_tensors(modules).items()}
        write_bytes(join_url(directory, name), save_safetensors(tensors), storage_options)
    sidecar = {"config": asdict(cfg), **info}
    write_bytes(join_url(directory, SIDECAR_FILE), json.dumps(sidecar, indent=2, sort_keys=True).encode(),
                storage_options)
    return directory


def read_sidecar(directory: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(read_bytes(join_url(directory, SIDECAR_FILE), storage_options))


def load_trained(model: nn.Module, directory: str, storage_options: dict[str, Any] | None = None) -> nn.Module:
    """Load a checkpoint's trained weights into ``model`` (the same architecture), in place."""
    sidecar = read_sidecar(directory, storage_options or {})
    language_model = sidecar["config"]["train"]["language_model"]
    for name, modules in trainable_modules(model, language_model).items():
        stored = load_safetensors(read_bytes(join_url(directory, name), storage_options))
        targets = _named_tensors(modules)
        if set(stored) != set(targets):
            raise ValueError(f"{join_url(directory, name)} does not match this model's {name.split('.')[0]} "
                             f"(differs in {sorted(set(stored) ^ set(targets))[:3]})")
        with torch.no_grad():
            for key, tensor in stored.items():
                targets[key].copy_(tensor)
    return model


# --------------------------------------------------------------------------------------------- resume points


def resume_url(output: str) -> str:
    return join_url(checkpoint_url(output), RESUME_DIR)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_resume_point(
    output: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainVLMConfig,
    loader_state: dict[str, Any], losses: list[float], *, rank: int, world_size: int,
    storage_options: dict[str, Any],
) -> str:
    """Every rank writes its loader state; then rank 0 the weights, optimizer and scheduler, and last the marker."""
    directory = join_url(resume_url(output), f"step-{step:08d}")
    write_bytes(join_url(directory, f"loader-rank{rank:05d}.json"), json.dumps(loader_state).encode(), storage_options)
    _barrier()
    if rank == 0:
        for name, modules in trainable_modules(model, cfg.train.language_model).items():
            tensors = {k: v.detach().cpu().contiguous() for k, v in _named_tensors(modules).items()}
            write_bytes(join_url(directory, name), save_safetensors(tensors), storage_options)
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
        write_bytes(join_url(directory, "optimizer.pt"), buffer.getvalue(), storage_options)
        marker = {"step": step, "world_size": world_size, "losses": losses, "directory": directory}
        write_bytes(join_url(resume_url(output), LATEST_FILE), json.dumps(marker).encode(), storage_options)
    _barrier()
    return directory


def read_resume_point(output: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The last complete resume point's marker, or None."""
    url = join_url(resume_url(output), LATEST_FILE)
    fs, path = filesystem_for(url, storage_options)
    if not fs.exists(path):
        return None
    return json.loads(read_bytes(url, storage_options))


def load_resume_weights(model: nn.Module, point: dict[str, Any], language_model: bool,
                        storage_options: dict[str, Any]) -> None:
    for name, modules in trainable_modules(model, language_model).items():
        stored = load_safetensors(read_bytes(join_url(point["directory"], name), storage_options))
        targets = _named_tensors(modules)
        with torch.no_grad():
            for key, tensor in stored.items():
                targets[key].copy_(tensor)


def load_resume_training(point: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any, loader: Any,
                         storage_options: dict[str, Any]) -> tuple[int, list[float]]:
    """Optimizer, scheduler and loader as they were at the resume point; returns ``(step, losses)``."""
    state = torch.load(io.BytesIO(read_bytes(join_url(point["directory"], "optimizer.pt"), storage_options)),
                       weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict([
        json.loads(read_bytes(join_url(point["directory"], f"loader-rank{rank:05d}.json"), storage_options))
        for rank in range(point["world_size"])
    ])
    return int(point["step"]), list(point["losses"])
