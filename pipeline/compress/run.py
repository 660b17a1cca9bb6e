"""The compress run: plan, run the stages, commit each shard, rebuild the manifest and stats."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import Counter
from typing import Any

from pipeline import __version__
from pipeline.compress.executors import run_stages
from pipeline.compress.plan import RunPlan, plan_compress
from pipeline.compress.progress import LiveProgress, ProgressReporter
from pipeline.compress.shard_committer import RunTotals, ShardCommitter
from pipeline.config import CompressConfig, JobError
from pipeline.encoders import VisionEncoder, checkpoint_preprocessing
from pipeline.output.commit import by_source, load_markers, write_dataset_card, write_marker_index
from pipeline.output.format import format_metadata
from pipeline.output.manifest import (
    DuplicateKey,
    current_shards,
    find_duplicate_keys,
    hide_keys,
    read_manifest,
    record_retired,
    write_manifest,
)
from pipeline.stages.encode_select import Models
from pipeline.storage import DiskFullError, InputReadError, absolute_url, write_bytes

log = logging.getLogger(__name__)


def load_models(cfg: CompressConfig) -> Models:
    """The encoder and selector, loaded here first, so a bad model or checkpoint fails early. A local run keeps
    them for its stages, on their device; otherwise they are loaded on the CPU for their fingerprints only."""
    runs_stages_here = cfg.executor == "local" and not cfg.dry_run
    encoder_cfg = cfg.encoder if runs_stages_here else dataclasses.replace(cfg.encoder, device="cpu", compile=False)
    try:
        encoder = VisionEncoder.from_config(encoder_cfg)
    except OSError as exc:
        raise JobError(f"encoder {cfg.encoder.name!r} cannot be loaded: {exc}") from None
    return Models.around(encoder, cfg)


def _file_metadata(plan: RunPlan, dim: int) -> dict[str, Any]:
    cfg = plan.config
    selector = cfg.selector
    return format_metadata(
        encoder=cfg.encoder.name,
        encoder_fingerprint=plan.encoder_fingerprint,
        select_layer=cfg.encoder.select_layer,
        dtype=cfg.output.dtype,
        dim=dim,
        side=cfg.encoder.image_size // cfg.encoder.patch_size,
        selector=selector.method,
        selector_fingerprint=plan.selector_fingerprint,
        mode=selector.mode,
        params={"threshold": selector.threshold, "ratio": selector.ratio, "budget": selector.budget,
                "min_tokens": selector.min_tokens},
        cfg_hash=plan.cfg_hash,
    )


def _write_stats(plan: RunPlan, committed_now: list, run_summary: dict[str, Any], storage_options: dict) -> None:
    histogram: Counter = Counter()
    totals = Counter()
    for shard in committed_now:
        histogram.update({int(k): v for k, v in shard.kept_histogram.items()})
        totals.update(images=shard.rows, quarantined=shard.quarantined, tokens_full=shard.tokens_full,
                      tokens_kept=shard.tokens_kept, shards=1)
    stats = {
        "cfg_hash": plan.cfg_hash,
        "shards": {name: run_summary.get(f"shards_{name}") for name in
                   ("total", "added", "changed", "removed", "missing", "skipped")},
        "totals": dict(totals),
        "kept_fraction": totals["tokens_kept"] / totals["tokens_full"] if totals["tokens_full"] else None,
        "kept_tokens_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        "last_run": run_summary,
    }
    write_bytes(f"{plan.output_dir}/stats.json", json.dumps(stats, indent=1, sort_keys=True).encode(), storage_options)


def with_absolute_paths(cfg: CompressConfig) -> CompressConfig:
    checkpoint = cfg.selector.checkpoint
    return dataclasses.replace(
        cfg,
        input=dataclasses.replace(cfg.input, path=absolute_url(cfg.input.path),
                                  root=absolute_url(cfg.input.root) if cfg.input.root else None),
        output=dataclasses.replace(cfg.output, path=absolute_url(cfg.output.path)),
        selector=dataclasses.replace(cfg.selector, checkpoint=absolute_url(checkpoint) if checkpoint else None),
    )


def _root_cause(exc: BaseException) -> str:
    """The one-line message of the storage error a worker raised, without the executor's wrapping (Ray
    adds its task's traceback and its own hints)."""
    for name in ("InputReadError", "DiskFullError"):
        found = re.findall(rf"{name}: (.+)", str(exc))
        if found:
            return found[-1].strip()
    return str(exc).strip().splitlines()[0]


def _unfinished(committer: ShardCommitter, plan: RunPlan) -> str:
    done = committer.totals.shards_processed + committer.totals.shards_lost_race
    return f"{done} of {len(plan.todo)} shards committed this run, {len(plan.todo) - done} left unfinished; rerun"


