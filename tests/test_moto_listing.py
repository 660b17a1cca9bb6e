"""bench.moto_listing answers ListObjectsV2 pages exactly as moto's own implementation does."""

from __future__ import annotations

import random

import pytest

moto_models = pytest.importorskip("moto.s3.models")

from bench import moto_listing  # noqa: E402


def _pages(backend, bucket, list_v2, prefix, delimiter, max_keys, start_after):
    pages, token = [], None
    while True:
        entries, truncated, token = list_v2(backend, backend.get_bucket(bucket), prefix, delimiter, token,
                                            None if token else start_after, max_keys)
        pages.append([e if isinstance(e, str) else (e.name, e.etag) for e in entries])
        if not truncated or max_keys == 0:
            return pages


def test_indexed_pages_equal_motos_on_random_buckets():
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import S3Backend, s3_backends

    moto_listing.install()
    original = moto_listing._original_list_objects_v2
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    rng = random.Random(7)
    bucket = f"listing-{rng.randrange(10**9)}"
    backend.create_bucket(bucket, "us-east-1")
    alphabet = "ab/-_.0"
    names = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(400)}
    for name in names:
        backend.put_object(bucket, name, b"x")
    for round_ in range(3):
        for _ in range(40):
            prefix = rng.choice(["", "a", "a/", "b/-", "ab", "/"])
            delimiter = rng.choice([None, "/", "-"])
            max_keys = rng.choice([0, 1, 3, 17, 1000])
            start_after = rng.choice([None, "a", "a/b", "b"])
            args = (backend, bucket)
            assert _pages(*args, S3Backend.list_objects_v2, prefix, delimiter, max_keys, start_after) == \
                _pages(*args, original, prefix, delimiter, max_keys, start_after), (prefix, delimiter, max_keys)
        # Change the bucket between rounds: the index must follow deletions, new keys and overwrites.
        for name in rng.sample(sorted(names), 50):
            backend.delete_object(bucket, name)
            names.discard(name)
        for _ in range(30):
            name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7)))
            backend.put_object(bucket, name, f"v{round_}".encode())
            names.add(name)
