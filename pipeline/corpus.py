"""A synthetic demo corpus: document pages and natural scenes, written as WebDataset tar shards.

Every sample is drawn from its own generator seeded by ``(seed, index)``, so a sample does not depend on
which other samples are generated, and the same seed gives byte-identical shards. Document pages are dense
like pages rendered from PDFs (about 60% of CLIP patches hold text); a few near-empty title pages and the
text-free natural scenes give an adaptive selector something to vary on.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.config import CorpusConfig

log = logging.getLogger(__name__)

Family = Literal["document", "natural"]
Box = tuple[int, int, int, int]

# CLIP's preprocessing: shortest edge to 224, centre crop 224, 16 px patches.
DENSITY_CROP = 224
DENSITY_PATCH = 16
PNG_PROBABILITY = 0.2
JPEG_QUALITY = 90
NEAR_EMPTY_PROBABILITY = 0.08

VOCABULARY = tuple(
    """
    analysis annual approach area balance basis budget capacity capital change charge claim climate
    company condition contract control cost council country cover credit current customer data
    decision demand design detail development device distance effect energy engine estimate event
    evidence example factor feature figure finance force forecast function growth health history
    income index industry input interest issue journal labour language layer level limit market
    material measure method model motion network number object office operation order output owner
    paper pattern period phase plan point policy pressure price process product profit program
    project quality question range rate ratio record region report research resource result return
    review risk river sample scale schedule science section sector series service signal source
    space staff standard station statement status storage strategy stream structure study summary
    supply surface survey system table target task theory total trade training transfer value
    variable version volume water weight window yield
    """.split()
)
HEADING_WORDS = ("Introduction", "Methods", "Results", "Discussion", "Summary", "Overview", "Appendix",
                 "Background", "Analysis", "Findings", "Conclusion", "Outlook", "Review", "Report")
DOC_BACKGROUNDS = ((255, 255, 255), (252, 251, 247), (248, 248, 244), (250, 247, 238), (244, 246, 250))
INK_COLOURS = ((20, 20, 20), (35, 35, 45), (10, 10, 60), (50, 40, 30))
ACCENT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
WORD_RE = re.compile(r"[A-Za-z]{3,}")


@dataclass
class CorpusSample:
    key: str
    image: Image.Image
    meta: dict[str, Any]
    image_format: Literal["jpg", "png"]

    def members(self) -> dict[str, bytes]:
        """The WebDataset members of this sample: ``{key}.jpg|png``, ``{key}.json``, ``{key}.txt``."""
        buffer = io.BytesIO()
        if self.image_format == "jpg":
            self.image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        else:
            self.image.save(buffer, format="PNG")
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":")).encode()
        return {
            f"{self.key}.{self.image_format}": buffer.getvalue(),
            f"{self.key}.json": meta,
            f"{self.key}.txt": self.meta["caption"].encode(),
        }


# --------------------------------------------------------------------------------------------- density


def text_patch_mask(text_boxes: list[list[int]] | np.ndarray, size: tuple[int, int],
                    crop: int = DENSITY_CROP, patch: int = DENSITY_PATCH) -> np.ndarray:
    """Which patches of CLIP's view (shortest edge to ``crop``, centre crop) overlap a box; [side, side] bool."""
    width, height = size
    if width <= height:
        new_w, new_h = crop, int(crop * height / width)
    else:
        new_w, new_h = int(crop * width / height), crop
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    side = crop // patch
    mask = np.zeros((side, side), dtype=bool)
    for x0, y0, x1, y1 in text_boxes:
        cx0, cx1 = x0 * new_w / width - left, x1 * new_w / width - left
        cy0, cy1 = y0 * new_h / height - top, y1 * new_h / height - top
        if cx1 <= 0 or cy1 <= 0 or cx0 >= crop or cy0 >= crop:
            continue
        c0, c1 = int(max(cx0, 0) // patch), math.ceil(min(cx1, crop) / patch)
        r0, r1 = int(max(cy0, 0) // patch), math.ceil(min(cy1, crop) / patch)
        mask[r0:r1, c0:c1] = True
    return mask


def text_patch_density(text_boxes: list[list[int]] | np.ndarray, size: tuple[int, int]) -> float:
    """Fraction of CLIP patches that overlap any text box (real PDF pages: 0.3-0.93, mean 0.64)."""
    return float(text_patch_mask(text_boxes, size).mean())


# --------------------------------------------------------------------------------------------- documents


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"a {noun}"
    return f"{count} {noun}s"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass
class _Page:
    """A page being drawn; records a tight box for every piece of ink and the words it holds."""

    image: Image.Image
    ink: tuple[int, int, int]
    boxes: list[Box] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    has_digits: bool = False
    blocks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.draw = ImageDraw.Draw(self.image)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> None:
        w, h = self.image.size
        box = (max(0, math.floor(x0)), max(0, math.floor(y0)), min(w, math.ceil(x1)), min(h, math.ceil(y1)))
        if box[2] > box[0] and box[3] > box[1]:
            self.boxes.append(box)

    def text(self, xy: tuple[float, float], text: str, size: int, fill=None, bold: bool = False,
             anchor: str = "la") -> None:
        # A one-pixel stroke stands in for a bold face; on small text it only smudges.
        font, stroke = _font(size), 1 if bold and size >= 14 else 0
        self.draw.text(xy, text, font=font, fill=fill or self.ink, stroke_width=stroke, anchor=anchor)
        self.box(*self.draw.textbbox(xy, text, font=font, stroke_width=stroke, anchor=anchor))
        self.words.extend(w.lower() for w in WORD_RE.findall(text))
        self.has_digits |= any(c.isdigit() for c in text)

    def count(self, block: str) -> None:
        self.blocks[block] = self.blocks.get(block, 0) + 1


def _words(rng: np.random.Generator, n: int) -> list[str]:
    return [VOCABULARY[i] for i in rng.integers(0, len(VOCABULARY), n)]


def _number(rng: np.random.Generator) -> str:
    kind = rng.integers(0, 3)
    if kind == 0:
        return str(int(rng.integers(1, 2000)))
    if kind == 1:
        return f"{rng.uniform(0, 100):.1f}"
    return f"{rng.uniform(0, 60):.1f}%"


def _wrap(rng: np.random.Generator, width: float, size: int, n_lines: int) -> list[str]:
    """Lines of random words that fill ``width``; the last line of the paragraph is ragged."""
    font, lines = _font(size), []
    for i in range(n_lines):
        limit = width * (rng.uniform(0.3, 0.9) if i == n_lines - 1 else 1.0)
        first = _words(rng, 1)[0]
        line = first.capitalize() if i == 0 else first
        while True:
            word = _words(rng, 1)[0] if rng.random() > 0.06 else _number(rng)
            candidate = f"{line} {word}"
            if font.getlength(candidate) > limit:
                break
            line = candidate
        lines.append(line + ("." if i == n_lines - 1 else ""))
    return lines


def _heading(page: _Page, rng, x0: float, y: float, size: int) -> float:
    size = int(size * rng.uniform(1.3, 2.0))
    title = [HEADING_WORDS[rng.integers(0, len(HEADING_WORDS))]] + _words(rng, int(rng.integers(0, 4)))
    if rng.random() < 0.4:
        title.insert(0, f"{int(rng.integers(1, 9))}.")
    colour = page.ink if rng.random() < 0.6 else ACCENT_COLOURS[rng.integers(0, len(ACCENT_COLOURS))]
    page.text((x0, y), " ".join(title), size, fill=colour, bold=True)
    page.count("heading")
    return y + size * 1.6


def _paragraph(page: _Page, rng, x0: float, x1: float, y: float, y_stop: float, size: int, spacing: float) -> float:
    line_height = size * spacing
    n_lines = min(int(rng.integers(3, 12)), int((y_stop - y) // line_height))
    if n_lines < 1:
        return y_stop
    indent = size * 1.5 if rng.random() < 0.3 else 0.0
    for i, line in enumerate(_wrap(rng, x1 - x0 - indent, size, n_lines)):
        page.text((x0 + (indent if i == 0 else 0), y + i * line_height), line, size)
    page.count("paragraph")
    return y + n_lines * line_height


def _bullets(page: _Page, rng, x0: float, x1: float, y: float, y_stop: float, size: int, spacing: float) -> float:
    line_height = size * spacing
    n_items = min(int(rng.integers(2, 7)), int((y_stop - y) // line_height))
    if n_items < 1:
        return y_stop
    numbered = rng.random() < 0.5
    for i in range(n_items):
        marker = f"{i + 1}." if numbered else "-"
        page.text((x0 + size, y + i * line_height), marker, size)
        (line,) = _wrap(rng, (x1 - x0 - size * 3) * rng.uniform(0.4, 1.0), size, 1)
        page.text((x0 + size * 2.5, y + i * line_height), line.rstrip("."), size)
    page.count("list")
    return y + n_items * line_height


def _table(page: _Page, rng, x0: float, x1: float, y: float, y_stop: float, size: int) -> float:
    rows, cols = int(rng.integers(3, 10)), int(rng.integers(2, 6))
    row_height = size * rng.uniform(1.5, 2.0)
    rows = min(rows, int((y_stop - y) // row_height))
    if rows < 2:
        return y_stop
    col_width = (x1 - x0) / cols
    pad = size * 0.3
    line = tuple(min(255, c + 120) for c in page.ink)
    for r in range(rows + 1):
        page.draw.line([(x0, y + r * row_height), (x1, y + r * row_height)], fill=line, width=1)
    if rng.random() < 0.5:
        for c in range(cols + 1):
            page.draw.line([(x0 + c * col_width, y), (x0 + c * col_width, y + rows * row_height)], fill=line, width=1)
    font = _font(size)
    for r in range(rows):
        for c in range(cols):
            if r == 0 or c == 0:
                text = _words(rng, 1)[0].capitalize()
            else:
                text = _number(rng)
            while font.getlength(text) > col_width - 2 * pad and len(text) > 2:
                text = text[:-1]
            page.text((x0 + c * col_width + pad, y + r * row_height + pad), text, size, bold=r == 0)
    page.count("table")
    return y + rows * row_height + size * 0.8


def _chart(page: _Page, rng, x0: float, x1: float, y: float, y_stop: float, size: int) -> float:
    height = min((x1 - x0) * rng.uniform(0.45, 0.75), y_stop - y)
    if height < size * 8:
        return y_stop
    small = max(8, int(size * 0.85))
    page.text((x0, y), "Figure " + str(int(rng.integers(1, 12))) + ": " + " ".join(_words(rng, 3)), small)
    left, right = x0 + small * 3.5, x1 - small
    top, bottom = y + small * 2, y + height - small * 2
    page.draw.line([(left, top), (left, bottom), (right, bottom)], fill=page.ink, width=1)
    page.box(left - 1, top, left + 1, bottom)
    page.box(left, bottom - 1, right, bottom + 1)
    tick_step = int(rng.integers(5, 50))
    for i in range(4):
        tick_y = bottom - (bottom - top) * i / 3
        page.text((left - small * 0.5, tick_y), str(i * tick_step), small, anchor="rm")
    bars = rng.random() < 0.5
    n = int(rng.integers(3, 8)) if bars else int(rng.integers(5, 13))
    step = (right - left) / n
    values = rng.uniform(0.1, 1.0, n)
    if bars:
        colour = ACCENT_COLOURS[rng.integers(0, len(ACCENT_COLOURS))]
        for i, v in enumerate(values):
            bx0, bx1 = left + step * (i + 0.2), left + step * (i + 0.8)
            by0 = bottom - v * (bottom - top)
            page.draw.rectangle([bx0, by0, bx1, bottom], fill=colour)
            page.box(bx0, by0, bx1 + 1, bottom)
            page.text(((bx0 + bx1) / 2, bottom + small * 0.3), _words(rng, 1)[0][:5], small, anchor="ma")
    else:
        for series in range(int(rng.integers(1, 4))):
            colour = ACCENT_COLOURS[rng.integers(0, len(ACCENT_COLOURS))]
            values = np.clip(values + rng.normal(0, 0.15, n) * series, 0.05, 1.0)
            points = [(left + step * (i + 0.5), bottom - v * (bottom - top)) for i, v in enumerate(values)]
            page.draw.line(points, fill=colour, width=2)
            for (ax, ay), (bx, by) in zip(points, points[1:]):
                page.box(min(ax, bx), min(ay, by) - 1, max(ax, bx), max(ay, by) + 1)
        for i in range(0, n, 2):
            page.text((left + step * (i + 0.5), bottom + small * 0.3), str(2000 + i), small, anchor="ma")
    page.count("bar chart" if bars else "line chart")
    return y + height + size


def _document(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict[str, Any]]:
    background = DOC_BACKGROUNDS[rng.integers(0, len(DOC_BACKGROUNDS))]
    page = _Page(Image.new("RGB", (width, height), background), INK_COLOURS[rng.integers(0, len(INK_COLOURS))])
    size = int(rng.integers(max(8, width // 48), max(10, width // 24)))
    margin_x, margin_y = width * rng.uniform(0.03, 0.1), height * rng.uniform(0.03, 0.07)
    if rng.random() < NEAR_EMPTY_PROBABILITY:
        # A title page: its heading sits mid-page, where CLIP's centre crop keeps it.
        y = _heading(page, rng, margin_x, height * rng.uniform(0.3, 0.55), size)
        if rng.random() < 0.5:
            page.text((margin_x, y), " ".join(_words(rng, int(rng.integers(2, 5)))).capitalize(), size)
        return page.image, _document_meta(page, near_empty=True)

    spacing = rng.uniform(1.15, 1.6)
    columns = 2 if rng.random() < 0.3 and width > 300 else 1
    gutter = width * 0.04
    col_width = (width - 2 * margin_x - gutter * (columns - 1)) / columns
    y_stop = height - margin_y - (height - 2 * margin_y) * max(0.0, rng.uniform(-0.6, 0.3))
    gap = size * rng.uniform(0.5, 1.6)
    y_start = _heading(page, rng, margin_x, margin_y, size) + gap
    for col in range(columns):
        x0 = margin_x + col * (col_width + gutter)
        x1 = x0 + col_width
        y = y_start
        while y_stop - y > size * 2:
            kind = rng.choice(["paragraph", "paragraph", "paragraph", "heading", "list", "table", "chart"])
            if kind == "paragraph":
                y = _paragraph(page, rng, x0, x1, y, y_stop, size, spacing)
            elif kind == "heading":
                y = _heading(page, rng, x0, y, int(size * 0.8))
            elif kind == "list":
                y = _bullets(page, rng, x0, x1, y, y_stop, size, spacing)
            elif kind == "table":
                y = _table(page, rng, x0, x1, y, y_stop, size)
            else:
                y = _chart(page, rng, x0, x1, y, y_stop, size)
            y += gap
    if rng.random() < 0.5:
        page.text((width / 2, height - margin_y / 2), str(int(rng.integers(1, 300))), max(8, size - 2), anchor="mm")
    return page.image, _document_meta(page, near_empty=False)


def _document_meta(page: _Page, near_empty: bool) -> dict[str, Any]:
    if near_empty:
        caption = "a nearly empty document page with a title"
    else:
        order = ["heading", "paragraph", "list", "table", "bar chart", "line chart"]
        caption = "a document page with " + _join([_plural(page.blocks[b], b) for b in order if b in page.blocks])
    return {
        "family": "document",
        "text_boxes": [list(b) for b in page.boxes],
        "caption": caption,
        "words": list(dict.fromkeys(page.words))[:16],
        "has_digits": page.has_digits,
        "n_shapes": 0,
        "density": round(text_patch_density(page.boxes, page.image.size), 4),
    }


# --------------------------------------------------------------------------------------------- natural scenes


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, str]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    a, b = _colour(rng), _colour(rng)
    pixels = a + t[..., None] * (b - a)
    texture = rng.choice(["none", "noise", "stripes", "checks", "clouds"])
    if texture == "noise":
        pixels += rng.normal(0, rng.uniform(8, 30), (height, width, 1)).astype(np.float32)
    elif texture == "stripes":
        period = rng.uniform(6, 40)
        phase = xx * np.cos(angle + 1.0) + yy * np.sin(angle + 1.0)
        stripes = (np.sin(2 * np.pi * phase / period) > 0)[..., None]
        pixels = np.where(stripes, pixels * rng.uniform(0.5, 0.85), pixels)
    elif texture == "checks":
        cell = int(rng.integers(8, 48))
        checks = (((xx // cell) + (yy // cell)) % 2 == 0)[..., None]
        pixels = np.where(checks, pixels, pixels * 0.3 + _colour(rng) * 0.7)
    elif texture == "clouds":
        coarse = rng.uniform(-40, 40, (max(2, height // 32), max(2, width // 32), 3)).astype(np.float32)
        smooth = Image.fromarray(np.uint8(coarse + 128)).resize((width, height), Image.BILINEAR)
        pixels += np.asarray(smooth, dtype=np.float32) - 128
    return np.clip(pixels, 0, 255).astype(np.uint8), texture


def _natural(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, dict[str, Any]]:
    pixels, texture = _background(rng, width, height)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    counts: dict[str, int] = {}
    n_shapes = int(rng.integers(0, 7))
    for _ in range(n_shapes):
        kind = str(rng.choice(["circle", "rectangle", "triangle", "polygon"]))
        fill = tuple(int(c) for c in _colour(rng))
        outline = tuple(int(c) for c in _colour(rng)) if rng.random() < 0.3 else None
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.04, 0.25) * min(width, height)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=3)
        elif kind == "rectangle":
            w, h = r * rng.uniform(0.6, 2.0), r * rng.uniform(0.6, 2.0)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill, outline=outline, width=3)
        else:
            sides = 3 if kind == "triangle" else int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, sides))
            radii = r * rng.uniform(0.5, 1.0, sides)
            points = [(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)]
            draw.polygon(points, fill=fill, outline=outline)
        counts[kind] = counts.get(kind, 0) + 1
    parts = [_plural(counts[k], k) for k in ("circle", "rectangle", "triangle", "polygon") if k in counts]
    textures = {"none": "", "noise": "a noisy texture", "stripes": "a striped texture",
                "checks": "a checked texture", "clouds": "a cloudy texture"}
    if textures[texture]:
        parts.append(textures[texture])
    caption = "a natural scene with " + _join(parts) if parts else "a natural scene with a plain gradient"
    return image, {
        "family": "natural",
        "text_boxes": [],
        "caption": caption,
        "words": [],
        "has_digits": False,
        "n_shapes": n_shapes,
        "density": 0.0,
    }


# --------------------------------------------------------------------------------------------- probe pages

CODE_DIGITS = "2578"  # the probe's classes: which digit the page's code tag shows
CODE_PAGE_SIZE = 224  # CLIP's view exactly: no crop can cut the tag off
CODE_TAG = 16  # one patch of the tiny encoder's grid
TAG_COLOURS = ((214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (0, 0, 0))


def generate_code_page(index: int, seed: int) -> CorpusSample:
    """A sparse page (a few lines of text) with one small code tag: a digit of ``CODE_DIGITS`` on a coloured
    ``CODE_TAG``-pixel square aligned to the patch grid, at a random place. ``meta["code"]`` is the digit's
    class, so a probe that answers it must see that one patch; the tag's colour is drawn independently of the
    class. The tag is among ``text_boxes``, and the text stays sparse enough that the oracle keeps it at 30%."""
    rng = np.random.default_rng([seed, 7, index])
    size = CODE_PAGE_SIZE
    page = _Page(Image.new("RGB", (size, size), DOC_BACKGROUNDS[rng.integers(0, len(DOC_BACKGROUNDS))]),
                 INK_COLOURS[rng.integers(0, len(INK_COLOURS))])
    font_size, cells = 10, size // CODE_TAG
    lines = int(rng.integers(2, 5))
    text_rows = rng.choice(np.arange(1, cells - 1), size=lines, replace=False)
    for row in text_rows:
        line = _wrap(rng, size * rng.uniform(0.4, 0.8), font_size, 1)[0]
        page.text((CODE_TAG * 0.5, row * CODE_TAG + 2), line, font_size)
    free = [(r, c) for r in range(cells) for c in range(cells) if r not in set(text_rows.tolist())]
    row, col = free[int(rng.integers(0, len(free)))]
    code = int(rng.integers(0, len(CODE_DIGITS)))
    x0, y0 = col * CODE_TAG, row * CODE_TAG
    page.draw.rectangle((x0, y0, x0 + CODE_TAG - 1, y0 + CODE_TAG - 1), fill=TAG_COLOURS[rng.integers(0, len(TAG_COLOURS))])
    page.draw.text((x0 + CODE_TAG / 2, y0 + CODE_TAG / 2), CODE_DIGITS[code], font=_font(14), fill=(255, 255, 255),
                   anchor="mm", stroke_width=0)
    page.box(x0, y0, x0 + CODE_TAG, y0 + CODE_TAG)
    meta = {"family": "code_page", "code": code, "code_cell": [int(row), int(col)],
            "text_boxes": [list(b) for b in page.boxes],
            "density": round(text_patch_density(page.boxes, page.image.size), 4)}
    return CorpusSample(key=f"code-{index:06d}", image=page.image, meta=meta, image_format="png")


# --------------------------------------------------------------------------------------------- corpus


def generate_sample(index: int, family: Family, seed: int, image_size: int = 448) -> CorpusSample:
    """Sample ``index`` of a corpus; the same arguments give the same image and metadata."""
    rng = np.random.default_rng([seed, index])
    if family == "document":
        width = int(image_size * rng.uniform(0.75, 1.1))
        height = int(min(1.5 * image_size, width * rng.uniform(1.0, 1.45)))
        image, meta = _document(rng, width, height)
        key = f"doc-{index:06d}"
    else:
        width, height = (int(image_size * rng.uniform(0.75, 1.5)) for _ in range(2))
        image, meta = _natural(rng, width, height)
        key = f"nat-{index:06d}"
    image_format = "png" if rng.random() < PNG_PROBABILITY else "jpg"
    return CorpusSample(key=key, image=image, meta=meta, image_format=image_format)


def corpus_plan(cfg: CorpusConfig) -> list[tuple[int, Family, str]]:
    """``(index, family, split)`` for every sample; held-out samples are drawn from each family alike."""
    rng = np.random.default_rng([cfg.seed, cfg.n])
    families: list[Family] = ["natural"] * cfg.n
    for i in rng.permutation(cfg.n)[: round(cfg.n * cfg.document_fraction)]:
        families[i] = "document"
    splits = ["train"] * cfg.n
    for family in ("document", "natural"):
        members = rng.permutation([i for i in range(cfg.n) if families[i] == family])
        for i in members[: round(len(members) * cfg.heldout_fraction)]:
            splits[i] = "heldout"
    return [(i, families[i], splits[i]) for i in range(cfg.n)]


def iter_corpus(cfg: CorpusConfig) -> Iterator[tuple[str, CorpusSample]]:
    """``(split, sample)`` in index order."""
    for index, family, split in corpus_plan(cfg):
        yield split, generate_sample(index, family, cfg.seed, cfg.image_size)


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with fixed metadata (mtime, owner, mode), written under a temporary name and renamed into place."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(partial, path)


def write_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """Write ``{output}/train/shard-%05d.tar`` and ``{output}/heldout/shard-%05d.tar``; return a summary.

    Shards left from an earlier, larger corpus in the same directories are removed so that a glob over a
    split sees exactly this corpus.
    """
    root = Path(cfg.output)
    pending: dict[str, list[CorpusSample]] = {"train": [], "heldout": []}
    shards: dict[str, list[str]] = {"train": [], "heldout": []}
    counts = {"train": 0, "heldout": 0, "document": 0, "natural": 0}
    densities = []

    def flush(split: str) -> None:
        path = root / split / f"shard-{len(shards[split]):05d}.tar"
        write_shard(path, [member for sample in pending[split] for member in sample.members().items()])
        shards[split].append(str(path))
        pending[split] = []

    for split in shards:
        (root / split).mkdir(parents=True, exist_ok=True)
    for split, sample in iter_corpus(cfg):
        pending[split].append(sample)
        counts[split] += 1
        counts[sample.meta["family"]] += 1
        if sample.meta["family"] == "document":
            densities.append(sample.meta["density"])
        if len(pending[split]) == cfg.shard_size:
            flush(split)
    for split in shards:
        if pending[split]:
            flush(split)
        for stale in sorted((root / split).glob("shard-*.tar")):
            if str(stale) not in shards[split]:
                stale.unlink()
    return {
        "output": str(root),
        "samples": counts,
        "shards": {split: len(paths) for split, paths in shards.items()},
        "document_density": density_summary(densities),
    }


def density_summary(densities: list[float]) -> dict[str, float] | None:
    if not densities:
        return None
    values = np.asarray(densities)
    return {
        "mean": round(float(values.mean()), 4),
        "min": round(float(values.min()), 4),
        "p10": round(float(np.percentile(values, 10)), 4),
        "p90": round(float(np.percentile(values, 90)), 4),
        "max": round(float(values.max()), 4),
    }


def make_corpus(cfg: CorpusConfig) -> dict[str, Any]:
    """``jobs.make_corpus``: :func:`write_corpus`, timed and logged."""
    start = time.perf_counter()
    summary = write_corpus(cfg)
    seconds = time.perf_counter() - start
    log.info(f"[make_corpus] wrote {cfg.n} samples to {cfg.output} in {seconds:.1f}s")
    return {**summary, "seconds": round(seconds, 2)}
