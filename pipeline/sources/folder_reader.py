"""Folder shards: each image file is a sample keyed by its path without suffix; same-key .txt/.json are sidecars.

On local disks a folder is walked here rather than by fsspec: only regular files (symlinks resolved) are
samples, and whatever else the walk meets under an image's name, or a folder it cannot list, becomes a
*problem* entry with its reason, which the reader turns into a quarantine row without ever opening it. A FIFO
named ``x.jpg`` would block the reader forever, and a symlink loop fails every ``stat``. Reads are guarded the
same way (a file can change between listing and reading): opened non-blocking and checked to be regular.
"""

from __future__ import annotations

import errno
import itertools
import os
import posixpath
import stat
from typing import Any, Iterator

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import InputConfig
from pipeline.sources.samples import (
    IMAGE_EXTENSIONS,
    Oversized,
    Quarantined,
    RawSample,
    ShardRef,
    sample_from_members,
)
from pipeline.storage import filesystem_for

__all__ = ["IMAGE_EXTENSIONS", "SIDECAR_EXTENSIONS", "list_folder", "read_folder_shard", "split_member"]

SIDECAR_EXTENSIONS = ("txt", "json")
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def split_member(name: str) -> tuple[str, str]:
    """(key, lower-case extension) of a member path relative to the folder."""
    key, _, ext = name.rpartition(".")
    return key, ext.lower()


def member_key(name: str) -> str:
    """The sample key a member belongs to: its path without an image or sidecar extension."""
    key, ext = split_member(name)
    return key if ext in IMAGE_EXTENSIONS or ext in SIDECAR_EXTENSIONS else name


# --------------------------------------------------------------------------------------------- listing


def list_folder(fs: AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """{path: info} of every file under ``root``, as ``fs.find(root, detail=True)`` gives them; locally the
    regular files only, plus problem entries whose info has ``problem`` (the reason) and is never opened."""
    if not isinstance(fs, LocalFileSystem):
        return fs.find(root, detail=True)  # an object store holds objects only
    return _walk_local(root)


def _walk_local(root: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    top = os.stat(root)  # an unreadable input.path fails the listing: nothing else could be listed
    first_seen = {(top.st_dev, top.st_ino): root}
    stack = [(root, frozenset(first_seen))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError as exc:
            if folder == root:
                raise
            found[folder] = _problem(folder, f"listing error: cannot list folder {_relative(folder, root)!r}: "
                                             f"{_os_reason(exc)}; its files are not read")
            continue
        for entry in entries:
            path, name = entry.path, _relative(entry.path, root)
            if _printable(path) != path:
                found[_printable(path)] = _problem(path, f"invalid key: not UTF-8 (file name {_printable(name)!r})")
                continue
            try:
                info = os.stat(path)  # follows symlinks
            except FileNotFoundError:
                if entry.is_symlink():
                    found[path] = _problem(path, f"dangling symlink: {name} -> {_link_target(path)}")
                continue  # removed since the folder was listed: no longer there to read
            except OSError as exc:
                found[path] = _problem(path, f"{_os_reason(exc)}: {name}")
                continue
            if stat.S_ISDIR(info.st_mode):
                ident = (info.st_dev, info.st_ino)
                if ident in ancestors:
                    found[path] = _problem(path, f"symlink loop: {name} -> {_link_target(path)} leads back to "
                                                 f"{_relative(first_seen[ident], root)!r}")
                elif ident in first_seen:
                    found[path] = _problem(path, f"duplicate folder: {name} is the folder "
                                                 f"{_relative(first_seen[ident], root)!r}, listed already")
                else:
                    first_seen[ident] = path
                    stack.append((path, ancestors | {ident}))
            elif stat.S_ISREG(info.st_mode):
                found[path] = {"name": path, "type": "file", "size": info.st_size, "mtime": info.st_mtime}
            else:
                found[path] = _problem(path, f"not a regular file: {name} is {_file_kind(info.st_mode)}; "
                                             "skipped unopened")
    return found


def _problem(path: str, reason: str) -> dict[str, Any]:
    try:
        mtime = os.lstat(path).st_mtime
    except OSError:
        mtime = None
    return {"name": path, "type": "file", "size": 0, "mtime": mtime, "problem": reason}


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path != root else "."


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _link_target(path: str) -> str:
    try:
        return _printable(os.readlink(path))
    except OSError:
        return "?"


def _file_kind(mode: int) -> str:
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"unreadable ({exc.strerror or type(exc).__name__})"


# --------------------------------------------------------------------------------------------- reading


class _Unusable(Exception):
    """A member found unusable at read time; the message is the quarantine reason."""


def read_folder_shard(
    shard: ShardRef, cfg: InputConfig, storage_options: dict[str, Any]
) -> Iterator[RawSample | Quarantined]:
    fs, root = filesystem_for(shard.url, storage_options)
    problems = dict(shard.problems)
    for key, names in itertools.groupby(shard.members, key=member_key):
        names = list(names)
        problem = next((problems[name] for name in names if name in problems), None)
        if problem is not None:
            # A folder that cannot be listed hides how many samples it holds: unknown, counted as one.
            yield Quarantined(key, shard.shard_id, problem, samples=None if problem.startswith("listing error") else 1)
            continue
        images = [name for name in names if split_member(name)[1] in IMAGE_EXTENSIONS]
        files = [name for name in names if name not in images[1:]]
        try:
            members = {
                split_member(name)[1]: _read(fs, root, name, cfg.max_member_bytes) for name in files
            }
        except _Unusable as exc:
            yield Quarantined(key, shard.shard_id, str(exc))
        else:
            yield sample_from_members(shard.shard_id, key, members, IMAGE_EXTENSIONS, cfg.max_member_bytes)
        for _ in images[1:]:
            yield Quarantined(key, shard.shard_id, "duplicate key")


def _read(fs: AbstractFileSystem, root: str, name: str, max_bytes: int) -> bytes | Oversized:
    path = posixpath.join(root, name)
    if isinstance(fs, LocalFileSystem):
        return _read_local(path, name, max_bytes)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)  # one ranged GET on object stores
    except FileNotFoundError as exc:
        raise _Unusable(f"missing file: removed after listing ({exc})") from None
    return Oversized(fs.size(path)) if len(data) > max_bytes else data


def _read_local(path: str, name: str, max_bytes: int) -> bytes | Oversized:
    """The file's bytes, opened without blocking (a FIFO would wait for a writer) and only if regular."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise _Unusable(f"dangling symlink: {name} -> {_link_target(path)}") from None
        raise _Unusable(f"missing file: removed after listing ({exc})") from None
    except OSError as exc:
        raise _Unusable(f"{_os_reason(exc)}: {name}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unusable(f"not a regular file: {name} is {_file_kind(info.st_mode)}; skipped unread")
        if info.st_size > max_bytes:
            return Oversized(info.st_size)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise _Unusable(f"{_os_reason(exc)}: {name}") from None
    finally:
        os.close(fd)
    return Oversized(len(data)) if len(data) > max_bytes else data
