"""Pure metric functions: which tokens hold text, how much of it a keep-mask retains, and the VQA scores.

A token is a *text patch* when the union of ground-truth text boxes covers more than ``min_coverage`` of its
region in the original image. The default, 0, counts any overlap: the corpus's text density is measured that
way (and so are the 30-93% of real PDF pages), and a patch holding a word's edge is one a reader needs.
Raise it to ignore patches that a box's corner merely grazes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TEXT_PATCH_MIN_COVERAGE = 0.0


# --------------------------------------------------------------------------------------------- token geometry


def _pixel_range(lo: float, hi: float, limit: int) -> tuple[int, int]:
    start = min(max(int(round(lo)), 0), limit)
    return start, min(max(int(round(hi)), start), limit)


def token_text_coverage(token_boxes: np.ndarray, text_boxes: Sequence[Sequence[float]], image_size: tuple[int, int]) -> np.ndarray:
    """Fraction of each token's region ``[N, 4]`` (x0, y0, x1, y1 in original pixels) covered by the union of
    ``text_boxes``; regions that are empty (padding) have coverage 0. ``image_size`` is (width, height)."""
    width, height = image_size
    ink = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in text_boxes:
        xa, xb = _pixel_range(x0, x1, width)
        ya, yb = _pixel_range(y0, y1, height)
        ink[ya:yb, xa:xb] = True
    # Summed-area table: the ink inside any rectangle in four lookups, so overlapping boxes count once.
    table = np.zeros((height + 1, width + 1), dtype=np.int64)
    table[1:, 1:] = ink.cumsum(0).cumsum(1)
    coverage = np.zeros(len(token_boxes), dtype=np.float64)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(token_boxes, dtype=np.float64)):
        xa, xb = _pixel_range(x0, x1, width)
        ya, yb = _pixel_range(y0, y1, height)
        area = (xb - xa) * (yb - ya)
        if area:
            coverage[i] = (table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]) / area
    return coverage


def text_patch_mask(coverage: np.ndarray, min_coverage: float = TEXT_PATCH_MIN_COVERAGE) -> np.ndarray:
    return np.asarray(coverage) > min_coverage


# --------------------------------------------------------------------------------------------- selection quality


def patch_recall(keep: np.ndarray, relevant: np.ndarray) -> float:
    """Fraction of ``relevant`` tokens that ``keep`` retains; NaN when there are none to retain."""
    relevant = np.asarray(relevant, dtype=bool)
    total = int(relevant.sum())
    if total == 0:
        return float("nan")
    return float(np.asarray(keep, dtype=bool)[relevant].sum() / total)


def text_patch_recall(keep: np.ndarray, is_text: np.ndarray) -> float:
    return patch_recall(keep, is_text)


def nontext_patch_recall(keep: np.ndarray, is_text: np.ndarray) -> float:
    return patch_recall(keep, ~np.asarray(is_text, dtype=bool))


def text_coverage(is_text: np.ndarray) -> float:
    """An image's share of text patches: the recall a ratio below it cannot exceed."""
    return float(np.mean(is_text)) if len(is_text) else 0.0


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 0, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator else float("nan")


# --------------------------------------------------------------------------------------------- answer scoring

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluation's normalisation, condensed: lower case, punctuation out (decimal points kept),
    number words to digits, articles dropped, whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower().replace("\n", " ").replace("\t", " "))
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: an answer is fully right when at least 3 annotators gave it.

    With the standard 10 answers it is the official score, averaged over the 10 leave-one-out subsets of 9;
    with fewer, ``min(1, matches / min(3, n))`` so a single reference answer reads as exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy: no reference answers")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == predicted for a in answers]
    if len(matches) >= 10:
        total = sum(matches)
        return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))
    return min(1.0, sum(matches) / min(3, len(matches)))


def _normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA): the best ``1 - NL`` over the
    reference answers, 0 where the normalised distance NL reaches ``threshold``."""
    if not answers:
        raise ValueError("anls: no reference answers")
    predicted = _normalize_text(prediction)
    best = 0.0
    for answer in answers:
        reference = _normalize_text(answer)
        longest = max(len(predicted), len(reference))
        distance = levenshtein(predicted, reference) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: numbers within ``tolerance`` relative error (``"12%"`` reads 0.12), other
    answers by case-insensitive equality; a reference of 0 is matched as text, as in the reference code."""
    if not answers:
        raise ValueError("relaxed_accuracy: no reference answers")
    predicted = prediction.strip()
    for answer in answers:
        reference = answer.strip()
        target, value = _to_float(reference), _to_float(predicted)
        if value is not None and target:
            correct = abs(value - target) / abs(target) <= tolerance
        else:
            correct = predicted.lower() == reference.lower()
        if correct:
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 when the prediction equals any reference after case folding, whitespace collapse and a final period."""
    if not answers:
        raise ValueError("exact_match: no reference answers")
    predicted = _normalize_text(prediction).rstrip(".")
    return float(any(predicted == _normalize_text(a).rstrip(".") for a in answers))


ANSWER_METRICS = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
}
