import io
import random
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageFilter, ImageOps

from pipeline.config import CompressConfig, DecodeConfig, load_config
from pipeline.encoders import geometry
from pipeline.encoders.geometry import preparation_pixels, prepare_image
from pipeline.sources import list_shards
from pipeline.sources.decode import DecodeError, decode_image
from pipeline.stages.decode import decode_on_cpu, decode_shard, size_problem

CFG = DecodeConfig()
REASON_PREFIXES = ("empty:", "too large:", "not an image:", "too many pixels:", "extreme aspect ratio:", "truncated:",
                   "out of memory:", "corrupt:")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose pixel data holds almost nothing."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def reason_of(data: bytes, cfg: DecodeConfig = CFG) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, cfg)
    return info.value.reason


def test_rgb_jpeg_round_trip():
    image = decode_image(encode(Image.new("RGB", (30, 20), (10, 200, 30)), "JPEG", quality=95), CFG)
    assert image.size == (30, 20)
    assert np.abs(pixels(image) - [10, 200, 30]).max() <= 4


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    image = decode_image(encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), fmt), CFG)  # pure cyan ink
    assert np.abs(pixels(image) - [0, 255, 255]).max() <= 6


def test_16_bit_grayscale_is_scaled_to_8_bit():
    source = Image.fromarray(np.array([[0, 32896, 65535, 257]], dtype=np.uint16))
    assert source.mode == "I;16"
    image = decode_image(encode(source, "PNG"), CFG)
    assert pixels(image)[0, :, 0].tolist() == [0, 128, 255, 1]
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()


def test_grayscale_becomes_gray_rgb():
    assert pixels(decode_image(encode(Image.new("L", (4, 4), 100), "PNG"), CFG))[0, 0].tolist() == [100, 100, 100]


def test_palette_colours_are_kept():
    source = Image.new("P", (2, 1))
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    source.putdata([0, 1])
    assert pixels(decode_image(encode(source, "PNG"), CFG))[0].tolist() == [[255, 0, 0], [0, 0, 255]]


def test_palette_transparency_composites_on_white():
    source = Image.new("P", (2, 1))
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    source.putdata([0, 1])
    image = decode_image(encode(source, "PNG", transparency=0), CFG)
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_alpha_composites_on_white(fmt):
    source = Image.new("RGBA", (3, 1))
    source.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    params = {"lossless": True} if fmt == "WEBP" else {}
    row = pixels(decode_image(encode(source, fmt, **params), CFG))[0]
    assert row[0].tolist() == [255, 255, 255]
    assert row[1].tolist() == [255, 0, 0]
    assert np.abs(row[2] - 127).max() <= 1


def test_gray_alpha_composites_on_white():
    source = Image.new("LA", (2, 1))
    source.putdata([(0, 0), (0, 255)])
    assert pixels(decode_image(encode(source, "PNG"), CFG))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_exif_orientation_is_applied():
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 4, 4))  # marks the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    image = decode_image(encode(source, "PNG", exif=exif), CFG)
    assert image.size == (20, 40)
    assert pixels(image)[1, 18].tolist() == [255, 0, 0]  # the marked corner is now top-right
    assert pixels(image)[1, 1].tolist() == [0, 0, 255]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the EXIF block it cannot parse
def test_malformed_exif_keeps_the_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.new("RGB", (6, 4), (9, 9, 9)), "WEBP", exif=exif).replace(b"MM\x00*", b"#M\x00*")
    with pytest.raises(SyntaxError):  # Pillow cannot read the orientation at all
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert decode_image(data, CFG).size == (6, 4)


