"""Every file access goes through here: a URL (local path or ``s3://``) plus fsspec storage options.

Storage options (endpoint, region, ``anon``) apply to remote filesystems only; credentials come from the
environment and never pass through this module's arguments or messages.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import JobError

LOCAL_PROTOCOLS = ("file", "local")
# Local writes go to a hidden temporary file first; a crash or full disk can leave one (jobs.gc lists them).
TMP_SUFFIX = ".tmp"


def is_local(url: str) -> bool:
    return fsspec.utils.get_protocol(url) in LOCAL_PROTOCOLS


def filesystem_for(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path of ``url`` on it (no protocol; absolute when local)."""
    options = {} if is_local(url) else dict(storage_options or {})
    return fsspec.core.url_to_fs(url, **options)


def url_for(fs: AbstractFileSystem, path: str) -> str:
    """The URL of ``path`` on ``fs``: a plain path when local, ``protocol://path`` otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def absolute_url(url: str) -> str:
    """A relative local path made absolute against this process's directory; other URLs unchanged.

    Ray workers do not share the driver's working directory (Ray Train moves them to a run folder), so paths
    are resolved in the driver before any work is shipped.
    """
    return os.path.abspath(url) if is_local(url) and "://" not in url else url


def join_url(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem_for(url, storage_options)
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write (or replace) a whole object; readers never see a partial one, and locally it survives a crash
    once this returns (write, fsync, rename, fsync the directory)."""
    fs, path = filesystem_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _naming_path(path):
            tmp = _write_local_temp(path, data)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _fsync_directory(os.path.dirname(path))
    else:
        fs.pipe_file(path, data)  # an S3 PUT is atomic


def create_exclusive(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Create ``url`` holding ``data`` unless it exists. True if the object now holds exactly ``data``: this
    call created it, or an earlier try of this same call did and its response was lost (the store's client
    retried the PUT and got 412). False if another writer's object is there.

    Callers make ``data`` unique to the writer (a commit marker carries its attempt id and commit time), so
    equal bytes can only be their own. Atomic among concurrent callers, and the object appears complete.
    Locally a fsynced temporary file is hard-linked into place (``link`` fails when the target exists) and
    the directory fsynced; on S3 the PUT carries ``If-None-Match: *``. ``data`` must not be empty: s3fs
    writes an empty object without the condition.
    """
    if not data:
        raise ValueError(f"create_exclusive({url!r}): data must not be empty")
    fs, path = filesystem_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        with _naming_path(path):
            tmp = _write_local_temp(path, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return _holds(fs, path, data)
            finally:
                _unlink_quietly(tmp)
            _fsync_directory(os.path.dirname(path))
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return _holds(fs, path, data)
    return True


def _holds(fs: AbstractFileSystem, path: str, data: bytes) -> bool:
    """Whether the existing object at ``path`` is exactly ``data`` (read fresh, never from a cache)."""
    fs.invalidate_cache(path)
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:  # removed since (set aside as corrupt): not ours
        return False


@contextlib.contextmanager
def _naming_path(path: str) -> Iterator[None]:
    """A full disk or quota names the file it could not write (``OSError`` alone names nothing useful)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{path}: no space left on device ({errno.errorcode[exc.errno]}) — free space "
                                "there and rerun; `python -m jobs.gc` lists leftover temporary files") from None
        raise


class DiskFullError(OSError):
    """A local write ran out of space; the message names the path."""


def _write_local_temp(path: str, data: bytes) -> str:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory: str) -> None:
    """Make a rename or link in ``directory`` durable (the file's own fsync does not cover its name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_many(fs: AbstractFileSystem, paths: list[str], max_workers: int = 32) -> dict[str, bytes]:
    """{path: bytes} of many small objects, read concurrently (object stores answer one GET per round trip).

    s3fs batches the GETs on its event loop; other filesystems get a bounded thread pool.
    """
    if not paths:
        return {}
    if getattr(fs, "async_impl", False):
        return fs.cat(paths, batch_size=max_workers, on_error="raise") if len(paths) > 1 else \
            {paths[0]: fs.cat_file(paths[0])}
    with ThreadPoolExecutor(min(max_workers, len(paths))) as pool:
        return dict(zip(paths, pool.map(fs.cat_file, paths)))


# ------------------------------------------------------------------------------------------- verified reads

READ_ATTEMPTS = 3


class InputReadError(JobError):
    """An input object read back differently from its listing (short, or changed): the shard fails, never
    becomes quarantine. The message names the URL."""


def object_fingerprint(info: dict[str, Any]) -> str:
    """The object's ETag where the store has one, else size and modification time."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info['size']}-{info.get('mtime')}"


