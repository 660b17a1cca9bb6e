"""Find and remove attempt files no commit marker references (crashed or lost attempts)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from pipeline.config import Config, StorageConfig, require
from pipeline.output.commit import COMMITTED_DIR, DATA_DIR, QUARANTINE_DIR, list_committed
from pipeline.storage import filesystem_for

log = logging.getLogger(__name__)

ATTEMPT_DIRS = (DATA_DIR, QUARANTINE_DIR)
# compress writes _config.json before any data file, so a run that crashed before its first commit is found too.
OUTPUT_MARKERS = ("_config.json", COMMITTED_DIR)


@dataclass(kw_only=True)
class GcConfig(Config):
    """Remove uncommitted attempt files under a compress output (dry run unless apply=true)."""

    path: str = "demo_output/compressed"
    grace_hours: float = 24.0
    apply: bool = False
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
        referenced = set()
        for shard in list_committed(protocol + output_dir, options).values():
            referenced.update(f.path for f in shard.files + shard.quarantine_files)
        for folder in ATTEMPT_DIRS:
            if not fs.exists(f"{output_dir}/{folder}"):
                continue
            for path, info in sorted(fs.find(f"{output_dir}/{folder}", detail=True).items()):
                relative = path[len(output_dir) + 1:]
                age_hours = (now - _modified(info)) / 3600
                if relative not in referenced and age_hours >= cfg.grace_hours:
                    orphans.append(Orphan(url=protocol + path, bytes=int(info.get("size", 0)), age_hours=age_hours))
    return orphans


def remove(orphans: list[Orphan], cfg: GcConfig) -> None:
    fs, _ = filesystem_for(cfg.path, cfg.storage.storage_options())
    for orphan in orphans:
        fs.rm(filesystem_for(orphan.url, cfg.storage.storage_options())[1])


def run_gc(cfg: GcConfig) -> dict:
    """``jobs.gc``: list the orphans, remove them with ``apply=true``, summarise."""
    orphans = find_orphans(cfg)
    for orphan in orphans:
        log.info(f"[gc] {'removing' if cfg.apply else 'would remove'} {orphan.url} ({orphan.bytes} bytes, "
                 f"{orphan.age_hours:.1f} h old)")
    if cfg.apply:
        remove(orphans, cfg)
    return {"path": cfg.path, "applied": cfg.apply, "orphans": len(orphans),
            "bytes": sum(o.bytes for o in orphans), "files": [o.url for o in orphans]}
