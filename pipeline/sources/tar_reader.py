"""WebDataset tar shards, streamed one member at a time; member names are keys, never paths.

Compressed tars (gzip, bzip2, xz; named ``.tar.gz``, ``.tgz``, or even ``.tar``) are read as webdataset reads
them: tarfile's stream mode detects the compression from the first bytes.
"""

from __future__ import annotations

import re
import tarfile
from typing import IO, Any, Iterator

from pipeline.config import InputConfig
from pipeline.sources.samples import (
    IMAGE_EXTENSIONS,
    REST_OF_SHARD,
    Oversized,
    Quarantined,
    RawSample,
    ShardRef,
    sample_from_members,
)
from pipeline.storage import open_verified

# webdataset's rules: skip "__name__" metadata members; the key runs to the first dot of the base name.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_TRUNCATION_HINTS = ("end of data", "end-of-archive", "truncated", "empty file")


class _TarDamage(Exception):
    """The archive cannot be read past this point; the message is the quarantine reason."""


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records the header error that ended the archive.

    Past the first member, tarfile ends a stream silently on a missing, truncated or garbled header as it
    does on the end-of-archive zero block; the recorded error tells a clean end from damage.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.end_error = exc  # type: ignore[attr-defined]
            raise


def read_tar_shard(
    shard: ShardRef, cfg: InputConfig, storage_options: dict[str, Any]
) -> Iterator[RawSample | Quarantined]:
    image_exts = (cfg.image_column,) if cfg.image_column else IMAGE_EXTENSIONS
    with open_verified(shard.url, storage_options, shard.size, shard.fingerprint) as stream:
        try:
            for key, members in _tar_groups(stream, cfg.max_member_bytes):
                yield sample_from_members(shard.shard_id, key, members, image_exts, cfg.max_member_bytes)
        except _TarDamage as damage:
            # How many samples followed the damage is unknowable: the record counts as one.
            yield Quarantined(REST_OF_SHARD, shard.shard_id, str(damage), samples=None)


def _tar_groups(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[str, dict[str, bytes | Oversized]]]:
    """(key, {extension: bytes}) per run of consecutive members sharing a key, in archive order.

    A group is complete, and yielded, as soon as the next key's header is read, so damage inside a member
    costs only that member's group. A repeated extension starts a new group with the same key, which the
    duplicate-key rule then quarantines. Raises _TarDamage where the archive breaks.
    """
    tar, last, key, group = None, None, None, {}
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndTrackingTarInfo)
        except (TypeError, ValueError) as exc:  # tarfile's gzip header parser on a cut header: ord(b"")
            raise tarfile.ReadError(f"corrupt compressed header ({type(exc).__name__}: {exc})") from exc
        while (info := tar.next()) is not None:
            tar.members = []  # stream mode would otherwise keep every header of the shard
            match = _KEY_AND_EXT.match(info.name)
            if not info.isreg() or _META_MEMBER.match(info.name) or match is None:
                continue
            member_key, ext = match.group(1), match.group(2).lower()
            if member_key != key or ext in group:
                if key is not None:
                    yield key, group
                key, group = member_key, {}
            group[ext] = Oversized(info.size) if info.size > max_bytes else tar.extractfile(info).read()
            last = info.name
    except (tarfile.TarError, EOFError) as exc:  # EOFError: a compressed stream cut inside its own header
        raise _TarDamage(_damage_reason(exc, last, tar)) from exc
    end = getattr(tar, "end_error", None)
    if end is not None and not isinstance(end, tarfile.EOFHeaderError):
        raise _TarDamage(_damage_reason(end, last, tar))
    if key is not None:
        yield key, group


def _damage_reason(exc: Exception, last: str | None, tar: tarfile.TarFile | None) -> str:
    if isinstance(exc, tarfile.EmptyHeaderError):
        detail = "no end-of-archive marker"
    else:
        detail = str(exc) or type(exc).__name__
    kind = "truncated" if any(hint in detail for hint in _TRUNCATION_HINTS) else "corrupt"
    where = f"after member {last!r}" if last is not None else "before the first member"
    return f"{kind} tar {where} at offset {tar.offset if tar is not None else 0}: {detail}"