def open_verified(url: str, storage_options: dict[str, Any] | None, size: int, fingerprint: str) -> VerifiedFile:
    """Open an input object for reading, checking it against its listing: the same fingerprint (ETag) now,
    and exactly ``size`` bytes read. A short read is retried from where it stopped (``READ_ATTEMPTS`` times);
    then, or when the object changed, :class:`InputReadError` names the URL."""
    fs, path = filesystem_for(url, storage_options)
    for attempt in range(READ_ATTEMPTS):
        fs.invalidate_cache(path)
        now = object_fingerprint(fs.info(path))
        if now == fingerprint:
            break
    else:
        raise InputReadError(f"{url}: changed since it was listed (fingerprint {fingerprint} -> {now}); "
                             "rerun to read the new version")
    return VerifiedFile(fs, path, url, size)


class VerifiedFile(io.RawIOBase):
    """A read-only, seekable file that never returns fewer bytes than the listed size allows."""

    def __init__(self, fs: AbstractFileSystem, path: str, url: str, size: int) -> None:
        super().__init__()
        self.fs, self.path, self.url, self.size = fs, path, url, size
        self.position = 0
        self.file = fs.open(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        self.file.seek(self.position)
        return self.position

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self.size - self.position)
        want = left if n is None or n < 0 else min(n, left)
        chunks, got, failures = [], 0, 0
        while got < want:
            try:
                chunk = self.file.read(want - got)
            except Exception as exc:  # noqa: BLE001 - any failed read (reset, checksum) is retried
                chunk, error = b"", exc
            else:
                error = None
            if chunk:
                chunks.append(chunk)
                got += len(chunk)
                continue
            failures += 1
            if failures >= READ_ATTEMPTS and isinstance(error, OSError):
                # A network error the client could not retry away either: raised as itself (the job runner
                # words those), with the URL attached.
                error.add_note(f"reading {self.url} at byte {self.position + got} of {self.size}")
                raise error
            if failures >= READ_ATTEMPTS:
                raise InputReadError(
                    f"{self.url}: short read, {self.position + got} of {self.size} listed bytes after "
                    f"{READ_ATTEMPTS} attempts{f' ({error})' if error else ''}; the shard is not committed"
                ) from None
            self._reopen(self.position + got)
        self.position += got
        return b"".join(chunks)

    def _reopen(self, position: int) -> None:
        self.file.close()
        self.fs.invalidate_cache(self.path)
        self.file = self.fs.open(self.path, "rb")
        self.file.seek(position)

    def close(self) -> None:
        if not self.closed:
            self.file.close()
        super().close()


def listed_infos(urls: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{path: info} for plain (non-glob) object-store URLs, from one listing per parent folder holding two or
    more of them, instead of a HEAD per name (a brace pattern over 100,000 shards is 100 LISTs, not 100,000
    HEADs). Names the listing does not show are left out: the caller asks for them one by one. Local
    paths are left out too (a stat costs nothing)."""
    by_parent: dict[str, list[str]] = {}
    filesystems = {}
    for url in urls:
        if is_local(url) or any(c in url for c in "*?["):
            continue
        fs, path = filesystem_for(url, storage_options)
        parent = posixpath.dirname(path)
        by_parent.setdefault(parent, []).append(path)
        filesystems[parent] = fs
    infos: dict[str, dict[str, Any]] = {}
    for parent, paths in by_parent.items():
        if len(paths) < 2:
            continue
        fs = filesystems[parent]
        fs.invalidate_cache(parent)
        try:
            listing = {entry["name"].rstrip("/"): entry for entry in fs.ls(parent, detail=True)}
        except FileNotFoundError:
            continue
        infos.update({p: listing[p] for p in paths if p in listing})
    return infos