def test_rejections_name_their_reason():
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert reason_of(b"") == "empty: zero bytes"
    assert reason_of(jpeg, DecodeConfig(max_bytes=100)) == f"too large: {len(jpeg)} bytes > 100"
    assert reason_of(b"just some text, not pixels").startswith("not an image:")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert reason_of(eps).startswith("not an image:")  # formats outside the allow-list are never parsed
    assert reason_of(jpeg[: len(jpeg) // 2]).startswith("truncated:")
    assert reason_of(encode(Image.new("RGB", (100, 100)), "PNG"), DecodeConfig(max_pixels=5000)) == (
        "too many pixels: 100x100 > 5000"
    )


def test_pixel_bound_is_checked_before_decoding(monkeypatch):
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    limit_before = Image.MAX_IMAGE_PIXELS
    # Under Pillow's own bomb limit: our bound rejects it from the header.
    assert reason_of(png_header_only(5000, 5000), DecodeConfig(max_pixels=1_000_000)) == (
        "too many pixels: 5000x5000 > 1000000"
    )
    # Far over Pillow's limit: Pillow refuses it while opening; still the same reason.
    assert reason_of(png_header_only(100_000, 100_000)).startswith("too many pixels:")
    assert loads == []
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_extreme_aspect_ratio_is_rejected_from_the_header(monkeypatch):
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    assert reason_of(png_header_only(1, 60000)) == (
        "extreme aspect ratio: 1x60000 is over decode.max_aspect_ratio=10000"
    )
    assert reason_of(png_header_only(600, 2), DecodeConfig(max_aspect_ratio=100)).startswith("extreme aspect ratio:")
    with pytest.raises(DecodeError, match="^the caller's reason$"):
        decode_image(png_header_only(40, 30), CFG, lambda size: "the caller's reason" if size == (40, 30) else None)
    assert loads == []


# ------------------------------------------------------------------------------------------------ the decode stage


def stage_config(*overrides: str) -> CompressConfig:
    return load_config(CompressConfig, None, ["input.path=unused", "output.path=unused", "executor=local",
                                              "decode.device=cpu", *overrides])


def test_a_1x3000_strip_is_kept_and_prepared_from_its_crop_window():
    cfg = stage_config("encoder.image_size=336", "encoder.patch_size=14")
    # The full shortest-edge resize would be 336x1008000 pixels (1 GB); only the crop window is resampled.
    assert preparation_pixels((1, 3000), cfg.encoder) == 336 * 336
    row = decode_on_cpu(encode(Image.new("RGB", (1, 3000), (10, 120, 250)), "PNG"), cfg)
    tile = np.frombuffer(row["pixels"], np.uint8).reshape(336, 336, 3)
    assert (row["width"], row["height"]) == (1, 3000) and np.abs(tile.astype(int) - (10, 120, 250)).max() <= 1


def test_the_crop_window_resize_stays_close_to_resize_then_crop(monkeypatch):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (900, 40, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    cfg = stage_config("encoder.image_size=32", "encoder.patch_size=16").encoder
    exact = prepare_image(image, cfg).tiles.astype(int)
    monkeypatch.setattr(geometry, "EXACT_RESIZE_MAX_PIXELS", 100)
    windowed = prepare_image(image, cfg).tiles.astype(int)
    assert np.abs(exact - windowed).mean() < 1.0


def test_pad_mode_bounds_its_square_canvas_from_the_header():
    cfg = stage_config("encoder.resize_mode=pad", "decode.max_pixels=1000000")
    assert size_problem((1000, 1000), cfg) is None
    assert size_problem((20, 2000), cfg).startswith(
        "extreme aspect ratio: preparing 20x2000 for encoder.resize_mode=pad takes 4050176 pixels > 2000000")


def test_one_sample_failing_to_prepare_is_quarantined_and_the_shard_goes_on(tmp_path, monkeypatch):
    sizes = {"oom": (17, 5), "bug": (19, 5)}
    members = [(f"{key}.png", encode(Image.new("RGB", sizes.get(key, (16, 5))), "PNG"))
               for key in ("a", "oom", "b", "bug", "c")]
    shard_path = tmp_path / "s.tar"
    with tarfile.open(shard_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    real_prepare = prepare_image

    def prepare(image, encoder_cfg):
        if image.size == sizes["oom"]:
            raise MemoryError("simulated")
        if image.size == sizes["bug"]:
            raise RuntimeError("a library bug")
        return real_prepare(image, encoder_cfg)

    monkeypatch.setattr("pipeline.stages.decode.prepare_image", prepare)
    cfg = stage_config(f"input.path={shard_path}")
    [shard] = list_shards(cfg.input, {})
    rows = list(decode_shard(shard, cfg))
    assert [(r["kind"], r["key"]) for r in rows[:-1]] == [
        ("sample", "a"), ("quarantine", "oom"), ("sample", "b"), ("quarantine", "bug"), ("sample", "c")]
    assert rows[1]["reason"] == "out of memory: preparing a 17x5 image: simulated"
    assert rows[3]["reason"] == "corrupt: preparing the image failed: RuntimeError: a library bug"
    assert (rows[-1]["kind"], rows[-1]["total"], rows[-1]["samples"]) == ("end", 5, 5)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_bytes_end_as_image_or_decode_error():
    rng = random.Random(1234)
    seeds = [
        encode(Image.new("RGB", (16, 12), (200, 30, 60)), "JPEG"),
        encode(Image.new("RGBA", (16, 12), (200, 30, 60, 90)), "PNG"),
        encode(Image.new("RGB", (16, 12), (5, 6, 7)), "WEBP"),
        encode(Image.new("P", (16, 12), 3), "GIF"),
        encode(Image.new("CMYK", (16, 12), (1, 2, 3, 4)), "TIFF"),
        encode(Image.new("RGB", (16, 12), (9, 8, 7)), "BMP"),
    ]
    cfg = DecodeConfig(max_pixels=1_000_000)
    outcomes = {"image": 0, "error": 0}
    for _ in range(600):
        data = bytearray(rng.choice(seeds))
        mutation = rng.randrange(4)
        if mutation == 0:
            data = data[: rng.randrange(len(data))]
        elif mutation == 1:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation == 2:
            data = data[: rng.randrange(8, 40)] + rng.randbytes(rng.randrange(200))
        else:
            data = bytearray(rng.randbytes(rng.randrange(300)))
        try:
            image = decode_image(bytes(data), cfg)
        except DecodeError as exc:
            assert exc.reason.startswith(REASON_PREFIXES), exc.reason
            outcomes["error"] += 1
        else:
            assert image.mode == "RGB" and image.width * image.height <= cfg.max_pixels
            outcomes["image"] += 1
    assert outcomes["image"] > 20 and outcomes["error"] > 100  # the fuzz reached both outcomes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_image_sizes_are_bounded_from_the_header(monkeypatch):
    """Headers claiming any size, extreme aspect ratios included, end as an image or a reason, never as an
    allocation: the stage's size check runs before a pixel is decoded."""
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))
    rng = random.Random(19)
    cfg = stage_config("decode.max_pixels=1000000")
    reasons = set()
    for _ in range(300):
        width, height = (rng.choice([1, 2, 3, rng.randrange(1, 70000)]) for _ in range(2))
        try:
            decode_image(png_header_only(width, height), cfg.decode, lambda size: size_problem(size, cfg))
        except DecodeError as exc:
            assert exc.reason.startswith(REASON_PREFIXES), exc.reason
            reasons.add(exc.reason.split(":")[0])
    assert {"too many pixels", "extreme aspect ratio"} <= reasons
    assert all(w * h <= cfg.decode.max_pixels and max(w, h) <= 10_000 * min(w, h) for w, h in loads)
