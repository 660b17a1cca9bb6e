"""Training a LLaVA-NeXT projector on pruned tokens with Ray Train: a ``TorchTrainer`` (DDP).

Each worker reads its share of a compress output through ``PrunedTokenDataset``, feeds the kept tokens through
the model's projector into the language model (``pipeline.vlm.feed``; no vision tower runs) and learns to produce
the stored captions. Rank 0 writes ``{output}/checkpoint/``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import ray.train
import ray.train.torch
import torch

from pipeline.config import ConfigError
from pipeline.failpoints import maybe_fail
from pipeline.loader import PrunedTokenDataset, PrunedTokenLoader
from pipeline.loader.collate import pack_collate, pad_collate
from pipeline.output.manifest import MANIFEST_NAME
from pipeline.ray_train.cluster import init_ray
from pipeline.ray_train.trainer import fit, mean_over_workers, threads_per_worker, worker_log
from pipeline.storage import absolute_url, filesystem_for, join_url, url_for
from pipeline.vlm.config import TrainVLMConfig
from pipeline.vlm.feed import CaptionCollator, CaptionLoss, image_newline, image_token_id
from pipeline.vlm.train import (
    PROJECTOR_FILE,
    TORCH_DTYPES,
    checkpoint_url,
    endless,
    load_resume_training,
    load_resume_weights,
    load_vlm,
    loss_summary,
    make_optimizer,
    prepare_for_training,
    pretrained_projector_dim,
    read_resume_point,
    read_sidecar,
    require_token_dim,
    save_checkpoint,
    save_resume_point,
    train_steps,
)

log = logging.getLogger(__name__)

PROG = "train_vlm"


def train_worker(config: dict[str, Any]) -> None:
    cfg: TrainVLMConfig = config["cfg"]
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    storage_options = cfg.storage.storage_options()

    dataset = PrunedTokenDataset(
        config["data"], storage_options=storage_options, seed=cfg.train.seed, shuffle_buffer=cfg.train.shuffle_buffer,
        columns=["caption"], rank=rank, world_size=world, tokens_dtype=None,  # stored dtype; widened on the device
    )
    model, tokenizer = load_vlm(cfg.model, dataset.meta["dim"], dataset.meta["side"])
    params = prepare_for_training(model, cfg.train.language_model)
    point = read_resume_point(cfg.output, storage_options) if cfg.train.resume else None
    if point is not None:
        load_resume_weights(model, point, cfg.train.language_model, storage_options)
    collator = CaptionCollator(tokenizer, image_token_id(model), image_newline(model) is not None, cfg.model.prompt,
                               pad_collate if cfg.train.max_tokens is None else pack_collate)
    if cfg.train.max_tokens is None:
        sizes = {"batch_size": cfg.train.batch_size}
    else:
        sizes = {"max_tokens": cfg.train.max_tokens, "max_samples": cfg.train.batch_size}
    loader = PrunedTokenLoader(dataset, collate_fn=collator, num_workers=cfg.train.loader_workers,
                               pin_memory=device.type == "cuda", **sizes)
    # Batches where no high-res row survives leave image_newline without a gradient.
    loss_module = ray.train.torch.prepare_model(
        CaptionLoss(model), parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    optimizer, scheduler = make_optimizer(params, cfg.train)
    start_step, losses = 0, []
    if point is not None:
        start_step, losses = load_resume_training(point, optimizer, scheduler, loader, storage_options)
        if rank == 0:
            worker_log(f"[{PROG}] resuming at step {start_step} from {point['directory']}")
    started = time.monotonic()

    def on_step(step: int, losses: list[float]) -> None:
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
            save_resume_point(cfg.output, step, model, optimizer, scheduler, cfg, loader.state_dict(), losses,
                              rank=rank, world_size=world, storage_options=storage_options)
        maybe_fail("ATR_FAIL_VLM_AFTER_STEPS", step)

    def on_log(step: int, window: list[float]) -> None:
        loss = mean_over_workers({"loss": sum(window) / len(window)})["loss"]
        if rank == 0:
            worker_log(f"[{PROG}] step {step}/{cfg.train.steps} loss {loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                       f"{time.monotonic() - started:.0f}s")

    losses = train_steps(loss_module, endless(loader), optimizer, scheduler, cfg.train, device=device,
                         autocast_dtype=TORCH_DTYPES[cfg.model.dtype], on_log=on_log, start_step=start_step,
                         losses=losses, on_step=on_step)
    window = loss_summary(losses, cfg.train.log_every)
    window = mean_over_workers(window)
    if rank == 0:
        info = {"steps": len(losses), **window, "train_s": round(time.monotonic() - started, 2),
                "token_dim": dataset.meta["dim"], "side": dataset.meta["side"], "data": config["data"],
                "encoder": dataset.meta["encoder"], "encoder_fingerprint": dataset.meta["encoder_fingerprint"]}
        directory = save_checkpoint(checkpoint_url(cfg.output), model, cfg, info, storage_options)
        worker_log(f"[{PROG}] checkpoint {directory}")


# --------------------------------------------------------------------------------------------- driver side


def resolve_input(path: str, storage_options: dict[str, Any]) -> str:
    """A compress output directory: ``path`` itself, its manifest's folder, or the one ``{encoder}/{cfg_hash}``
    output below it (several are ambiguous: name one)."""
    path = path.rstrip("/")
    if path.endswith("/" + MANIFEST_NAME):
        return path.rsplit("/", 1)[0]
    fs, root = filesystem_for(path, storage_options)
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        return path
    found = sorted(fs.glob(f"{root}/*/*/{MANIFEST_NAME}"))
    if len(found) == 1:
        return url_for(fs, found[0].rsplit("/", 1)[0])
    if found:
        options = ", ".join(url_for(fs, f.rsplit("/", 1)[0]) for f in found)
        raise ConfigError(f"input: {path} holds several compress outputs; name one of {options}")
    raise ConfigError(f"input: no {MANIFEST_NAME} in {path} or its {{encoder}}/{{cfg_hash}} folders; "
                      "run python -m jobs.compress first (or point input at a finished output)")


def train_vlm(cfg: TrainVLMConfig) -> dict[str, Any]:
    """Train on ``cfg.train.num_workers`` workers; the summary names the ``checkpoint`` and first and final loss."""
    started = time.monotonic()
    cfg = replace(cfg, output=absolute_url(cfg.output), input=absolute_url(cfg.input))
    storage_options = cfg.storage.storage_options()
    data = resolve_input(cfg.input, storage_options)
    try:
        meta = PrunedTokenDataset(data, storage_options=storage_options, columns=["caption"], rank=0, world_size=1).meta
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"input: {exc}") from None
    require_token_dim(cfg.model, pretrained_projector_dim(cfg.model), meta["dim"])
    init_ray(cfg.ray.address)
    threads = threads_per_worker(cfg.train.cpus_per_worker, cfg.train.num_workers)
    log.info(f"[{PROG}] input {data}, {cfg.train.num_workers} workers x {threads} CPUs, "
             f"model {cfg.model.name_or_path or 'tiny random'}")
    fit(train_worker, {"cfg": cfg, "data": data, "threads": threads}, name=PROG, output=cfg.output,
        num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, threads=threads)
    directory = checkpoint_url(cfg.output)
    sidecar = read_sidecar(directory, storage_options)
    return {
        "steps": sidecar["steps"],
        "first_loss": round(sidecar["first_loss"], 4),
        "final_loss": round(sidecar["final_loss"], 4),
        "wall_s": round(time.monotonic() - started, 2),
        "checkpoint": directory,
        "projector": join_url(directory, PROJECTOR_FILE),
        "input": data,
    }
