import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from pipeline.config import DecodeConfig
from pipeline.sources.decode import DecodeError, decode_image

CFG = DecodeConfig()
REASON_PREFIXES = ("empty:", "too large:", "not an image:", "too many pixels:", "truncated:", "corrupt:")


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
