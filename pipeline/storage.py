"""Every file access goes through here: a URL (local path or ``s3://``) plus fsspec storage options.

Storage options (endpoint, region, ``anon``) apply to remote filesystems only; credentials come from the
environment and never pass through this module's arguments or messages.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

LOCAL_PROTOCOLS = ("file", "local")


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
    """Write (or replace) a whole object; readers never see a partial one."""
    fs, path = filesystem_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _write_local_temp(path, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)  # an S3 PUT is atomic


def create_exclusive(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Create ``url`` holding ``data`` unless it exists: True if this call created it, False if it existed.

    Atomic among concurrent callers, and the object appears complete. Locally a temporary file is
    hard-linked into place (``link`` fails when the target exists); on S3 the PUT carries
    ``If-None-Match: *``. ``data`` must not be empty: s3fs writes an empty object without the condition.
    """
    if not data:
        raise ValueError(f"create_exclusive({url!r}): data must not be empty")
    fs, path = filesystem_for(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        tmp = _write_local_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    return True


def _write_local_temp(path: str, data: bytes) -> str:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
    return tmp
