import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fsspec.implementations.local import LocalFileSystem
from job_runs import list_files

from pipeline.storage import (
    InputReadError,
    create_exclusive,
    filesystem_for,
    join_url,
    object_fingerprint,
    open_verified,
    read_bytes,
    url_for,
    write_bytes,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URL, storage options) on local disk and on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store", request.getfixturevalue("s3_options")


def test_write_then_read_and_list(root):
    url, options = root
    write_bytes(join_url(url, "b", "two.bin"), b"2", options)
    write_bytes(join_url(url, "a.bin"), b"1", options)
    write_bytes(join_url(url, "a.bin"), b"one", options)  # replaces
    assert read_bytes(join_url(url, "a.bin"), options) == b"one"
    assert list_files(url, options) == [join_url(url, "a.bin"), join_url(url, "b", "two.bin")]
    assert list_files(join_url(url, "missing"), options) == []


def test_create_exclusive_keeps_the_first_object(root):
    url, options = root
    marker = join_url(url, "_committed", "shard-0.json")
    assert create_exclusive(marker, b'{"attempt": 1}', options) is True
    assert create_exclusive(marker, b'{"attempt": 2}', options) is False
    assert read_bytes(marker, options) == b'{"attempt": 1}'
    assert list_files(url, options) == [marker]  # no temporary file left behind


def test_create_exclusive_race_has_one_winner(tmp_path):
    # Local only: moto checks If-None-Match and stores the object in two steps, so it can admit two racers.
    marker = str(tmp_path / "race.json")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: create_exclusive(marker, f"writer {i}".encode(), {}), range(8)))
    assert results.count(True) == 1
    assert read_bytes(marker, {}) == f"writer {results.index(True)}".encode()


def test_create_exclusive_refuses_empty_data(tmp_path):
    with pytest.raises(ValueError, match="must not be empty"):
        create_exclusive(str(tmp_path / "x"), b"", {})


def test_filesystem_for_applies_options_to_remote_only(tmp_path, s3_bucket, s3_options):
    fs, path = filesystem_for(str(tmp_path / "f.bin"), s3_options)  # S3 options must not reach the local fs
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path / "f.bin")
    assert url_for(fs, path) == path
    fs, path = filesystem_for(f"s3://{s3_bucket}/k/f.bin", s3_options)
    assert path == f"{s3_bucket}/k/f.bin"
    assert url_for(fs, path) == f"s3://{s3_bucket}/k/f.bin"


def test_open_verified_reads_what_was_listed_and_names_a_changed_object(root):
    url, options = root
    shard = join_url(url, "in", "a.tar")
    write_bytes(shard, b"x" * 1000, options)
    fs, path = filesystem_for(shard, options)
    listed = fs.info(path)
    with open_verified(shard, options, listed["size"], object_fingerprint(listed)) as f:
        assert f.read(10) == b"x" * 10 and f.read() == b"x" * 990 and f.read() == b""
    with pytest.raises(InputReadError, match="short read, 1000 of 1200 listed bytes"), \
            open_verified(shard, options, 1200, object_fingerprint(listed)) as f:
        f.read()
    time.sleep(0.01)  # a new mtime for the local fingerprint
    write_bytes(shard, b"y" * 1000, options)
    with pytest.raises(InputReadError, match=f"{shard}: changed since it was listed"):
        open_verified(shard, options, listed["size"], object_fingerprint(listed))
