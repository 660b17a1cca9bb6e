"""Real-size JPEGs in WebDataset tars for throughput benchmarks, one process per shard.

Photo-like content (smooth colour fields, shapes, sensor noise) so the files have a photo's size and
decode cost (about 150-250 KB at 1024x768, quality 90), not the size of noise. Most images are 1024x768, the
rest mixed sizes and orientations; every 32nd is progressive (nvJPEG's slower path) and every 64th carries an
EXIF rotation (which the GPU path leaves to the CPU decoder).
"""

from __future__ import annotations

import io
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MIXED_SIZES = [(1280, 720), (800, 600), (768, 1024), (640, 480), (1200, 900), (500, 375), (1024, 1024)]


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    y, x = np.ogrid[0:height, 0:width]
    x, y = x.astype(np.float32) / width, y.astype(np.float32) / height
    phase = rng.uniform(0, 6, 3).astype(np.float32)
    channels = [
        0.5 + 0.35 * np.sin(5 * x + 3 * y + phase[0]),
        0.5 + 0.35 * np.cos(4 * y - 2 * x + phase[1]),
        0.5 + 0.3 * np.sin(7 * x * y + phase[2]),
    ]
    pixels = (np.stack(np.broadcast_arrays(*channels), -1) * 255).astype(np.int16)
    pixels += rng.integers(-10, 11, pixels.shape, dtype=np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    draw.text((width * 0.05, height * 0.05), "ATR benchmark", fill=(255, 255, 255))
    return image


def image_size(index: int, base: tuple[int, int], mixed_every: int) -> tuple[int, int]:
    """``base`` for most images; every ``mixed_every``-th one of MIXED_SIZES, scaled like ``base``."""
    if index % mixed_every:
        return base
    width, height = MIXED_SIZES[(index // mixed_every) % len(MIXED_SIZES)]
    scale = base[0] / 1024
    return max(16, int(width * scale)), max(16, int(height * scale))


def jpeg_bytes(image: Image.Image, index: int) -> bytes:
    buffer = io.BytesIO()
    options: dict = {"quality": 90, "progressive": index % 32 == 31}
    if index % 64 == 63:
        exif = image.getexif()
        exif[0x0112] = 8  # displayed rotated by 90 degrees
        options["exif"] = exif
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _write_shard(job: tuple[Path, range, tuple[int, int], int, int]) -> int:
    path, indices, base, mixed_every, seed = job
    total = 0
    with tarfile.open(path, "w") as tar:
        for index in indices:
            rng = np.random.default_rng([seed, index])
            data = jpeg_bytes(synthetic_photo(*image_size(index, base, mixed_every), rng), index)
            for name, payload in ((f"img{index:07d}.jpg", data), (f"img{index:07d}.txt", b"a synthetic photo")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            total += len(data)
    return total


def write_jpeg_corpus(root: Path, images: int, shard_size: int, base: tuple[int, int] = (1024, 768),
                      mixed_every: int = 4, seed: int = 0, processes: int | None = None) -> dict:
    """``images`` JPEGs in ``root/shard-NNNNN.tar``; returns counts and bytes."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(root / f"shard-{n:05d}.tar", range(start, min(start + shard_size, images)), base, mixed_every, seed)
            for n, start in enumerate(range(0, images, shard_size))]
    # fork: the workers need nothing but numpy and Pillow, and no CUDA context exists yet.
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        sizes = pool.map(_write_shard, jobs)
    return {"images": images, "shards": len(jobs), "base_size": list(base), "jpeg_bytes": sum(sizes)}
