"""Input listing: a path, glob or brace pattern, local or ``s3://``, becomes sorted, fingerprinted shards."""

from __future__ import annotations

import logging
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

from braceexpand import braceexpand
from fsspec import AbstractFileSystem

from pipeline.config import ConfigError, InputConfig, stable_hash
from pipeline.sources.folder_reader import (
    IMAGE_EXTENSIONS,
    SIDECAR_EXTENSIONS,
    list_folder,
    member_key,
    split_member,
)
from pipeline.sources.samples import ShardFormat, ShardRef
from pipeline.storage import filesystem_for, listed_infos, object_fingerprint, url_for

log = logging.getLogger(__name__)

# Compressed tars are read as webdataset reads them (tarfile detects the compression).
FILE_SUFFIXES: dict[ShardFormat, tuple[str, ...]] = {"webdataset": (".tar", ".tar.gz", ".tgz"),
                                                     "parquet": (".parquet",)}
_GLOB = re.compile(r"[*?\[]")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
MAX_ID_LENGTH = 96


@dataclass(frozen=True)
class _Found:
    """A file the pattern reaches, and the names it gets in shard ids and folder shards."""

    url: str
    rel: str  # relative to the dataset root (input.root)
    folder: str  # URL of the folder a folder shard groups it under: the matched directory, or the file's parent
    folder_rel: str
    member: str  # relative to ``folder``
    info: dict[str, Any]

    @property
    def kind(self) -> str | None:
        name = self.member.lower()
        for fmt, suffix in FILE_SUFFIXES.items():
            if name.endswith(suffix):
                return fmt
        return "folder" if split_member(name)[1] in IMAGE_EXTENSIONS else None


@dataclass(frozen=True)
class InputListing:
    """What the input pattern reaches: the shards, and the brace members that do not exist (skipped)."""

    root: str
    shards: list[ShardRef]
    missing: list[str]


def list_shards(cfg: InputConfig, storage_options: dict[str, Any]) -> list[ShardRef]:
    """The input shards, sorted by URL. Raises ConfigError naming ``input.path`` when nothing usable matches."""
    return list_input(cfg, storage_options).shards


def list_input(cfg: InputConfig, storage_options: dict[str, Any]) -> InputListing:
    """:func:`list_shards` plus the dataset root the shard ids are relative to and the missing brace members."""
    root = dataset_root(cfg)
    found, missing = _find(cfg, root, storage_options)
    fmt = _detect_format(cfg, found)
    if fmt == "folder":
        shards = _folder_shards(found, cfg.folder_shard_size)
    else:
        for f in found:
            if f.kind == fmt and "problem" in f.info:
                log.warning(f"[listing] skipped {f.url}: {f.info['problem']}")
        shards = [_file_shard(f, fmt) for f in found if f.kind == fmt and "problem" not in f.info]
    if missing:
        log.info(f"[listing] {len(missing)} brace members of input.path do not exist (skipped, input.missing=skip), "
                 f"e.g. {missing[0]}")
    return InputListing(root=root, shards=sorted(_unique_ids(shards), key=lambda s: (s.url, s.shard_id)),
                        missing=missing)


def dataset_root(cfg: InputConfig) -> str:
    """``input.root``, else the longest fixed prefix of ``input.path`` cut at a ``/``: the folder itself for a
    folder, the parent for one file, the part before the first glob or brace character for a pattern."""
    if cfg.root:
        return cfg.root.rstrip("/") or "/"
    path = cfg.path
    special = re.search(r"[*?\[{]", path)
    if special:
        fixed = path[: special.start()]
        root = fixed[: fixed.rfind("/")] if "/" in fixed else ""
    elif _looks_like_file(path):
        root = path[: path.rfind("/")] if "/" in path else ""
    else:
        root = path.rstrip("/")
    if root == "" and path.startswith("/"):
        return "/"
    return root or "."


def _looks_like_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return name.endswith(tuple(s for suffixes in FILE_SUFFIXES.values() for s in suffixes)) or \
        split_member(name)[1] in IMAGE_EXTENSIONS


def _find(cfg: InputConfig, root: str, storage_options: dict[str, Any]) -> tuple[list[_Found], list[str]]:
    found: dict[str, _Found] = {}
    missing: list[str] = []
    alternatives = list(braceexpand(cfg.path))
    listed = listed_infos(alternatives, storage_options)  # a listing per folder, not a HEAD per name
    _, root_path = filesystem_for(root, storage_options)
    root_path = root_path.rstrip("/") or "/"
    for alternative in alternatives:
        fs, path = filesystem_for(alternative, storage_options)
        fs.invalidate_cache()  # a long-lived process must see shards added or rewritten since its last listing
        try:
            matches = _matches(fs, path, alternative, listed)
        except ConfigError:
            # A member of a brace range that is not there (yet): a nightly range fills up over time.
            if len(alternatives) == 1 or cfg.missing == "error":
                raise
            missing.append(alternative)
            continue
        for match, info in matches.items():
            if info["type"] == "directory":
                folder, files = match, list_folder(fs, match).items()
            else:
                folder, files = posixpath.dirname(match), [(match, info)]
            for file, file_info in files:
                url = url_for(fs, file)
                if url not in found:
                    found[url] = _Found(
                        url=url,
                        rel=_relative(file, root_path, cfg),
                        folder=url_for(fs, folder),
                        folder_rel=_relative(folder, root_path, cfg),
                        member=_below(file, folder),
                        info=file_info,
                    )
    if not found and missing:
        raise ConfigError(f"input.path: none of the {len(missing)} names of {cfg.path!r} exists "
                          f"(e.g. {missing[0]})")
    return sorted(found.values(), key=lambda f: f.url), missing


