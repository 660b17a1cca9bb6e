"""The oracle: keeps ground-truth text patches first, so it bounds the text recall any method can reach."""

from __future__ import annotations

import zlib

import numpy as np


def oracle_scores(coverage: np.ndarray, key: str) -> np.ndarray:
    """Keep scores (higher = keep) that rank tokens by how much of them is text, most covered first; tokens
    with equal coverage (the text-free background, mostly) are ordered by a shuffle seeded from ``key``.

    Every text patch covers more than any non-text patch, so at any ratio the oracle keeps
    ``min(n_text, k)`` text patches: recall ``min(1, r / coverage)`` for an image whose share of text patches
    is ``coverage``. Scores are ranks (``N`` for the first), exact in float32.
    """
    coverage = np.asarray(coverage, dtype=np.float64)
    tie_break = np.random.default_rng(zlib.crc32(key.encode())).permutation(len(coverage))
    order = np.lexsort((tie_break, -coverage))
    scores = np.empty(len(coverage), dtype=np.float32)
    scores[order] = np.arange(len(coverage), 0, -1, dtype=np.float32)
    return scores
