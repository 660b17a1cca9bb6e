import gzip
import io
import json
import os
import pwd
import random
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, DecodeConfig, InputConfig
from pipeline.sources import (
    REST_OF_SHARD,
    Quarantined,
    RawSample,
    dataset_root,
    iter_shard,
    list_input,
    list_shards,
)
from pipeline.sources.decode import DecodeError, decode_image
from pipeline.storage import join_url, write_bytes


def image_bytes(color=(200, 30, 60), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, fmt)
    return buffer.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def parquet_bytes(table: pa.Table, **options) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


def samples_of(path: str, options: dict | None = None, **cfg) -> list[RawSample | Quarantined]:
    input_cfg, options = InputConfig(path=path, **cfg), options or {}
    return [item for shard in list_shards(input_cfg, options) for item in iter_shard(shard, input_cfg, options)]


def outcome(items: list[RawSample | Quarantined]) -> dict[str, str]:
    """key -> "ok" or the quarantine reason (later duplicates under key + "#2")."""
    result: dict[str, str] = {}
    for item in items:
        name = item.key if item.key not in result else item.key + "#2"
        result[name] = "ok" if isinstance(item, RawSample) else item.reason
    return result


WDS_MEMBERS = [
    ("000.jpg", image_bytes((255, 0, 0))),
    ("000.txt", b"a red square"),
    ("000.cls", b"3"),
    ("000.npy", b"\x93NUMPY binary is not passed through"),
    ("001.png", image_bytes((0, 255, 0), "PNG")),
    ("001.json", b'{"caption": "a green square", "family": "natural"}'),
]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(root URL, storage options) on local disk and on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "in"), {}
    return f"s3://{request.getfixturevalue('s3_bucket')}/in", request.getfixturevalue("s3_options")


