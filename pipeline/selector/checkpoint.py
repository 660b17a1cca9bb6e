"""Selector checkpoints: safetensors weights and a JSON sidecar, through fsspec (local paths or ``s3://``).

One checkpoint is a directory, written in this order so that a directory without its sidecar is incomplete and
is ignored when looking for the latest one::

    {root}/step-00000300/model.safetensors   the SelectorAutoencoder's state dict
                         optimizer.pt        optimizer state: tensors and plain values only (weights_only load)
                         train_state.pt      per worker: RNG states and the data stream's position (exact resume)
                         checkpoint.json     encoder identity, dims, model and train config, step, metrics, sha256

A learned selector's fingerprint is the sha256 of its weights file, checked again on every load.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.config import ConfigError, EncoderConfig, SelectorModelConfig
from pipeline.selector.model import SelectorAutoencoder
from pipeline.storage import filesystem_for, join_url, read_bytes, write_bytes

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TRAIN_STATE_FILE = "train_state.pt"
SIDECAR_FILE = "checkpoint.json"
STEP_PREFIX = "step-"


def checkpoint_dir(root: str, step: int) -> str:
    return f"{root.rstrip('/')}/{STEP_PREFIX}{step:08d}"


def encoder_identity(cfg: EncoderConfig, fingerprint: str, hidden_size: int) -> dict[str, Any]:
    """What a checkpoint records of the encoder it was trained on; ``fingerprint`` is what loading checks."""
    return {
        "name": cfg.name,
        "family": cfg.family,
        "pretrained": cfg.pretrained,
        "fingerprint": fingerprint,
        "select_layer": cfg.select_layer,
        "select_feature": cfg.select_feature,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": hidden_size,
    }


def save_checkpoint(
    directory: str,
    model: SelectorAutoencoder,
    *,
    step: int,
    encoder: dict[str, Any],
    train: dict[str, Any],
    metrics: dict[str, float],
    optimizer_state: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    weights = save_safetensors({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()})
    write_bytes(join_url(directory, WEIGHTS_FILE), weights, storage_options)
    if optimizer_state is not None:
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        write_bytes(join_url(directory, OPTIMIZER_FILE), buffer.getvalue(), storage_options)
    if train_state is not None:
        buffer = io.BytesIO()
        torch.save(train_state, buffer)
        write_bytes(join_url(directory, TRAIN_STATE_FILE), buffer.getvalue(), storage_options)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "encoder": encoder,
        "in_dim": model.in_dim,
        "model": asdict(model.cfg),
        "train": train,
        "metrics": metrics,
        "weights": WEIGHTS_FILE,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "optimizer": OPTIMIZER_FILE if optimizer_state is not None else None,
        "train_state": TRAIN_STATE_FILE if train_state is not None else None,
    }
    write_bytes(join_url(directory, SIDECAR_FILE), json.dumps(sidecar, indent=2, sort_keys=True).encode(), storage_options)
    return directory


def latest_checkpoint(root: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    fs, root_path = filesystem_for(root, storage_options)
    fs.invalidate_cache(root_path)
    if not fs.isdir(root_path):
        return None
    steps = []
    for entry in fs.ls(root_path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX) :].isdigit():
            steps.append(int(name[len(STEP_PREFIX) :]))
    for step in sorted(steps, reverse=True):
        directory = checkpoint_dir(root, step)
        if fs.exists(join_url(directory, SIDECAR_FILE)):
            return directory
    return None


def resolve_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """A checkpoint directory from its directory, its sidecar, or a root of ``step-*`` directories (the latest)."""
    if path.endswith(".json"):
        path = path.rstrip("/").rsplit("/", 1)[0] if "/" in path else "."
    fs, sidecar = filesystem_for(join_url(path, SIDECAR_FILE), storage_options)
    if fs.exists(sidecar):
        return path
    latest = latest_checkpoint(path, storage_options)
    if latest is None:
        raise ConfigError(
            f"selector.checkpoint: no selector checkpoint at {path} (expected {SIDECAR_FILE} there or step-* "
            "directories under it); train one with python -m jobs.train_selector"
        )
    return latest


@dataclass
class SelectorCheckpoint:
    path: str  # the checkpoint directory
    meta: dict[str, Any]  # the sidecar
    model: SelectorAutoencoder

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["weights_sha256"])

    @property
    def encoder_fingerprint(self) -> str:
        return str(self.meta["encoder"]["fingerprint"])

    def check_encoder(self, encoder_fingerprint: str) -> None:
        """Refuse to pair the selector with an encoder other than the one it was trained on."""
        if encoder_fingerprint != self.encoder_fingerprint:
            encoder = self.meta["encoder"]
            raise ConfigError(
                f"selector.checkpoint: {self.path} was trained on encoder {encoder['name']!r} "
                f"(fingerprint {self.encoder_fingerprint[:16]}, layer {encoder['select_layer']}), but the running "
                f"encoder has fingerprint {encoder_fingerprint[:16]}; train a selector for this encoder"
            )


def read_sidecar(directory: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    return json.loads(read_bytes(join_url(directory, SIDECAR_FILE), storage_options))


def load_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> SelectorCheckpoint:
    directory = resolve_checkpoint(path, storage_options)
    meta = read_sidecar(directory, storage_options)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"selector.checkpoint: {directory} has format version {meta.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}"
        )
    weights = read_bytes(join_url(directory, meta["weights"]), storage_options)
    digest = hashlib.sha256(weights).hexdigest()
    if digest != meta["weights_sha256"]:
        raise ValueError(f"{directory}/{meta['weights']}: sha256 {digest} does not match its sidecar; the file is corrupt")
    model = SelectorAutoencoder(int(meta["in_dim"]), SelectorModelConfig(**meta["model"]))
    model.load_state_dict(load_safetensors(weights))
    return SelectorCheckpoint(directory, meta, model)


def load_optimizer_state(checkpoint: SelectorCheckpoint, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    if not checkpoint.meta.get("optimizer"):
        return None
    data = read_bytes(join_url(checkpoint.path, checkpoint.meta["optimizer"]), storage_options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_train_state(checkpoint: SelectorCheckpoint, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What ``save_checkpoint(train_state=...)`` stored (tensors and plain values), or None for older checkpoints."""
    if not checkpoint.meta.get("train_state"):
        return None
    data = read_bytes(join_url(checkpoint.path, checkpoint.meta["train_state"]), storage_options)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
