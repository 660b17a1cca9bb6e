"""A real-page evaluation set: pages of PDF manuals that Debian packages ship, with text boxes derived from the ink.

Reproduce the page images (nothing of them is committed)::

    apt-get install -y poppler-utils
    apt-get download texlive-latex-base-doc && dpkg-deb -x texlive-latex-base-doc_*.deb /tmp/atr22/ext
    mkdir -p /tmp/atr_pages/png
    find /tmp/atr22/ext -name '*.pdf' | sort | while read -r pdf; do
        pdftoppm -r 100 -png -f 2 -l 5 "$pdf" "/tmp/atr_pages/png/$(basename "$pdf" .pdf)"; done

then ``python -m bench.real_pages --pages /tmp/atr_pages/png --out /tmp/atr_pages/set``: WebDataset shards in
``train/`` and ``heldout/``, split by *document* (a PDF's pages all go to one side), each sample a PNG and a json
``{"family": "document", "text_boxes": [...], "source": PDF, "page": N}``. The text boxes are the bounding boxes
of the ink's connected components after a small horizontal dilation (about one box per word, figures and rules
included); only dense pages are kept (text patches in CLIP's centre crop ≥ ``--min-density``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.corpus import text_patch_density, write_shard

INK_LEVEL = 160  # grey level below which a pixel is ink (0-255)
PAGE_NAME = re.compile(r"^(?P<doc>.+)-(?P<page>\d+)\.png$")


def ink_boxes(image: Image.Image) -> list[list[int]]:
    """Word-sized boxes ``[x0, y0, x1, y1]`` around the page's ink."""
    ink = np.asarray(image.convert("L")) < INK_LEVEL
    joined = ndimage.binary_dilation(ink, structure=np.ones((1, 5), dtype=bool))
    labels, _ = ndimage.label(joined)
    return [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels) if s is not None]


def heldout_document(name: str) -> bool:
    return hashlib.sha256(name.encode()).digest()[0] % 2 == 0


def build(pages: Path, out: Path, min_density: float, shard_size: int = 64) -> dict[str, object]:
    splits: dict[str, list[tuple[str, bytes]]] = {"train": [], "heldout": []}
    densities: dict[str, list[float]] = {"train": [], "heldout": []}
    documents: dict[str, set[str]] = {"train": set(), "heldout": set()}
    for path in sorted(pages.glob("*.png")):
        match = PAGE_NAME.match(path.name)
        if not match:
            continue
        image = Image.open(path).convert("RGB")
        boxes = ink_boxes(image)
        density = text_patch_density(boxes, image.size)
        if density < min_density:
            continue
        split = "heldout" if heldout_document(match["doc"]) else "train"
        key = re.sub(r"[^A-Za-z0-9_]", "_", f"{match['doc']}_p{int(match['page']):03d}")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        meta = {"family": "document", "text_boxes": boxes, "source": match["doc"], "page": int(match["page"])}
        splits[split] += [(f"{key}.png", buffer.getvalue()), (f"{key}.json", json.dumps(meta).encode())]
        densities[split].append(density)
        documents[split].add(match["doc"])
    summary: dict[str, object] = {}
    for split, members in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, len(members), 2 * shard_size):
            write_shard(out / split / f"shard-{start // (2 * shard_size):05d}.tar", members[start : start + 2 * shard_size])
        summary[split] = {"pages": len(densities[split]), "documents": len(documents[split]),
                          "mean_text_patch_density": float(np.mean(densities[split])) if densities[split] else None}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.real_pages")
    parser.add_argument("--pages", type=Path, required=True, help="folder of pdftoppm PNGs named DOC-PAGE.png")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--min-density", type=float, default=0.3)
    args = parser.parse_args()
    print(json.dumps(build(args.pages, args.out, args.min_density)))


if __name__ == "__main__":
    main()
