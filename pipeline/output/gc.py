"""Find and remove attempt files no current commit marker references (crashed or lost attempts; the versions
of changed or removed inputs that the manifest no longer shows, with their markers), and temporary files that
local writes left behind (a crash or a full disk between write and rename)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from pipeline.config import Config, StorageConfig, require
from pipeline.output.commit import (
    COMMITTED_DIR,
    DATA_DIR,
    QUARANTINE_DIR,
    STAGING_DIR,
    by_source,
    list_committed,
    load_markers,
    marker_listing,
    marker_name,
    set_aside_if_corrupt,
    write_marker_index,
)
from pipeline.output.manifest import (
    MANIFEST_NAME,
    current_shards,
    read_manifest,
    read_retired,
    write_manifest,
)
from pipeline.storage import TMP_SUFFIX, filesystem_for, url_for

log = logging.getLogger(__name__)

# _staging/ holds attempts not yet committed: no marker ever names a file there, so past the grace period
# every one is garbage (a crashed or lost attempt's, or a staged copy whose delete did not happen).
ATTEMPT_DIRS = (DATA_DIR, QUARANTINE_DIR, STAGING_DIR)
# compress writes _config.json before any data file, so a run that crashed before its first commit is found too.
OUTPUT_MARKERS = ("_config.json", COMMITTED_DIR)


@dataclass(kw_only=True)
class GcConfig(Config):
    """Remove uncommitted attempt files under a compress output (dry run unless apply=true)."""

    path: str = "demo_output/compressed"
    grace_hours: float = 24.0
    apply: bool = False
    # Read every marker (not the index), set aside those that do not parse, rewrite the marker index and the
    # manifest from them: the explicit full rebuild behind compress's incremental manifest update.
    repair: bool = False
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self) -> None:
        require(self.grace_hours >= 0, "grace_hours", "must be >= 0 (hours an unreferenced file is left alone)")


@dataclass
class Orphan:
    url: str
    bytes: int
    age_hours: float


def _modified(info: dict) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if value is not None else time.time()


def output_dirs(fs, root: str) -> list[str]:
    """``root`` itself when it is a compress output, else every cfg_hash folder below it."""
    if any(fs.exists(f"{root}/{name}") for name in OUTPUT_MARKERS):
        return [root]
    return sorted({p.rsplit("/", 1)[0] for name in OUTPUT_MARKERS for p in fs.glob(f"{root}/**/{name}")})


def find_orphans(cfg: GcConfig, now: float | None = None) -> list[Orphan]:
    now = time.time() if now is None else now
    options = cfg.storage.storage_options()
    fs, root = filesystem_for(cfg.path.rstrip("/"), options)
    protocol = cfg.path.split("://", 1)[0] + "://" if "://" in cfg.path else ""
    orphans = []
    for output_dir in output_dirs(fs, root):
        referenced, superseded = _references(fs, protocol + output_dir, options, now)
        for name, (age_hours, _) in superseded.items():
            if age_hours >= cfg.grace_hours:  # the marker goes first, so no marker ever names a deleted file
                marker = f"{output_dir}/{COMMITTED_DIR}/{name}"
                orphans.append(Orphan(url=protocol + marker, bytes=0, age_hours=age_hours))
        retired_files = {path: age for age, paths in superseded.values() for path in paths}
        for folder in ATTEMPT_DIRS:
            if not fs.exists(f"{output_dir}/{folder}"):
                continue
            for path, info in sorted(fs.find(f"{output_dir}/{folder}", detail=True).items()):
                relative = path[len(output_dir) + 1:]
                age_hours = (now - _modified(info)) / 3600
                if relative in retired_files:  # a superseded or removed input's: its grace runs from then
                    age_hours = retired_files[relative]
                if relative not in referenced and age_hours >= cfg.grace_hours and not _is_temporary(path):
                    orphans.append(Orphan(url=protocol + path, bytes=int(info.get("size", 0)), age_hours=age_hours))
        orphans.extend(_temporaries(fs, output_dir, protocol, now, cfg.grace_hours))
    return sorted(orphans, key=lambda o: o.url)


def _references(fs, output_dir: str, options: dict, now: float) -> tuple[set[str], dict[str, tuple[float, list[str]]]]:
    """(files a current marker or the manifest references, {superseded marker name: (hours since it left the
    manifest, its files)}). Current: the manifest shows it, or it was committed after the manifest was written
    (a run in progress). Without a manifest every marker is current."""
    markers = list_committed(output_dir, options)
    try:
        shown = read_manifest(output_dir, options)
        written = _modified(fs.info(filesystem_for(f"{output_dir}/{MANIFEST_NAME}", options)[1]))
    except (FileNotFoundError, ValueError):
        shown, written = None, now
    # What the manifest shows is read by loaders now (its keep_first copies, a torn marker's files until a rerun
    # replaces them), so it is never collected.
    referenced = {row["path"] for row in shown or []}
    shown_versions = {(row["shard_id"], row["source_fingerprint"]) for row in shown or []}
    retired = read_retired(output_dir, options)
    superseded = {}
    for key, shard in markers.items():
        files = [f.path for f in shard.files + shard.quarantine_files]
        if shown is None or key in shown_versions or shard.committed_at > written:
            referenced.update(files)
        else:
            name = marker_name(shard.shard_id, shard.source_fingerprint)
            superseded[name] = ((now - retired.get(name, written)) / 3600, files)
    return referenced, superseded


def _is_temporary(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _temporaries(fs, output_dir: str, protocol: str, now: float, grace_hours: float) -> list[Orphan]:
    """Local writes' temporary files (``.name.<uuid>.tmp``) that a crash or a full disk left anywhere in the
    output; they never hold committed data. Object stores write no temporaries."""
    if not isinstance(fs, LocalFileSystem):
        return []
    found = []
    for path, info in fs.find(output_dir, detail=True).items():
        age_hours = (now - _modified(info)) / 3600
        if _is_temporary(path) and age_hours >= grace_hours:
            found.append(Orphan(url=protocol + path, bytes=int(info.get("size", 0)), age_hours=age_hours))
    return found


def remove(orphans: list[Orphan], cfg: GcConfig) -> None:
    fs, _ = filesystem_for(cfg.path, cfg.storage.storage_options())
    for orphan in orphans:
        fs.rm(filesystem_for(orphan.url, cfg.storage.storage_options())[1])


def repair_output(output_dir: str, storage_options: dict) -> dict:
    """Rebuild ``output_dir``'s marker index and manifest from every marker body; markers that do not parse
    are moved to ``_committed/_corrupt/``. Each shard keeps the version the old manifest showed, else the
    newest marker (the input is not read here)."""
    fs, root = filesystem_for(f"{output_dir}/{COMMITTED_DIR}", storage_options)
    listed = marker_listing(fs, root)
    markers = load_markers(output_dir, storage_options, known={})
    corrupt = [name for name in listed if name not in markers]
    for name in corrupt:
        set_aside_if_corrupt(url_for(fs, listed[name][0]), storage_options)
    try:
        shown = {row["shard_id"]: row["source_fingerprint"] for row in read_manifest(output_dir, storage_options)}
    except (FileNotFoundError, ValueError):
        shown = {}
    retired = read_retired(output_dir, storage_options)
    # A version a run already dropped from the manifest (a removed or changed input) does not come back.
    visible = [s for s in current_shards(by_source(markers), shown)
               if s.shard_id in shown or marker_name(s.shard_id, s.source_fingerprint) not in retired]
    write_manifest(output_dir, visible, storage_options)
    write_marker_index(output_dir, markers, storage_options)
    log.info(f"[gc] repaired {output_dir}: {len(markers)} markers read, {len(corrupt)} set aside, "
             f"{len(visible)} shards in the manifest")
    return {"output": output_dir, "markers": len(markers), "corrupt": len(corrupt), "shards": len(visible)}


def run_gc(cfg: GcConfig) -> dict:
    """``jobs.gc``: list the orphans, remove them with ``apply=true``, summarise; ``repair=true`` first
    rebuilds each output's marker index and manifest from every marker."""
    repaired = []
    if cfg.repair:
        options = cfg.storage.storage_options()
        fs, root = filesystem_for(cfg.path.rstrip("/"), options)
        protocol = cfg.path.split("://", 1)[0] + "://" if "://" in cfg.path else ""
        repaired = [repair_output(protocol + d, options) for d in output_dirs(fs, root)]
    orphans = find_orphans(cfg)
    for orphan in orphans:
        log.info(f"[gc] {'removing' if cfg.apply else 'would remove'} {orphan.url} ({orphan.bytes} bytes, "
                 f"{orphan.age_hours:.1f} h old)")
    if cfg.apply:
        remove(orphans, cfg)
    return {"path": cfg.path, "applied": cfg.apply, "orphans": len(orphans),
            "bytes": sum(o.bytes for o in orphans), "files": [o.url for o in orphans],
            **({"repaired": repaired} if cfg.repair else {})}
