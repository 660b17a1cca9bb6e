"""An image's way into the vision tower and each token's way back.

``prepare_image`` reproduces the model's image processor up to (not including) rescale and normalise: the
same PIL bicubic resizes, crops and pads as transformers' ``CLIPImageProcessorPil``,
``SiglipImageProcessorPil`` and ``LlavaNextImageProcessorPil`` (and LLaVA's ``expand2square`` for "pad"), so
its uint8 tiles are the pixels those processors would normalise. ``token_boxes`` inverts the same geometry.

Token geometry: tile ``t`` of ``T`` gives ``side * side`` tokens in row-major order; token ``p`` is tile
``p // side**2``, row ``(p % side**2) // side``, column ``p % side``. Plain mode has one tile and
``grid == (0, 0)``; anyres (LLaVA-NeXT) has the downscaled whole image as tile 0, then the ``rows x cols``
tiles of the best-fitting pinpoint resolution, row-major. Pinpoints are ``[height, width]`` as in
transformers' ``image_grid_pinpoints``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from pipeline.config import ConfigError, EncoderConfig

PLAIN_GRID = (0, 0)
# A shortest-edge resize larger than this (an extreme aspect ratio: 1x3000 at 336 would be 336x1008000) only
# resamples the window its centre crop keeps. Pillow's box resize is not bit-identical to resize-then-crop (a
# few levels apart), so images under the bound keep the exact path of transformers' processors.
EXACT_RESIZE_MAX_PIXELS = 16 * 2**20


@dataclass
class PreparedImage:
    tiles: np.ndarray  # uint8 [T, image_size, image_size, 3]
    grid: tuple[int, int]  # anyres (rows, cols); (0, 0) in plain mode
    original_size: tuple[int, int]  # (width, height)


def check_geometry(cfg: EncoderConfig) -> None:
    """Reject settings the token geometry cannot represent, naming the key to change. (Sizes are valid already:
    ``EncoderConfig`` checks ``patch_size > 0`` and ``image_size >= patch_size``.)"""
    if cfg.select_feature != "patch":
        raise ConfigError(
            f"encoder.select_feature={cfg.select_feature!r}: only 'patch' is supported; tokens are the "
            "side*side patch tokens of each tile (the CLS token is dropped)"
        )
    if cfg.anyres:
        if not cfg.image_grid_pinpoints:
            raise ConfigError("encoder.image_grid_pinpoints: anyres needs at least one [height, width] pinpoint")
        for pinpoint in cfg.image_grid_pinpoints:
            if len(pinpoint) != 2 or any(v <= 0 or v % cfg.image_size for v in pinpoint):
                raise ConfigError(
                    f"encoder.image_grid_pinpoints: {pinpoint} must be [height, width], both positive multiples "
                    f"of encoder.image_size={cfg.image_size}"
                )


# --------------------------------------------------------------------------------------------- sizes


def shortest_edge_size(size: tuple[int, int], target: int) -> tuple[int, int]:
    """(w, h) after resizing the short side to ``target``, long side truncated (transformers' rule)."""
    w, h = size
    if w <= h:
        return target, int(target * h / w)
    return int(target * w / h), target


def centre_crop_offset(size: tuple[int, int], crop: int) -> tuple[int, int]:
    w, h = size
    return (w - crop) // 2, (h - crop) // 2


def square_pad_offset(size: tuple[int, int]) -> tuple[int, int]:
    """Where LLaVA's ``expand2square`` pastes the image on its ``max(w, h)`` square."""
    w, h = size
    side = max(w, h)
    return (side - w) // 2, (side - h) // 2


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the aspect-preserving resize into ``target`` (w, h), rounded up as LLaVA-NeXT does."""
    (w, h), (target_w, target_h) = size, target
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        return target_w, min(int(np.ceil(h * scale_w)), target_h)
    return min(int(np.ceil(w * scale_h)), target_w), target_h


def anyres_grid(size: tuple[int, int], cfg: EncoderConfig) -> tuple[int, int]:
    """(rows, cols) of the pinpoint resolution that keeps most of the image's pixels and wastes least."""
    w, h = size
    best_h, best_w = select_best_resolution((h, w), [tuple(p) for p in cfg.image_grid_pinpoints])
    return best_h // cfg.image_size, best_w // cfg.image_size


# --------------------------------------------------------------------------------------------- pixels


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def _square_tile(image: Image.Image, cfg: EncoderConfig) -> Image.Image:
    target = cfg.image_size
    if cfg.resize_mode == "squash":
        return _resize(image, (target, target))
    if cfg.resize_mode == "pad":
        side = max(image.size)
        fill = tuple(int(m * 255) for m in cfg.image_mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, square_pad_offset(image.size))
        return _resize(square, (target, target))
    resized = shortest_edge_size(image.size, target)
    left, top = centre_crop_offset(resized, target)
    if resized[0] * resized[1] <= EXACT_RESIZE_MAX_PIXELS:
        return _resize(image, resized).crop((left, top, left + target, top + target))
    scale_x, scale_y = image.width / resized[0], image.height / resized[1]
    window = (left * scale_x, top * scale_y, (left + target) * scale_x, (top + target) * scale_y)
    return image.resize((target, target), Image.Resampling.BICUBIC, box=window)


def _anyres_tiles(image: Image.Image, grid: tuple[int, int], cfg: EncoderConfig) -> np.ndarray:
    target = cfg.image_size
    rows, cols = grid
    canvas_w, canvas_h = cols * target, rows * target
    fitted_w, fitted_h = fit_size(image.size, (canvas_w, canvas_h))
    left, top = (canvas_w - fitted_w) // 2, (canvas_h - fitted_h) // 2
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # LLaVA-NeXT pads with black
    canvas[top : top + fitted_h, left : left + fitted_w] = np.asarray(_resize(image, (fitted_w, fitted_h)))
    tiles = canvas.reshape(rows, target, cols, target, 3).swapaxes(1, 2).reshape(rows * cols, target, target, 3)
    base = np.asarray(_resize(image, (target, target)))
    return np.concatenate([base[None], tiles])


def preparation_pixels(size: tuple[int, int], cfg: EncoderConfig) -> int:
    """How many pixels :func:`prepare_image` holds at once beyond the image itself (its largest intermediate),
    known from the header: the decode stage bounds it before decoding."""
    target = cfg.image_size
    if cfg.anyres:
        rows, cols = anyres_grid(size, cfg)
        return 2 * rows * cols * target * target + target * target  # canvas, fitted image, base tile
    if cfg.resize_mode == "squash":
        return target * target
    if cfg.resize_mode == "pad":
        return max(size) ** 2 + target * target  # expand2square's canvas, then the tile
    resized_w, resized_h = shortest_edge_size(size, target)
    return resized_w * resized_h if resized_w * resized_h <= EXACT_RESIZE_MAX_PIXELS else target * target


def prepare_image(image: Image.Image, cfg: EncoderConfig) -> PreparedImage:
    """CPU geometry only: the uint8 tiles the encoder normalises and encodes."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if cfg.anyres:
        grid = anyres_grid(image.size, cfg)
        tiles = _anyres_tiles(image, grid, cfg)
    else:
        grid = PLAIN_GRID
        tiles = np.array(_square_tile(image, cfg))[None]
    return PreparedImage(tiles=tiles, grid=grid, original_size=image.size)


# --------------------------------------------------------------------------------------------- inverse


def _tile_to_original(
    original_size: tuple[int, int], grid: tuple[int, int], cfg: EncoderConfig
) -> list[tuple[float, ...]]:
    """Per tile, (ax, bx, ay, by) with original = a * tile_pixel + b on each axis."""
    w, h = original_size
    target = cfg.image_size
    squash = (w / target, 0.0, h / target, 0.0)
    if grid != PLAIN_GRID:
        rows, cols = grid
        fitted_w, fitted_h = fit_size(original_size, (cols * target, rows * target))
        left, top = (cols * target - fitted_w) // 2, (rows * target - fitted_h) // 2
        sx, sy = w / fitted_w, h / fitted_h
        tiles = [(sx, (c * target - left) * sx, sy, (r * target - top) * sy) for r in range(rows) for c in range(cols)]
        return [squash, *tiles]
    if cfg.resize_mode == "squash":
        return [squash]
    if cfg.resize_mode == "pad":
        scale = max(w, h) / target
        left, top = square_pad_offset(original_size)
        return [(scale, -float(left), scale, -float(top))]
    resized_w, resized_h = shortest_edge_size(original_size, target)
    left, top = centre_crop_offset((resized_w, resized_h), target)
    sx, sy = w / resized_w, h / resized_h
    return [(sx, left * sx, sy, top * sy)]


def token_boxes(original_size: tuple[int, int], grid: tuple[int, int], cfg: EncoderConfig) -> np.ndarray:
    """Each token's region (x0, y0, x1, y1) in original-image pixels, [N, 4] float64, in token order.

    Regions are clipped to the image, so a token that sees only padding has an empty box (x0 == x1 or y0 == y1).
    """
    side, patch = cfg.image_size // cfg.patch_size, cfg.patch_size
    row, col = np.divmod(np.arange(side * side), side)
    x0, y0 = col * patch, row * patch
    w, h = original_size
    boxes = []
    for ax, bx, ay, by in _tile_to_original(original_size, tuple(grid), cfg):
        box = np.stack([ax * x0 + bx, ay * y0 + by, ax * (x0 + patch) + bx, ay * (y0 + patch) + by], axis=1)
        boxes.append(np.clip(box, 0, [w, h, w, h]))
    return np.concatenate(boxes).astype(np.float64)
