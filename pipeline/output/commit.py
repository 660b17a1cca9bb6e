"""The commit protocol: a shard counts only once its marker exists.

Data files are written under attempt-unique names by any worker; only the driver calls :func:`commit_shard`,
which creates ``_committed/{shard_id}.{source}.json`` if absent. A loser of a commit race deletes its own files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import create_exclusive, filesystem_for

COMMITTED_DIR = "_committed"
# Attempt files: written under attempt-unique names, visible only once a marker references them.
DATA_DIR = "data"
QUARANTINE_DIR = "quarantine"


@dataclass
class WrittenFile:
    path: str  # relative to the output dir
    rows: int
    bytes: int
    sha256: str


@dataclass
class CommittedShard:
    shard_id: str
    source_url: str
    source_fingerprint: str
    attempt: str
    files: list[WrittenFile] = field(default_factory=list)
    quarantine_files: list[WrittenFile] = field(default_factory=list)
    rows: int = 0
    quarantined: int = 0
    tokens_full: int = 0
    tokens_kept: int = 0
    kept_histogram: dict[str, int] = field(default_factory=dict)
    committed_at: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CommittedShard":
        data = dict(data)
        data["files"] = [WrittenFile(**f) for f in data.get("files", [])]
        data["quarantine_files"] = [WrittenFile(**f) for f in data.get("quarantine_files", [])]
        return cls(**data)


def source_tag(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:10]


def marker_url(output_dir: str, shard_id: str, fingerprint: str) -> str:
    return f"{output_dir}/{COMMITTED_DIR}/{shard_id}.{source_tag(fingerprint)}.json"


def list_committed(output_dir: str, storage_options: dict) -> dict[tuple[str, str], CommittedShard]:
    """All markers, keyed by (shard_id, source fingerprint). One listing, no guessing."""
    fs, root = filesystem_for(f"{output_dir}/{COMMITTED_DIR}", storage_options)
    if not fs.exists(root):
        return {}
    found = {}
    for path in sorted(fs.find(root)):
        if not path.endswith(".json"):
            continue
        shard = CommittedShard.from_json(json.loads(fs.cat_file(path)))
        found[(shard.shard_id, shard.source_fingerprint)] = shard
    return found


def commit_shard(output_dir: str, shard: CommittedShard, storage_options: dict) -> bool:
    """Create the shard's marker if absent. False means another attempt won: this attempt's files are removed."""
    shard = dataclasses.replace(shard, committed_at=shard.committed_at or time.time())
    payload = json.dumps(dataclasses.asdict(shard), sort_keys=True, indent=1).encode()
    if create_exclusive(marker_url(output_dir, shard.shard_id, shard.source_fingerprint), payload, storage_options):
        return True
    delete_files(output_dir, [f.path for f in shard.files + shard.quarantine_files], storage_options)
    return False


def delete_files(output_dir: str, relative_paths: list[str], storage_options: dict) -> None:
    fs, root = filesystem_for(output_dir, storage_options)
    for relative in relative_paths:
        path = f"{root}/{relative}"
        if fs.exists(path):
            fs.rm(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
