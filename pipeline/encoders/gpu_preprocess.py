"""The image processor's resize, crop and pad in torch, for images decoded on the GPU.

The same geometry as :func:`pipeline.encoders.prepare_image` (sizes and offsets come from
``pipeline.encoders.geometry``), on ``[G, 3, H, W]`` uint8 tensors on any device. PIL's bicubic resize is
separable: one pass along each axis into a uint8 image, each rounded half up. Torch's antialiased bicubic uses
PIL's filter (a = -0.5, support widened by the downscale factor), so the same two passes in the same order, with
rounding to uint8 in between, reproduce PIL to within one level on a few pixels in ten thousand, where a single
float pass is off by up to 7 levels (measured in ``tests/test_gpu_decode.py``).

The order matters as much: older Pillow always resized horizontally first; newer Pillow (13.0 here) goes
vertically first when the height shrinks by more than twice as many pixels as the width does. Which rule the
installed Pillow follows is found once, by resizing a small probe image both ways.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import EncoderConfig
from pipeline.encoders.geometry import (
    PLAIN_GRID,
    anyres_grid,
    centre_crop_offset,
    fit_size,
    shortest_edge_size,
    square_pad_offset,
)

# Images resized at once: bounds the float32 working memory (a 1024x768 image is 9.4 MB in float32).
RESIZE_CHUNK = 32


def resize_like_pil(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[G, 3, H, W]`` -> uint8 ``[G, 3, h, w]`` for ``size = (w, h)``, as PIL's BICUBIC resize."""
    width, height = size
    old_height, old_width = images.shape[-2:]
    if (old_width, old_height) == (width, height):
        return images
    vertical_first = old_height - height > max(0, 2 * (old_width - width)) and pil_height_first_rule()
    return _two_passes(images.float(), size, vertical_first).to(torch.uint8)


def _two_passes(pixels: torch.Tensor, size: tuple[int, int], vertical_first: bool) -> torch.Tensor:
    width, height = size
    if vertical_first and pixels.shape[-2] != height:
        pixels = _bicubic_pass(pixels, (height, pixels.shape[-1]))
    if pixels.shape[-1] != width:
        pixels = _bicubic_pass(pixels, (pixels.shape[-2], width))
    if pixels.shape[-2] != height:
        pixels = _bicubic_pass(pixels, (height, width))
    return pixels


def _bicubic_pass(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.add_(0.5).floor_().clamp_(0, 255)


@functools.cache
def pil_height_first_rule() -> bool:
    """Whether the installed Pillow resizes vertically first when the height shrinks more (newer Pillow)."""
    probe = np.random.default_rng(0).integers(0, 256, (32, 16, 3), dtype=np.uint8)
    size = (24, 8)  # the height loses 24 pixels, the width gains 8: only the order differs between the rules
    expected = torch.from_numpy(np.asarray(Image.fromarray(probe).resize(size, Image.Resampling.BICUBIC)).copy())
    pixels = torch.from_numpy(probe).permute(2, 0, 1)[None].float()

    def mismatches(vertical_first: bool) -> int:
        resized = _two_passes(pixels, size, vertical_first)[0].permute(1, 2, 0).to(torch.uint8)
        return int((resized != expected).sum())

    return mismatches(vertical_first=True) < mismatches(vertical_first=False)


def _square_tile(images: torch.Tensor, cfg: EncoderConfig) -> torch.Tensor:
    """[G, 3, H, W] -> [G, 3, S, S], as geometry's plain-mode ``_square_tile``."""
    target = cfg.image_size
    size = (images.shape[-1], images.shape[-2])
    if cfg.resize_mode == "squash":
        return resize_like_pil(images, (target, target))
    if cfg.resize_mode == "pad":
        side = max(size)
        fill = torch.tensor([int(m * 255) for m in cfg.image_mean], dtype=torch.uint8, device=images.device)
        square = fill.view(1, 3, 1, 1).expand(len(images), 3, side, side).clone()
        left, top = square_pad_offset(size)
        square[:, :, top : top + size[1], left : left + size[0]] = images
        return resize_like_pil(square, (target, target))
    resized_w, resized_h = shortest_edge_size(size, target)
    left, top = centre_crop_offset((resized_w, resized_h), target)
    resized = resize_like_pil(images, (resized_w, resized_h))
    return resized[:, :, top : top + target, left : left + target]


def _anyres_tiles(images: torch.Tensor, grid: tuple[int, int], cfg: EncoderConfig) -> torch.Tensor:
    """[G, 3, H, W] -> [G, 1 + rows*cols, 3, S, S]: the squashed base tile, then the grid tiles row-major."""
    target = cfg.image_size
    rows, cols = grid
    canvas_w, canvas_h = cols * target, rows * target
    fitted_w, fitted_h = fit_size((images.shape[-1], images.shape[-2]), (canvas_w, canvas_h))
    left, top = (canvas_w - fitted_w) // 2, (canvas_h - fitted_h) // 2
    canvas = images.new_zeros(len(images), 3, canvas_h, canvas_w)  # LLaVA-NeXT pads with black
    canvas[:, :, top : top + fitted_h, left : left + fitted_w] = resize_like_pil(images, (fitted_w, fitted_h))
    tiles = canvas.view(len(images), 3, rows, target, cols, target).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(len(images), rows * cols, 3, target, target)
    base = resize_like_pil(images, (target, target))
    return torch.cat([base[:, None], tiles], dim=1)


def prepare_same_size(images: torch.Tensor, cfg: EncoderConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 ``[G, 3, H, W]`` (one size) -> (tiles uint8 ``[G, T, S, S, 3]`` channels-last, grid)."""
    if cfg.anyres:
        grid = anyres_grid((images.shape[-1], images.shape[-2]), cfg)
        tiles = _anyres_tiles(images, grid, cfg)
    else:
        grid = PLAIN_GRID
        tiles = _square_tile(images, cfg)[:, None]
    return tiles.permute(0, 1, 3, 4, 2).contiguous(), grid


def prepare_images(images: list[torch.Tensor], cfg: EncoderConfig) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each uint8 ``[3, H, W]`` image -> (tiles ``[T, S, S, 3]``, grid); images of one size are resized together."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    prepared: list[tuple[torch.Tensor, tuple[int, int]] | None] = [None] * len(images)
    for indices in by_size.values():
        for start in range(0, len(indices), RESIZE_CHUNK):
            chunk = indices[start : start + RESIZE_CHUNK]
            tiles, grid = prepare_same_size(torch.stack([images[i] for i in chunk]), cfg)
            for i, image_tiles in zip(chunk, tiles):
                prepared[i] = (image_tiles, grid)
    return prepared  # type: ignore[return-value]