def _relative(path: str, root_path: str, cfg: InputConfig) -> str:
    if path != root_path and not path.startswith(root_path.rstrip("/") + "/"):
        raise ConfigError(f"input.root: {dataset_root(cfg)!r} is not above {path!r}, which input.path reaches; "
                          "set input.root to a folder that holds every input shard (or leave it unset)")
    return _below(path, root_path)


def _below(path: str, folder: str) -> str:
    """``posixpath.relpath`` for a path inside ``folder``, without its per-call ``abspath`` (100k shards)."""
    if path == folder:
        return "."
    return path[len(folder.rstrip("/")) + 1:]


def _matches(fs: AbstractFileSystem, path: str, alternative: str,
             listed: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{matched path: info}; a plain path must exist."""
    if _GLOB.search(path):
        return fs.glob(path, detail=True)
    try:
        info = (listed or {}).get(path) or fs.info(path)
    except FileNotFoundError:
        raise ConfigError(f"input.path: {alternative} does not exist") from None
    return {path: info}


def _detect_format(cfg: InputConfig, found: list[_Found]) -> ShardFormat:
    if not found:
        raise ConfigError(f"input.path: {cfg.path!r} matches no files")
    kinds = sorted({f.kind for f in found if f.kind is not None})
    if cfg.format != "auto":
        if cfg.format not in kinds:
            raise ConfigError(f"input.path: {cfg.path!r} holds no {_describe(cfg.format)} (input.format={cfg.format})")
        return cfg.format
    if not kinds:
        described = ", ".join(_describe(fmt) for fmt in ("webdataset", "parquet", "folder"))
        raise ConfigError(f"input.path: {cfg.path!r} holds no {described}")
    if len(kinds) > 1:
        raise ConfigError(
            f"input.path: {cfg.path!r} holds several input formats ({', '.join(_describe(k) for k in kinds)}); "
            "narrow the pattern or set input.format"
        )
    return kinds[0]


def _describe(fmt: str) -> str:
    return f"{'/'.join(FILE_SUFFIXES[fmt])} files" if fmt in FILE_SUFFIXES else "image files"


def _file_shard(found: _Found, fmt: ShardFormat) -> ShardRef:
    suffix = next(s for s in FILE_SUFFIXES[fmt] if found.rel.lower().endswith(s))
    stem = found.rel[: -len(suffix)]
    return ShardRef(
        shard_id=_safe_id(stem.replace("/", "__"), found.url),
        url=found.url,
        fingerprint=_fingerprint(found.info),
        size=int(found.info["size"]),
        format=fmt,
    )


def _folder_shards(found: list[_Found], shard_size: int) -> list[ShardRef]:
    """Each folder's images, sorted by key, in runs of ``shard_size``; a sidecar joins its image's shard, and a
    problem entry (see :func:`list_folder`) counts as an image, so the reader quarantines it with its reason."""
    by_folder: dict[str, dict[str, list[_Found]]] = defaultdict(lambda: defaultdict(list))
    for f in found:
        ext = split_member(f.member)[1]
        if ext in IMAGE_EXTENSIONS or ext in SIDECAR_EXTENSIONS or "problem" in f.info:
            by_folder[f.folder][member_key(f.member)].append(f)
    shards = []
    for folder, by_key in by_folder.items():
        keys = sorted(key for key, files in by_key.items()
                      if any(f.kind == "folder" or "problem" in f.info for f in files))
        if not keys:
            continue
        any_file = by_key[keys[0]][0]
        label = _safe_id(posixpath.basename(folder) if any_file.folder_rel == "." else
                         any_file.folder_rel.replace("/", "__"), folder)
        for index in range(0, len(keys), shard_size):
            files = sorted(
                (f for key in keys[index : index + shard_size] for f in by_key[key]),
                # The reader groups a key's files by adjacency; for images and sidecars, (key, extension).
                key=lambda f: (member_key(f.member), split_member(f.member)[1]),
            )
            shards.append(
                ShardRef(
                    shard_id=f"{label}-{index // shard_size:05d}",
                    url=folder,
                    fingerprint=stable_hash([[f.member, _fingerprint(f.info)] for f in files]),
                    size=sum(int(f.info["size"]) for f in files),
                    format="folder",
                    members=tuple(f.member for f in files),
                    problems=tuple((f.member, f.info["problem"]) for f in files if "problem" in f.info),
                )
            )
    return shards


def _safe_id(name: str, url: str) -> str:
    """``name`` when it is short and file-name safe; otherwise a sanitized prefix plus a hash of ``url``."""
    safe = _UNSAFE_ID_CHARS.sub("_", name).lstrip(".")
    if safe == name and len(safe) <= MAX_ID_LENGTH:
        return safe
    return f"{safe[:MAX_ID_LENGTH]}-{stable_hash(url, 8)}"


def _unique_ids(shards: list[ShardRef]) -> list[ShardRef]:
    """Ids that collide (same relative name reached through different brace alternatives) get a hash of the URL."""
    counts = Counter(s.shard_id for s in shards)
    return [
        replace(s, shard_id=f"{s.shard_id}-{stable_hash([s.url, s.shard_id], 8)}") if counts[s.shard_id] > 1 else s
        for s in shards
    ]


def _fingerprint(info: dict[str, Any]) -> str:
    return object_fingerprint(info)  # the rule open_verified checks a read against
