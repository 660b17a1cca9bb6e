"""Image bytes to an upright RGB image, bounded in bytes and pixels, or a DecodeError saying why not.

Hostile input is expected: the byte, pixel and aspect-ratio bounds (and the caller's own check of the size,
such as what preparing the image would cost) are checked before any pixel is decoded, only common
raster formats are tried (no EPS, which runs Ghostscript), and any failure inside Pillow becomes a
DecodeError. Pillow's own global bomb limit (``Image.MAX_IMAGE_PIXELS``) is left as it is: changing it per
call would race between threads, and ``max_pixels`` is normally below it anyway; an image over Pillow's
limit is rejected with the same "too many pixels" reason.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.config import DecodeConfig

# JPEG covers MPO too: its opener returns an MPO image for multi-picture files.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class DecodeError(ValueError):
    """``reason`` starts with a short prefix a program can group by: empty, too large, not an image,
    too many pixels, extreme aspect ratio, truncated, out of memory, corrupt."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes, cfg: DecodeConfig, size_problem: Callable[[tuple[int, int]], str | None] | None = None
) -> Image.Image:
    """``size_problem(size)``, when given, is asked from the header too; a reason it returns is raised."""
    if not data:
        raise DecodeError("empty: zero bytes")
    if len(data) > cfg.max_bytes:
        raise DecodeError(f"too large: {len(data)} bytes > {cfg.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise DecodeError(f"not an image: no {'/'.join(FORMATS)} decoder accepts bytes {data[:8].hex()}...") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"too many pixels: {exc}") from None
    except Exception as exc:  # Pillow's header parsers raise many types on hostile input
        raise _failure(exc) from None
    width, height = image.size
    if width * height > cfg.max_pixels:
        raise DecodeError(f"too many pixels: {width}x{height} > {cfg.max_pixels}")
    problem = aspect_ratio_problem((width, height), cfg) or (size_problem and size_problem((width, height)))
    if problem:
        raise DecodeError(problem)
    try:
        image.load()
        return _to_rgb(_upright(image))
    except Exception as exc:  # as above, for the pixel decoders
        raise _failure(exc) from None


def aspect_ratio_problem(size: tuple[int, int], cfg: DecodeConfig) -> str | None:
    width, height = size
    if max(width, height) > cfg.max_aspect_ratio * max(1, min(width, height)):
        return f"extreme aspect ratio: {width}x{height} is over decode.max_aspect_ratio={cfg.max_aspect_ratio:g}"
    return None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block should not cost an image whose pixels decode
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_gray(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit modes scale 0..65535 to 0..255; 32-bit int or float pixels above 255 are taken as 16-bit data
    too (some TIFF and PNG readers widen 16-bit to mode I); anything else clips to 0..255."""
    pixels = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = pixels / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _failure(exc: Exception) -> DecodeError:
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        return DecodeError(f"out of memory: {detail}")
    if isinstance(exc, EOFError) or "truncated" in detail.lower():
        return DecodeError(f"truncated: {detail}")
    return DecodeError(f"corrupt: {detail}")
