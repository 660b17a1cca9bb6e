"""What a compress run will do: its fingerprint (``cfg_hash``), its output prefix, and the shards still to do."""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import (
    SCHEMA_VERSION,
    CompressConfig,
    redact_credentials,
    stable_hash,
    to_dict,
)
from pipeline.output.commit import IndexedMarker, by_source, load_markers
from pipeline.sources import ShardRef, list_shards

# Fields of EncoderConfig that change how images become tokens; batch size, device and compile do not.
ENCODER_OUTPUT_FIELDS = (
    "name", "family", "pretrained", "image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
    "intermediate_size", "select_layer", "select_feature", "resize_mode", "image_mean", "image_std", "anyres",
    "image_grid_pinpoints", "dtype", "seed",
)


def output_fingerprint_payload(cfg: CompressConfig, encoder_fingerprint: str, selector_fingerprint: str) -> dict:
    """Everything that changes the stored bytes, and nothing else."""
    selector = cfg.selector
    mode_param = {"threshold": selector.threshold, "ratio": selector.ratio, "budget": selector.budget}[selector.mode]
    return {
        "schema_version": SCHEMA_VERSION,
        # Shard ids are relative to the input pattern, so two corpora must never share a prefix.
        "input": {"path": cfg.input.path, "format": cfg.input.format, "image_column": cfg.input.image_column},
        "encoder": {name: getattr(cfg.encoder, name) for name in ENCODER_OUTPUT_FIELDS},
        "encoder_fingerprint": encoder_fingerprint,
        "max_pixels": cfg.decode.max_pixels,
        "selector": {
            "method": selector.method,
            "fingerprint": selector_fingerprint,
            "mode": None if selector.method == "none" else selector.mode,
            "param": None if selector.method == "none" else mode_param,
            "min_tokens": selector.min_tokens,
            "store_scores": selector.store_scores,
        },
        "output": {"format": cfg.output.format, "dtype": cfg.output.dtype},
    }


def encoder_dir_name(cfg: CompressConfig) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in cfg.encoder.name)


@dataclass
class RunPlan:
    config: CompressConfig
    cfg_hash: str
    output_dir: str
    run_id: str
    encoder_fingerprint: str
    selector_fingerprint: str
    shards: list[ShardRef]
    committed: dict[str, IndexedMarker]  # by marker name: what load_markers found
    todo: list[ShardRef]

    @property
    def skipped(self) -> int:
        return len(self.shards) - len(self.todo)

    def resolved_config(self) -> dict[str, Any]:
        return {
            "cfg_hash": self.cfg_hash,
            "config": redact_credentials(to_dict(self.config)),  # _config.json must not hold a secret
            "fingerprint": output_fingerprint_payload(self.config, self.encoder_fingerprint, self.selector_fingerprint),
        }


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def plan_compress(cfg: CompressConfig, encoder_fingerprint: str, selector_fingerprint: str) -> RunPlan:
    storage_options = cfg.storage.storage_options()
    payload = output_fingerprint_payload(cfg, encoder_fingerprint, selector_fingerprint)
    cfg_hash = stable_hash(payload)
    output_dir = f"{cfg.output.path.rstrip('/')}/{encoder_dir_name(cfg)}/{cfg_hash}"
    shards = list_shards(cfg.input, storage_options)
    markers = load_markers(output_dir, storage_options)  # one listing, the index, and only new bodies
    committed = by_source(markers)
    todo = [s for s in shards if (s.shard_id, s.fingerprint) not in committed]
    return RunPlan(
        config=dataclasses.replace(cfg),
        cfg_hash=cfg_hash,
        output_dir=output_dir,
        run_id=new_run_id(),
        encoder_fingerprint=encoder_fingerprint,
        selector_fingerprint=selector_fingerprint,
        shards=shards,
        committed=markers,
        todo=todo,
    )
