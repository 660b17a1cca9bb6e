"""JPEG decoding on the GPU: which images go there, and nvJPEG (through torchvision) with a per-image fallback.

With ``decode.device=cuda`` the decode stage reads each image's header only. A JPEG that nvJPEG decodes to
the same upright RGB picture the CPU path gives (8-bit YCbCr, no EXIF rotation, ending in its EOI marker,
within ``decode.max_bytes`` and ``decode.max_pixels``) travels to the encode stage as raw bytes; everything
else (PNG, WebP, CMYK, grayscale, rotated, truncated, oversized) is decoded on the CPU as before, so the
quarantine reasons do not change. The encode stage decodes the raw JPEGs in one batched nvJPEG call and
sends whatever nvJPEG refuses back through the CPU decoder.

torchvision is imported lazily (``pip install 'atr[gpu]'``): without it, or without a GPU, the encode stage
decodes the raw JPEGs on the CPU and says so once in the log.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
from typing import Callable

import torch
from PIL import Image

from pipeline.config import CompressConfig, DecodeConfig

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
# Encoders pad some JPEGs with zeros after the EOI marker; more than this and the CPU path decides.
TRAILING_ZEROS = 64

# decode_jpeg takes a list (a batch) from 0.19 on.
MIN_TORCHVISION = (0, 19)
# CPU uint8 tensors of JPEG bytes -> uint8 [3, H, W] RGB tensors on the GPU (raises if any image fails).
JpegBatchDecoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def gpu_decode_requested(cfg: CompressConfig) -> bool:
    """``decode.device``: cuda, or auto where the encode stage runs on a GPU and torchvision is installed
    (without it the encode stage would decode every JPEG itself, on one core, rather than in the decode tasks)."""
    if cfg.decode.device != "auto":
        return cfg.decode.device == "cuda"
    if not (cfg.encoder.device == "auto" or cfg.encoder.device.startswith("cuda")) or not torchvision_installed():
        return False
    if cfg.executor == "ray":  # the decode tasks may run where the actors' GPUs are not
        return cfg.ray.num_gpus_per_actor > 0
    return torch.cuda.is_available()


@functools.cache
def torchvision_installed() -> bool:
    """Found, not imported: importing it costs a second, and one that will not import beside this torch is
    caught where nvJPEG is loaded, which then decodes on the CPU and says why."""
    return importlib.util.find_spec("torchvision") is not None


def jpeg_size_for_gpu(data: bytes, cfg: DecodeConfig) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG nvJPEG decodes as the CPU path would; None: decode on the CPU."""
    if not data or len(data) > cfg.max_bytes or not data.startswith(JPEG_START):
        return None
    if not data[-TRAILING_ZEROS:].rstrip(b"\0").endswith(JPEG_END):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            width, height = image.size
            if image.format != "JPEG" or image.mode != "RGB" or width * height > cfg.max_pixels:
                return None  # MPO, CMYK, grayscale, or a pixel bound the CPU path reports
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                return None  # nvJPEG ignores EXIF; the CPU path transposes
            return width, height
    except Exception:  # noqa: BLE001 - any header Pillow rejects gets the CPU path's verdict and reason
        return None


def load_nvjpeg(device: torch.device) -> tuple[JpegBatchDecoder | None, str]:
    """torchvision's batched nvJPEG decode onto ``device``, tried once on a small JPEG (which also pays for
    nvJPEG's start-up), or None and the reason it is not available."""
    if device.type != "cuda":
        return None, f"the encoder runs on {device}, not a CUDA device"
    try:
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # noqa: BLE001 - a missing or broken torchvision both mean: decode on the CPU
        return None, f"torchvision is not importable ({type(exc).__name__}: {exc}); pip install 'atr[gpu]'"
    if tuple(int(part) for part in torchvision.__version__.split(".")[:2]) < MIN_TORCHVISION:
        return None, f"torchvision {torchvision.__version__} has no batched GPU decode (0.19 or newer has)"

    def decode(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(probe, format="JPEG")
    try:
        decode([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)])
    except (RuntimeError, ValueError) as exc:
        return None, f"nvJPEG cannot decode a plain JPEG here ({exc})"
    return decode, ""


def decode_jpegs(
    datas: list[bytes], sizes: list[tuple[int, int]], decoder: JpegBatchDecoder
) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 ``[3, H, W]`` on the decoder's device, or None where nvJPEG refuses it.

    One batched call; nvJPEG returns nothing when any image fails, so then each is tried alone. An image whose
    decoded size differs from its header's (``sizes``, (width, height)) counts as refused.
    """
    # Copies: torch wants writable buffers, and the copy is small next to the decode.
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        images: list[torch.Tensor | None] = list(decoder(encoded))
    except (RuntimeError, ValueError):
        images = [_decode_one(decoder, one) for one in encoded]
    return [
        image if image is not None and tuple(image.shape) == (3, height, width) else None
        for image, (width, height) in zip(images, sizes)
    ]


def _decode_one(decoder: JpegBatchDecoder, encoded: torch.Tensor) -> torch.Tensor | None:
    try:
        return decoder([encoded])[0]
    except (RuntimeError, ValueError) as exc:
        log.debug("nvJPEG refused an image (%s); decoding it on the CPU", exc)
        return None