def run_compress(cfg: CompressConfig) -> dict[str, Any]:
    started = time.monotonic()
    cfg = with_absolute_paths(cfg)
    # The checkpoint's image processor, resolved once here: the fingerprint, the decode stage and the actors
    # all see the values the tower is fed with.
    cfg = dataclasses.replace(cfg, encoder=checkpoint_preprocessing(cfg.encoder))
    storage_options = cfg.storage.storage_options()
    models = load_models(cfg)
    dim = models.encoder.hidden_size
    plan = plan_compress(cfg, models.encoder.fingerprint(), models.selector.fingerprint())
    if cfg.executor != "local":
        models = None  # the actors load their own; this copy only named them
    log.info(f"[compress] output {plan.output_dir} | shards {len(plan.shards)} | to do {len(plan.todo)} "
             f"| already committed {plan.skipped}")
    shown_before = _shown_shards(plan.output_dir, storage_options)
    current_ids = {s.shard_id for s in plan.shards}
    removed = sorted(set(shown_before) - current_ids)
    summary: dict[str, Any] = {"output": plan.output_dir, "cfg_hash": plan.cfg_hash, "shards_total": len(plan.shards),
                               "shards_skipped": plan.skipped, "shards_added": len(plan.added),
                               "shards_changed": len(plan.changed), "shards_removed": len(removed),
                               "shards_missing": len(plan.missing), **dataclasses.asdict(RunTotals())}
    if cfg.dry_run:
        for shard in plan.todo:
            log.info(f"[compress] to do: {shard.shard_id} {shard.url}")
        return {**summary, "dry_run": True, "todo": [s.shard_id for s in plan.todo],
                "wall_s": round(time.monotonic() - started, 3)}
    try:
        resolved = plan.resolved_config()
        write_bytes(f"{plan.output_dir}/_config.json",
                    json.dumps({**resolved, "atr_version": __version__}, indent=1, sort_keys=True).encode(),
                    storage_options)
        write_dataset_card(plan.output_dir, storage_options, resolved)  # before the first commit can land
    except OSError as exc:
        raise JobError(f"output {plan.output_dir} is not writable: {exc}") from None
    committer = ShardCommitter(plan.output_dir, plan.run_id, storage_options)
    if plan.todo:
        live = LiveProgress()
        try:
            with ProgressReporter(len(plan.todo), sum(s.size for s in plan.todo), cfg.progress_interval_s, live,
                                  committer.totals):
                for record in run_stages(plan, _file_metadata(plan, dim), live, models):
                    committer.observe(record)
        except (InputReadError, DiskFullError) as exc:
            raise JobError(f"{_root_cause(exc)} ({_unfinished(committer, plan)})") from None
        if committer.unfinished():
            raise JobError(f"shards not fully written: {', '.join(committer.unfinished())}; rerun to finish them")
    fingerprints_now = {s.shard_id: s.fingerprint for s in plan.shards}
    # From the markers planning found plus the ones committed since (this run's, a concurrent run's): no
    # marker is read twice across runs. `jobs.gc repair=true` rebuilds the index from every marker.
    markers = load_markers(plan.output_dir, storage_options, known=plan.committed)
    visible = current_shards(by_source(markers), fingerprints_now, keep_removed=cfg.output.keep_removed_inputs)
    visible, duplicates = _unique_keys(plan, visible, storage_options)
    write_manifest(plan.output_dir, visible, storage_options)
    record_retired(plan.output_dir, list(markers), visible, storage_options)
    write_marker_index(plan.output_dir, markers, storage_options)
    totals = committer.totals
    wall_s = time.monotonic() - started
    summary.update(
        dataclasses.asdict(totals),
        kept_fraction=round(totals.tokens_kept / totals.tokens_full, 4) if totals.tokens_full else None,
        images_per_s=round(totals.images / wall_s, 2), wall_s=round(wall_s, 3),
    )
    summary["duplicate_keys"] = len(duplicates)
    log.info(f"[compress] shards: {len(plan.added)} added, {len(plan.changed)} changed, {len(removed)} removed"
             f"{' (kept, output.keep_removed_inputs=true)' if removed and cfg.output.keep_removed_inputs else ''}, "
             f"{len(plan.missing)} missing, {plan.skipped} skipped; {len(visible)} in the manifest")
    accounted = "=" if totals.input_samples == totals.images + totals.quarantined else "!="  # "!=" is a bug
    log.info(f"[compress] input samples {totals.input_samples} {accounted} kept {totals.images} + quarantined "
             f"{totals.quarantined}")
    if plan.todo or removed or duplicates:
        _write_stats(plan, visible, summary, storage_options)
    return summary


def _shown_shards(output_dir: str, storage_options: dict) -> dict[str, str]:
    """{shard id: source fingerprint} of what the manifest showed before this run (empty on a first run)."""
    try:
        return {row["shard_id"]: row["source_fingerprint"] for row in read_manifest(output_dir, storage_options)}
    except (OSError, ValueError):  # none yet, or unreadable: writing _config.json next names the problem
        return {}


def _unique_keys(plan: RunPlan, visible: list, storage_options: dict) -> tuple[list, list[DuplicateKey]]:
    """The visible shards with every key once: a key two shards hold fails the run (on_duplicate_key=error,
    before the manifest changes) or stays in the first shard by shard id (keep_first)."""
    duplicates = find_duplicate_keys(plan.output_dir, visible, storage_options)
    if not duplicates:
        return visible, duplicates
    first = duplicates[0]
    where = f"key {first.key!r} is in shards {first.kept_in} and {first.also_in}"
    if plan.config.output.on_duplicate_key == "error":
        raise JobError(f"{len(duplicates)} duplicate keys across input shards ({where}); remove them from one "
                       "input, or set output.on_duplicate_key=keep_first to keep each key's first shard only")
    log.warning(f"[compress] {len(duplicates)} duplicate keys across input shards ({where}); each is kept in "
                "its first shard by shard id (output.on_duplicate_key=keep_first)")
    hidden: dict[str, set[str]] = {}
    for duplicate in duplicates:
        hidden.setdefault(duplicate.also_in, set()).add(duplicate.key)
    return [hide_keys(plan.output_dir, s, hidden[s.shard_id], storage_options) if s.shard_id in hidden else s
            for s in visible], duplicates
