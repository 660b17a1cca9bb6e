"""An indexed ListObjectsV2 for moto, so that a benchmark at 100k+ keys measures the client, not moto.

moto answers every ListObjectsV2 page by walking and sorting the whole bucket (``S3Backend.list_objects_v2``
calls ``list_objects`` with no limit), so at 200,000 keys one page costs it seconds of CPU where S3 answers from
an index. ``install()`` replaces that method, in this process, with one that keeps a sorted list of each
bucket's key names (rebuilt only after the bucket's key store changed) and answers a page by bisecting to its
start and reading one page's worth of names. Pages, truncation and continuation tokens are the same as moto's
own: ``tests/test_moto_listing.py`` compares the two on random buckets. ``serve`` runs such a moto in a process
of its own, as S3 is another machine: in the client's process its request handling would share the client's GIL.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any

_MUTATORS = ("__setitem__", "__delitem__", "pop", "setlist", "clear", "update", "setdefault", "popitem")
_original_list_objects_v2 = None


def _track_mutations(store_class: type) -> None:
    """Make every change to a bucket's key store bump its ``_atr_generation``."""
    if getattr(store_class, "_atr_tracked", False):
        return
    for name in _MUTATORS:
        method = getattr(store_class, name)

        def tracked(self, *args, _method=method, **kwargs):
            self.__dict__["_atr_generation"] = self.__dict__.get("_atr_generation", 0) + 1
            return _method(self, *args, **kwargs)

        setattr(store_class, name, tracked)
    store_class._atr_tracked = True


def _sorted_names(bucket: Any) -> list[str]:
    store = bucket.keys
    generation = store.__dict__.get("_atr_generation", 0)
    cached = store.__dict__.get("_atr_index")
    if cached is None or cached[0] != generation:
        cached = (generation, sorted(dict.keys(store)))
        store.__dict__["_atr_index"] = cached
    return cached[1]


def indexed_list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
    from moto.s3.models import FakeDeleteMarker, FakeTableStorageBucket
    from moto.utilities.utils import md5_hash

    if isinstance(bucket, FakeTableStorageBucket):
        return _original_list_objects_v2(self, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
    prefix = prefix or ""
    names = _sorted_names(bucket)
    after = self._pagination_tokens.get(continuation_token) if continuation_token else start_after
    index = bisect.bisect_left(names, prefix)
    if after:
        index = max(index, bisect.bisect_right(names, after))
    page: list[Any] = []
    while index < len(names) and len(page) <= max_keys:
        name = names[index]
        if not name.startswith(prefix):
            break
        rest = name[len(prefix):]
        if delimiter and delimiter in rest:
            folder = prefix + rest.split(delimiter)[0] + delimiter
            if not after or folder > after:
                page.append(folder)
            index = bisect.bisect_left(names, folder[:-1] + chr(ord(folder[-1]) + 1))  # past the folder's keys
            continue
        key = bucket.keys[name]
        if not isinstance(key, FakeDeleteMarker):
            page.append(key)
        index += 1
    if max_keys == 0:
        return [], False, None
    if len(page) <= max_keys:
        return page, False, None
    page = page[:max_keys]
    last = page[-1] if isinstance(page[-1], str) else page[-1].name
    token = md5_hash(last.encode("utf-8")).hexdigest()
    self._pagination_tokens[token] = last
    return page, True, token


def install() -> None:
    """Patch moto's S3 backend in this process (idempotent)."""
    global _original_list_objects_v2
    from moto.s3.models import S3Backend
    from moto.s3.utils import _VersionedKeyStore

    _track_mutations(_VersionedKeyStore)
    if _original_list_objects_v2 is None:
        _original_list_objects_v2 = S3Backend.list_objects_v2
        S3Backend.list_objects_v2 = indexed_list_objects_v2


def serve(port: int, indexed: bool, env: dict[str, str], commands, replies) -> None:
    """A moto S3 server on 127.0.0.1:port in this process. ``commands`` takes ``("put", bucket, [(key, body)])``
    (straight into the backend, as a previous run would have left the objects) and ``("stop",)``."""
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    if indexed:
        install()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    replies.put("ready")
    try:
        for command in iter(commands.get, ("stop",)):
            _, bucket, objects = command
            backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
            for key, body in objects:
                backend.put_object(bucket, key, body)
            replies.put(len(objects))
    finally:
        server.stop()
