"""List (and with apply=true remove) attempt files that no commit marker references.

    python -m jobs.gc path=OUTPUT [grace_hours=24] [apply=true]
"""

from pipeline.cli import log, run_job
from pipeline.output.gc import GcConfig, find_orphans, remove


def main(cfg: GcConfig) -> dict:
    orphans = find_orphans(cfg)
    for orphan in orphans:
        log(f"[gc] {'removing' if cfg.apply else 'would remove'} {orphan.url} ({orphan.bytes} bytes, "
            f"{orphan.age_hours:.1f} h old)")
    if cfg.apply:
        remove(orphans, cfg)
    return {"path": cfg.path, "applied": cfg.apply, "orphans": len(orphans),
            "bytes": sum(o.bytes for o in orphans), "files": [o.url for o in orphans]}


if __name__ == "__main__":
    run_job(GcConfig, main, prog="gc")
