"""What a compress run will do: its fingerprint (``cfg_hash``), its output prefix, and the shards still to do."""

from __future__ import annotations

import dataclasses
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
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
from pipeline.selector import SELECTION_VERSIONS
from pipeline.sources import ShardRef, dataset_root, list_input

# Every config field is fingerprinted except these, each of which cannot change the stored bytes. By
# construction: a new field is in cfg_hash unless it is listed here (tests/test_config.py
# test_every_field_is_fingerprinted_or_listed_as_not_changing_the_bytes checks both ways).
NOT_FINGERPRINTED: dict[str, str] = {
    # How and where the work runs.
    "executor": "the local and Ray executors store the same rows",
    "dry_run": "writes nothing",
    "progress_interval_s": "log cadence",
    "ray": "actor counts, resources and retries schedule the same work",
    "storage": "endpoint, region and credentials reach the same objects",
    "encoder.batch_size": "micro-batching does not change a tile's features",
    "encoder.compile": "torch.compile runs the same graph",
    "encoder.device": "enters as the resolved compute dtype (compute_dtype below), the part of it that matters",
    "encoder.dtype": "enters as the resolved compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)",
    "encoder.local_files_only": "where the checkpoint is read from, not what it holds",
    "encoder.preprocessor": "enters through the image_mean / image_std / resize_mode values it resolves",
    "selector.checkpoint": "its content enters as selector_fingerprint, not its location",
    # decode.device=cuda (nvJPEG + GPU resize) matches the CPU path to within one pixel level, well below the
    # bf16 rounding of the features, and a GPU host already gets its own prefix through compute_dtype.
    "decode.device": "GPU decoding matches the CPU path to within one uint8 level",
    # Dataset identity is input.root (resolved); the pattern only selects which shards exist today.
    "input.path": "the pattern selects shards; shard ids and cfg_hash use input.root",
    "input.missing": "what to do about absent brace members, not how a shard is encoded",
    "output.path": "the parent of the prefix",
    "output.keep_removed_inputs": "which shards the manifest shows, not any shard's bytes",
    "output.on_duplicate_key": "which rows the manifest shows, not any shard's bytes",
}
# The selector's parameter each mode reads: the other modes' parameters are left out of the hash.
MODE_PARAMS = {"threshold": "threshold", "ratio": "ratio", "budget": "budget", "error": "max_error"}


def compute_dtype(cfg: CompressConfig) -> str:
    """The dtype the encoder computes in: auto resolves to bfloat16 where the encoder runs on a GPU."""
    if cfg.encoder.dtype != "auto":
        return cfg.encoder.dtype
    device = cfg.encoder.device
    if device == "auto":
        if cfg.executor == "local":
            import torch

            on_gpu = torch.cuda.is_available()
        else:
            on_gpu = cfg.ray.num_gpus_per_actor > 0
    else:
        on_gpu = device.startswith("cuda")
    return "bfloat16" if on_gpu else "float32"


def not_fingerprinted(cfg: CompressConfig) -> set[str]:
    """Dotted names of the fields left out of this config's fingerprint: the fixed list plus what its mode ignores."""
    skipped = set(NOT_FINGERPRINTED)
    selector = cfg.selector
    if selector.method == "none":
        skipped.update(f"selector.{name}" for name in ("mode", "seed", *MODE_PARAMS.values()))
    else:
        skipped.update(f"selector.{name}" for mode, name in MODE_PARAMS.items() if mode != selector.mode)
    return skipped


def output_fingerprint_payload(cfg: CompressConfig, encoder_fingerprint: str, selector_fingerprint: str) -> dict:
    """Everything that changes the stored bytes, and nothing else: every config field minus NOT_FINGERPRINTED
    (by section, as ``_config.json`` and the dataset card read it), plus the dataset root, the compute dtype and
    the weights' and selector's content hashes."""
    skipped = not_fingerprinted(cfg)
    mode_fields = {f"selector.{name}" for name in MODE_PARAMS.values()}

    def kept(value: Any, prefix: str) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: kept(v, f"{prefix}{k}.") for k, v in value.items()
                if f"{prefix}{k}" not in skipped and f"{prefix}{k}" not in mode_fields}

    payload = {name: value for name, value in kept(to_dict(cfg), "").items()}
    selector = cfg.selector
    active = None if selector.method == "none" else MODE_PARAMS[selector.mode]
    payload["input"]["root"] = dataset_root(cfg.input)
    payload["selector"].update(fingerprint=selector_fingerprint, mode=payload["selector"].get("mode"),
                               param=None if active is None else getattr(selector, active),
                               algorithm=SELECTION_VERSIONS.get(selector.method))
    return {
        **payload,
        "schema_version": SCHEMA_VERSION,
        "compute_dtype": compute_dtype(cfg),
        "encoder_fingerprint": encoder_fingerprint,
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
    root: str = ""  # the dataset root shard ids are relative to
    missing: list[str] = dataclasses.field(default_factory=list)  # brace members that do not exist (skipped)
    added: list[str] = dataclasses.field(default_factory=list)  # to-do shards this prefix has never committed
    changed: list[str] = dataclasses.field(default_factory=list)  # to-do shards committed under another fingerprint

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
    # The input listing and the marker listing are independent, and at 100k shards each is ~100 sequential
    # LIST pages: run them side by side.
    with ThreadPoolExecutor(max_workers=1) as pool:
        listed = pool.submit(list_input, cfg.input, storage_options)
        markers = load_markers(output_dir, storage_options)  # one listing, the index, and only new bodies
        listing = listed.result()
    shards = listing.shards
    committed = by_source(markers)
    todo = [s for s in shards if (s.shard_id, s.fingerprint) not in committed]
    known_ids = {shard_id for shard_id, _ in committed}
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
        root=listing.root,
        missing=listing.missing,
        added=[s.shard_id for s in todo if s.shard_id not in known_ids],
        changed=[s.shard_id for s in todo if s.shard_id in known_ids],
    )