def put(root: str, options: dict, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        write_bytes(join_url(root, rel), data, options)


# ------------------------------------------------------------------------------------------------ listing


def test_lists_tars_by_directory_glob_and_braces(store):
    root, options = store
    put(root, options, {f"wds/shard-{i:05d}.tar": tar_bytes(WDS_MEMBERS[: i + 1]) for i in range(3)})
    put(root, options, {"wds/README.txt": b"not a shard"})
    shards = list_shards(InputConfig(path=f"{root}/wds"), options)
    assert [s.shard_id for s in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [s.url for s in shards] == [f"{root}/wds/shard-{i:05d}.tar" for i in range(3)]
    assert {s.format for s in shards} == {"webdataset"} and all(s.size > 0 and s.fingerprint for s in shards)
    assert list_shards(InputConfig(path=f"{root}/wds/shard-*.tar"), options) == shards
    assert list_shards(InputConfig(path=f"{root}/wds/shard-{{00000..00002}}.tar"), options) == shards
    picked = list_shards(InputConfig(path=f"{root}/wds/shard-{{00000,00002}}.tar"), options)
    assert [s.shard_id for s in picked] == ["shard-00000", "shard-00002"]


def test_shard_ids_are_relative_to_the_dataset_root_and_absent_brace_members_are_counted(store):
    root, options = store
    put(root, options, {f"laion/{i:05d}.tar": tar_bytes(WDS_MEMBERS[:1]) for i in (0, 1, 3)})
    for pattern in ("laion", "laion/*.tar", "laion/{00000..00004}.tar", "laion/0000{0..4}.tar"):
        cfg = InputConfig(path=f"{root}/{pattern}")
        listing = list_input(cfg, options)
        assert dataset_root(cfg) == listing.root == f"{root}/laion"
        assert [s.shard_id for s in listing.shards] == ["00000", "00001", "00003"], pattern
        assert len(listing.missing) == (2 if "{" in pattern else 0)
    assert dataset_root(InputConfig(path=f"{root}/laion/00001.tar")) == f"{root}/laion"
    nested = list_shards(InputConfig(path=f"{root}/{{laion,gone}}/*.tar"), options)
    assert [s.shard_id for s in nested] == ["laion__00000", "laion__00001", "laion__00003"]
    with pytest.raises(ConfigError, match=r"^input\.path: .*00002\.tar does not exist"):
        list_shards(InputConfig(path=f"{root}/laion/{{00000..00004}}.tar", missing="error"), options)
    with pytest.raises(ConfigError, match=r"^input\.path: none of the 2 names"):
        list_shards(InputConfig(path=f"{root}/laion/{{00007,00008}}.tar"), options)
    with pytest.raises(ConfigError, match=r"^input\.root: .* is not above"):
        list_shards(InputConfig(path=f"{root}/laion", root=f"{root}/elsewhere"), options)


def test_fingerprint_changes_with_content(store):
    root, options = store
    put(root, options, {"a.tar": tar_bytes(WDS_MEMBERS[:2]), "b.tar": tar_bytes(WDS_MEMBERS[:2])})
    before = {s.shard_id: s.fingerprint for s in list_shards(InputConfig(path=root), options)}
    put(root, options, {"b.tar": tar_bytes(WDS_MEMBERS[:4])})
    if not options:  # same-second rewrites must not depend on the clock's resolution
        os.utime(f"{root}/b.tar", ns=(0, 10**18))
    after = {s.shard_id: s.fingerprint for s in list_shards(InputConfig(path=root), options)}
    assert after["a"] == before["a"] and after["b"] != before["b"]


def test_lists_parquet_and_folder_shards(store):
    root, options = store
    put(root, options, {"pq/part-0.parquet": parquet_bytes(pa.table({"key": ["k"], "jpg": [image_bytes()]}))})
    [shard] = list_shards(InputConfig(path=f"{root}/pq"), options)
    assert (shard.shard_id, shard.format) == ("part-0", "parquet")

    put(root, options, {f"photos/{name}.jpg": image_bytes() for name in "edcba"})
    put(root, options, {"photos/a.txt": b"caption a", "photos/orphan.txt": b"no image"})
    shards = list_shards(InputConfig(path=f"{root}/photos", folder_shard_size=2), options)
    assert [s.shard_id for s in shards] == ["photos-00000", "photos-00001", "photos-00002"]
    assert [s.members for s in shards] == [("a.jpg", "a.txt", "b.jpg"), ("c.jpg", "d.jpg"), ("e.jpg",)]
    assert {s.url for s in shards} == {f"{root}/photos"}


def test_missing_or_unusable_input_is_a_config_error(store):
    root, options = store
    put(root, options, {"mixed/a.tar": tar_bytes(WDS_MEMBERS), "mixed/b.parquet": b"PAR1", "docs/x.txt": b"x"})
    for path, message in [
        (f"{root}/nothing-here.tar", "does not exist"),
        (f"{root}/mixed/*.zip", "matches no files"),
        (f"{root}/docs", "holds no .tar/.tar.gz/.tgz files, .parquet files, image files"),
        (f"{root}/mixed", "several input formats"),
    ]:
        with pytest.raises(ConfigError, match=rf"^input\.path: .*{message}"):
            list_shards(InputConfig(path=path), options)
    assert [s.format for s in list_shards(InputConfig(path=f"{root}/mixed", format="parquet"), options)] == ["parquet"]


def test_shard_ids_are_safe_unique_and_stable(tmp_path):
    root = str(tmp_path)
    put(root, {}, {"one/x.tar": tar_bytes(WDS_MEMBERS), "two/x.tar": tar_bytes(WDS_MEMBERS)})
    put(root, {}, {"one/café shard (1).tar": tar_bytes(WDS_MEMBERS), f"one/{'long' * 40}.tar": tar_bytes(WDS_MEMBERS)})
    cfg = InputConfig(path=f"{root}/{{one,two}}/*.tar")
    ids = [s.shard_id for s in list_shards(cfg, {})]
    assert len(set(ids)) == 4 and all(re.fullmatch(r"[A-Za-z0-9._-]{1,120}", i) for i in ids)
    assert any(i.startswith("one__caf__shard__1_-") for i in ids) and {"one__x", "two__x"} <= set(ids)
    assert ids == [s.shard_id for s in list_shards(cfg, {})]
    assert list_shards(InputConfig(path=f"{root}/one/*.tar"), {})[-1].shard_id == "x"


# ------------------------------------------------------------------------------------------------ reading


def test_reads_webdataset_samples(store):
    root, options = store
    put(root, options, {"shard.tar": tar_bytes(WDS_MEMBERS)})
    first, second = samples_of(f"{root}/shard.tar", options)
    assert (first.key, first.shard_id, first.image) == ("000", "shard", WDS_MEMBERS[0][1])
    assert first.meta == {"txt": "a red square", "cls": "3", "caption": "a red square"}  # binary .npy dropped
    assert (second.key, second.image) == ("001", WDS_MEMBERS[4][1])
    assert second.meta == {"json": WDS_MEMBERS[5][1].decode(), "caption": "a green square"}


def test_reads_parquet_layouts(store):
    root, options = store
    img2dataset = pa.table({
        "key": ["000", "001"], "jpg": [image_bytes(), image_bytes((1, 2, 3))], "caption": ["first", None],
        "width": [8, 8], "exif": [b"raw", b"raw"], "tags": [["a"], ["b"]],
    })
    hf = pa.table({"image": [{"bytes": image_bytes(), "path": "x.jpg"}], "text": ["hello"]})
    put(root, options, {"a/img2dataset.parquet": parquet_bytes(img2dataset), "b/hf.parquet": parquet_bytes(hf)})
    first, second = samples_of(f"{root}/a", options)
    assert (first.key, first.image) == ("000", img2dataset["jpg"][0].as_py())
    assert first.meta == {"caption": "first", "width": "8"}  # binary and list columns are not passed through
    assert (second.key, second.meta) == ("001", {"width": "8"})
    [row] = samples_of(f"{root}/b", options)
    assert (row.key, row.image, row.meta) == ("row0", hf["image"][0]["bytes"].as_py(), {"text": "hello"})


def test_reads_folder_samples_with_sidecars(store):
    root, options = store
    put(root, options, {
        "photos/cat.jpg": image_bytes(), "photos/cat.txt": b"a cat",
        "photos/sub/dog.png": image_bytes(fmt="PNG"), "photos/sub/dog.json": b'{"caption": "a dog"}',
    })
    cat, dog = samples_of(f"{root}/photos", options)
    assert (cat.key, cat.shard_id, cat.meta) == ("cat", "photos-00000", {"txt": "a cat", "caption": "a cat"})
    assert (dog.key, dog.meta["caption"]) == ("sub/dog", "a dog")


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_tar_members_are_quarantined_and_good_samples_kept(tmp_path):
    members = [
        ("good1.jpg", image_bytes()), ("good1.txt", b"kept"),
        ("empty.jpg", b""),
        ("textonly.txt", b"no image here"),
        ("dup.jpg", image_bytes()),
        ("dup.jpg", image_bytes()),  # the same member twice in a row
        ("good2.jpg", image_bytes()),
        ("good1.jpg", image_bytes()),  # the key again, later in the shard
        ("notimage.jpg", b"<html>404 not found</html>"),
        ("huge.jpg", b"\xff" * 5000),
        ("bad\udcffname.jpg", image_bytes()),
        ("../../escape.jpg", image_bytes()),
        ("__index__", b"webdataset metadata"),
        ("good3.jpg", image_bytes()),
    ]
    put(str(tmp_path), {}, {"bad.tar": tar_bytes(members)})
    items = samples_of(str(tmp_path / "bad.tar"), max_member_bytes=4000)
    assert outcome(items) == {
        "good1": "ok",
        "empty": "empty: zero-byte member empty.jpg",
        "textonly": "missing image member: no jpg/jpeg/png/webp/gif/bmp/tif/tiff among textonly.txt",
        "dup": "ok",
        "dup#2": "duplicate key",
        "good2": "ok",
        "good1#2": "duplicate key",
        "notimage": "ok",  # bytes are not sniffed here; decoding rejects them
        "huge": "too large: huge.jpg is 5000 bytes > 4000",
        "bad\\udcffname": "invalid key: not UTF-8",
        "../../escape": "ok",  # a name is only ever a key
        "good3": "ok",
    }
    assert not (tmp_path.parent / "escape.jpg").exists()
    decoded = {}
    for item in items:
        if isinstance(item, RawSample):
            try:
                decoded[item.key] = decode_image(item.image, DecodeConfig()).size
            except DecodeError as exc:
                decoded[item.key] = exc.reason.split(":")[0]
    assert decoded["notimage"] == "not an image" and decoded["good3"] == (8, 6)


def five_sample_tar() -> tuple[bytes, dict[str, int]]:
    """A tar of samples 0..4 (jpg + txt) and the offset of each member's header."""
    data = tar_bytes([(f"{i}.{ext}", image_bytes() if ext == "jpg" else b"text") for i in range(5) for ext in ("jpg", "txt")])
    offsets = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            offsets[info.name] = info.offset
    return data, offsets


def test_iter_shard_is_lazy(tmp_path):
    data, offsets = five_sample_tar()
    put(str(tmp_path), {}, {"cut.tar": data[: offsets["3.jpg"] + 600]})
    cfg = InputConfig(path=str(tmp_path / "cut.tar"))
    items = iter_shard(list_shards(cfg, {})[0], cfg, {})
    assert isinstance(next(items), RawSample)  # the first sample arrives before the damage is reached
    assert isinstance(list(items)[-1], Quarantined)


@pytest.mark.parametrize(
    "damage, kept, reason",
    [
        ("cut inside 3.jpg", ["0", "1", "2"], r"truncated tar after member '2\.txt' at offset \d+: unexpected end of data"),
        ("cut before 3.jpg", ["0", "1"], r"truncated tar after member '2\.txt' at offset \d+: no end-of-archive marker"),
        ("cut in 3.jpg's header", ["0", "1"], r"truncated tar after member '2\.txt' at offset \d+: truncated header"),
        ("garbage header at 3.jpg", ["0", "1"], r"corrupt tar after member '2\.txt' at offset \d+: .*(checksum|header)"),
        ("not a tar", [], r"corrupt tar before the first member at offset 0: invalid header"),
    ],
)
def test_damaged_tar_keeps_the_samples_before_the_damage(tmp_path, damage, kept, reason):
    data, offsets = five_sample_tar()
    at = offsets["3.jpg"]
    damaged = {
        "cut inside 3.jpg": data[: at + 512 + 100],
        "cut before 3.jpg": data[:at],
        "cut in 3.jpg's header": data[: at + 200],
        "garbage header at 3.jpg": data[:at] + random.Random(0).randbytes(512) + data[at + 512 :],
        "not a tar": random.Random(1).randbytes(3000),
    }[damage]
    put(str(tmp_path), {}, {"damaged.tar": damaged})
    items = samples_of(str(tmp_path / "damaged.tar"))
    assert [i.key for i in items[:-1]] == kept and all(isinstance(i, RawSample) for i in items[:-1])
    assert items[-1].key == REST_OF_SHARD and re.fullmatch(reason, items[-1].reason), items[-1].reason


def test_bad_parquet_rows_are_quarantined_and_good_rows_kept(tmp_path):
    table = pa.table({
        "key": ["ok1", "null", "empty", "ok1", "pathonly", None, "ok2"],
        "image": [
            {"bytes": image_bytes(), "path": None}, None, {"bytes": b"", "path": None},
            {"bytes": image_bytes(), "path": None}, {"bytes": None, "path": "/etc/passwd"},
            {"bytes": image_bytes(), "path": None}, {"bytes": image_bytes(), "path": None},
        ],
    })
    put(str(tmp_path), {}, {"rows.parquet": parquet_bytes(table)})
    assert outcome(samples_of(str(tmp_path / "rows.parquet"))) == {
        "ok1": "ok",
        "null": "missing image: image is null",
        "empty": "empty: zero-byte image",
        "ok1#2": "duplicate key",
        "pathonly": "missing image: stored by path only ('/etc/passwd')",
        "row5": "ok",
        "ok2": "ok",
    }
    put(str(tmp_path), {}, {"noimage.parquet": parquet_bytes(pa.table({"key": ["a"], "url": ["http://x"]}))})
    [item] = samples_of(str(tmp_path / "noimage.parquet"))
    assert item.key == REST_OF_SHARD and item.reason.startswith("missing image column: none of jpg, image")


def test_damaged_parquet_keeps_the_row_groups_before_the_damage(tmp_path):
    table = pa.table({"key": [f"k{i}" for i in range(8)], "jpg": [image_bytes()] * 8})
    data = bytearray(parquet_bytes(table, row_group_size=4, compression="none"))
    offset = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(1).data_page_offset
    data[offset : offset + 64] = b"\xff" * 64
    put(str(tmp_path), {}, {"damaged.parquet": bytes(data), "cut.parquet": bytes(data[:100])})
    items = samples_of(str(tmp_path / "damaged.parquet"))
    assert [i.key for i in items[:-1]] == ["k0", "k1", "k2", "k3"]
    assert items[-1].key == REST_OF_SHARD and items[-1].reason.startswith("corrupt parquet after row 4: ")
    [item] = samples_of(str(tmp_path / "cut.parquet"))
    assert item.key == REST_OF_SHARD and item.reason.startswith("corrupt parquet after row 0: ")


def test_a_failing_read_is_not_mistaken_for_corrupt_data(tmp_path, monkeypatch):
    put(str(tmp_path), {}, {"a.parquet": parquet_bytes(pa.table({"key": ["a"], "jpg": [image_bytes()]}))})
    cfg = InputConfig(path=str(tmp_path / "a.parquet"))
    [shard] = list_shards(cfg, {})

    def failing_read(self, *args):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr("fsspec.implementations.local.LocalFileOpener.read", failing_read)
    with pytest.raises(ConnectionResetError):
        list(iter_shard(shard, cfg, {}))


def test_bad_folder_files_are_quarantined_and_good_files_kept(tmp_path):
    root = str(tmp_path / "photos")
    put(root, {}, {"a.jpg": image_bytes(), "a.png": image_bytes(fmt="PNG"), "b.jpg": b"", "c.jpg": image_bytes()})
    put(root, {}, {"d.jpg": image_bytes(), "e.jpg": b"\xff" * 5000, "orphan.txt": b"a sidecar without an image"})
    cfg = InputConfig(path=root, max_member_bytes=4000)
    [shard] = list_shards(cfg, {})
    os.remove(os.path.join(root, "d.jpg"))
    result = outcome(list(iter_shard(shard, cfg, {})))
    assert result.pop("d").startswith("missing file: removed after listing")
    assert result == {
        "a": "ok",
        "a#2": "duplicate key",
        "b": "empty: zero-byte member b.jpg",
        "c": "ok",
        "e": "too large: e.jpg is 5000 bytes > 4000",
    }


# ------------------------------------------------------------------------------------------------ hostile input


def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def test_compressed_tars_are_listed_and_read(tmp_path):
    """webdataset reads .tar.gz and .tgz; so do we, and a gzip tar misnamed .tar is read as well."""
    tar = tar_bytes([("s.jpg", image_bytes()), ("s.txt", b"caption")])
    put(str(tmp_path), {}, {"a.tar": tar, "b.tar.gz": gzipped(tar), "c.tgz": gzipped(tar), "d.tar": gzipped(tar)})
    cfg = InputConfig(path=str(tmp_path))
    shards = list_shards(cfg, {})
    assert [s.shard_id for s in shards] == ["a", "b", "c", "d"]
    for shard in shards:
        [sample] = list(iter_shard(shard, cfg, {}))
        assert isinstance(sample, RawSample) and sample.meta["caption"] == "caption", shard.shard_id
    for cut in (gzipped(tar)[:-30], gzipped(tar)[:5]):  # cut in the deflate stream; in the gzip header
        put(str(tmp_path / "cut"), {}, {"e.tar.gz": cut})
        [damage] = samples_of(str(tmp_path / "cut" / "e.tar.gz"))
        assert damage.key == REST_OF_SHARD and damage.samples is None, damage
        assert re.match(r"(truncated|corrupt) tar (before|after)", damage.reason), damage.reason


def test_every_reader_accepts_the_same_image_extensions(tmp_path):
    formats = {"gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "tif": "TIFF", "webp": "WEBP", "png": "PNG", "jpeg": "JPEG"}
    files = {f"{ext}.{ext}": image_bytes(fmt=fmt) for ext, fmt in formats.items()}
    put(str(tmp_path / "tar"), {}, {"s.tar": tar_bytes(list(files.items()))})
    put(str(tmp_path / "folder"), {}, files)
    for name in ("tar/s.tar", "folder"):
        items = samples_of(str(tmp_path / name))
        assert outcome(items) == {ext: "ok" for ext in formats}, name
        for item in items:
            assert decode_image(item.image, DecodeConfig()).size == (8, 6)
    for column, fmt in (("gif", "GIF"), ("tiff", "TIFF"), ("bmp", "BMP")):
        put(str(tmp_path / "pq"), {}, {f"{column}.parquet": parquet_bytes(pa.table({column: [image_bytes(fmt=fmt)]}))})
        assert outcome(samples_of(str(tmp_path / "pq" / f"{column}.parquet"))) == {"row0": "ok"}


def test_a_member_without_an_extension_is_named_in_its_reason(tmp_path):
    put(str(tmp_path), {}, {"s.tar": tar_bytes([("good.jpg", image_bytes()), ("noext_member.", image_bytes())])})
    result = outcome(samples_of(str(tmp_path / "s.tar")))
    assert result["good"] == "ok"
    assert result["noext_member"].startswith("missing image member: no jpg/") and "noext_member." in result["noext_member"]


def test_a_string_image_column_is_one_record_counting_every_row(tmp_path):
    put(str(tmp_path), {}, {"s.parquet": parquet_bytes(pa.table({"key": list("abcdef"), "jpg": ["x"] * 6}))})
    [record] = samples_of(str(tmp_path / "s.parquet"))
    assert record.key == REST_OF_SHARD and record.samples == 6
    assert record.reason == "missing image column: jpg has type string, expected binary or struct<bytes> (6 rows)"


def test_damaged_parquet_counts_the_rows_it_loses(tmp_path):
    rows = pa.table({"key": [f"k{i}" for i in range(6)], "jpg": [image_bytes()] * 6})
    data = parquet_bytes(rows, row_group_size=2)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    start = meta.row_group(1).column(1).data_page_offset
    damaged = data[:start] + random.Random(0).randbytes(200) + data[start + 200:]
    put(str(tmp_path), {}, {"s.parquet": damaged})
    items = samples_of(str(tmp_path / "s.parquet"))
    assert [i.key for i in items[:-1]] == ["k0", "k1"]
    assert items[-1].key == REST_OF_SHARD and items[-1].samples == 4, items[-1]


def hostile_folder(root) -> None:
    """Good images beside every kind of entry a folder reader must not open or must not stop on."""
    root.mkdir(parents=True)
    for name in ("a.jpg", "z.jpg", "sub/b.jpg", "locked/c.jpg"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(image_bytes())
    os.symlink("loop.jpg", root / "loop.jpg")  # stat fails with ELOOP
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    os.mkfifo(root / "fifo.jpg")  # opening it would block until a writer came
    os.symlink("..", root / "sub" / "up")  # a folder loop
    os.symlink("a.jpg", root / "alias.jpg")  # a symlink to a regular file is read through
    (root / os.fsdecode(b"bad\xffname.jpg")).write_bytes(image_bytes())


FOLDER_REASONS = {
    "a": "ok", "alias": "ok", "z": "ok", "sub/b": "ok", "locked/c": "ok",
    "loop": "symlink loop: loop.jpg",
    "dangling": "dangling symlink: dangling.jpg -> nowhere.jpg",
    "fifo": "not a regular file: fifo.jpg is a FIFO; skipped unopened",
    "sub/up": "symlink loop: sub/up -> .. leads back to '.'",
    "bad\\xffname": "invalid key: not UTF-8 (file name 'bad\\\\xffname.jpg')",
}


def test_folder_entries_that_are_not_regular_files_are_quarantined_unopened(tmp_path):
    root = tmp_path / "photos"
    hostile_folder(root)
    cfg = InputConfig(path=str(root))
    [shard] = list_shards(cfg, {})
    assert outcome(list(iter_shard(shard, cfg, {}))) == FOLDER_REASONS


def test_a_file_replaced_by_a_fifo_after_listing_is_not_opened_blocking(tmp_path):
    root = tmp_path / "photos"
    put(str(root), {}, {"a.jpg": image_bytes(), "b.jpg": image_bytes()})
    cfg = InputConfig(path=str(root))
    [shard] = list_shards(cfg, {})
    os.remove(root / "b.jpg")
    os.mkfifo(root / "b.jpg")
    assert outcome(list(iter_shard(shard, cfg, {}))) == {
        "a": "ok", "b": "not a regular file: b.jpg is a FIFO; skipped unread"}


def as_unprivileged_user(function):
    """``function()``'s JSON result, computed in a forked child running as ``nobody`` when this runs as root
    (root reads mode-000 files and lists mode-000 folders, so the case needs an ordinary user)."""
    if os.geteuid() != 0:
        return function()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and no 'nobody' user to drop to: a mode-000 file is readable by root")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, compute, report, exit without running the parent's cleanup
        code = 1
        try:
            os.close(read_end)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            with os.fdopen(write_end, "w") as out:
                json.dump(function(), out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as result:
        text = result.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and text, "the unprivileged child failed"
    return json.loads(text)


def test_unreadable_files_and_folders_are_quarantined_as_an_ordinary_user(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="atr-perm-"))  # pytest's tmp_path is private to root
    try:
        os.chmod(root, 0o755)
        put(str(root / "photos"), {}, {"a.jpg": image_bytes(), "secret.jpg": image_bytes(),
                                       "private/b.jpg": image_bytes(), "open/c.jpg": image_bytes()})
        for path in root.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(root / "photos" / "secret.jpg", 0)
        os.chmod(root / "photos" / "private", 0)

        def read() -> dict[str, str]:
            cfg = InputConfig(path=str(root / "photos"))
            items = [item for shard in list_shards(cfg, {}) for item in iter_shard(shard, cfg, {})]
            assert [i.samples for i in items if isinstance(i, Quarantined)] == [None, 1]  # private/ hides its count
            return outcome(items)

        assert as_unprivileged_user(read) == {
            "a": "ok", "open/c": "ok",
            "private": "listing error: cannot list folder 'private': permission denied; its files are not read",
            "secret": "permission denied: secret.jpg",
        }
    finally:
        os.chmod(root / "photos" / "private", 0o755)
        shutil.rmtree(root)


# ------------------------------------------------------------------------------------------------ fuzz


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    mutation = rng.randrange(4)
    if mutation == 0:
        return bytes(data[: rng.randrange(len(data))])
    if mutation == 1:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if mutation == 2:
        start = rng.randrange(len(data))
        return bytes(data[:start] + rng.randbytes(rng.randrange(1, 2000)) + data[start:])
    return rng.randbytes(rng.randrange(2000))


def random_header(rng: random.Random) -> bytes:
    """A 512-byte tar header of random fields with a valid checksum, so tarfile parses its fields."""
    block = bytearray(rng.randbytes(512))
    block[156:157] = rng.choice([b"0", b"x", b"g", b"L", b"K", b"5", b"2", b"S"])
    block[257:263] = rng.choice([b"ustar\x00", b"ustar ", block[257:263]])
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\x00 ".encode()
    return bytes(block)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fuzzed_shards_end_as_samples_or_quarantine(tmp_path):
    rng = random.Random(20240607)
    tar = five_sample_tar()[0]
    rows = pa.table({"key": [f"k{i}" for i in range(6)], "jpg": [image_bytes()] * 6, "caption": ["c"] * 6})
    parquet = parquet_bytes(rows, row_group_size=2)
    decode_cfg = DecodeConfig(max_pixels=1_000_000)
    cases = [("webdataset", mutate(rng, tar)) for _ in range(150)]
    cases += [("webdataset", tar[:1536] + random_header(rng) + rng.randbytes(rng.randrange(1500))) for _ in range(100)]
    cases += [("parquet", mutate(rng, parquet)) for _ in range(150)]
    cases += [("webdataset", mutate(rng, gzipped(tar))) for _ in range(60)]  # compressed streams, damaged
    cases += [("webdataset", gzipped(mutate(rng, tar))) for _ in range(40)]
    quarantined = 0
    for index, (fmt, data) in enumerate(cases):
        path = str(tmp_path / f"case{index}.{'tar' if fmt == 'webdataset' else 'parquet'}")
        put(str(tmp_path), {}, {os.path.basename(path): data})
        for item in samples_of(path):
            assert isinstance(item, (RawSample, Quarantined)), item
            if isinstance(item, Quarantined):
                quarantined += 1
                continue
            try:
                decode_image(item.image, decode_cfg)
            except DecodeError:
                pass
    assert quarantined > 150


FOLDER_REASON_PREFIXES = ("symlink loop:", "dangling symlink:", "not a regular file:", "duplicate folder:",
                          "invalid key:", "duplicate key", "empty:", "missing image member:")


def test_fuzzed_folders_end_as_samples_or_quarantine_without_opening_what_is_not_a_file(tmp_path):
    """Random trees of files, symlinks (to files, folders, nowhere, themselves), FIFOs and folder loops: every
    entry with an image name ends as a sample or a reason, and nothing blocks (a FIFO opened would)."""
    rng = random.Random(1919)
    for case in range(25):
        root = tmp_path / f"case{case}"
        (root / "d").mkdir(parents=True)
        names = [f"{rng.choice(['', 'd/'])}e{i}.{rng.choice(['jpg', 'png', 'txt', 'gif'])}" for i in range(8)]
        for name in names:
            kind = rng.choice(["file", "file", "empty", "fifo", "link", "dirlink"])
            path = root / name
            if path.exists() or path.is_symlink():
                continue
            if kind in ("file", "empty"):
                path.write_bytes(image_bytes() if kind == "file" else b"")
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "link":
                os.symlink(rng.choice([*names, "missing.jpg", path.name]), path)
            else:
                os.symlink(rng.choice(["..", ".", "/nonexistent"]), path)
        (root / "keep.jpg").write_bytes(image_bytes())
        items = samples_of(str(root))
        assert "keep" in outcome(items)
        for item in items:
            assert isinstance(item, RawSample) or item.reason.startswith(FOLDER_REASON_PREFIXES), item
