"""The order a worker reads a compress output in, and the count of what it delivered; pure functions of numbers.

Each epoch the manifest's files are permuted with ``(seed, epoch)`` and concatenated into one stream of ``N``
rows: the epoch's canonical positions. The positions still owed this epoch (all of them, or those a resumed state
did not record as emitted) are cut into ``world_size * num_workers`` contiguous, balanced parts (sizes differ by at
most one), one per global worker ``rank * num_workers + worker_id``. A worker cuts its part into shuffle windows of
at most ``window`` consecutive positions (sized from the shuffle buffer's bytes), never across the start of a data
file, and emits each window in a permutation
seeded by ``(seed, epoch, base, global worker, window)``: it holds at most one window (plus the row groups being
read ahead), never copies a row into a buffer, and reads each row group once, whole.

The state of an epoch is the set of positions the training loop received, a bit per position. Resumed with the
same world size and workers, each worker drops the first ``consumed`` indices of its order and the run continues
batch for batch as the uninterrupted one would. Resumed with another world size or worker count, the union of
every old rank's set becomes the new *base*: the remaining positions are split over the new workers, so every
sample of the epoch is delivered exactly once across the runs (elastic resume).

Ranks' shares differ by at most ``num_workers`` samples, so their batch counts may differ by one at the end of an
epoch; DDP training should stop each epoch at the shortest rank's step count (or use ``join``).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def split_range(total: int, parts: int, part: int) -> tuple[int, int]:
    """Contiguous, balanced: part ``p`` of ``parts`` gets ``[p*total//parts, (p+1)*total//parts)``."""
    return part * total // parts, (part + 1) * total // parts


def file_order(n_files: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_files)
    return np.random.default_rng([seed, epoch]).permutation(n_files)


def shuffle_buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a bounded shuffle buffer emits stream indices ``0..n-1`` in.

    Fill the buffer with the first ``buffer_size`` items; then each new item replaces a uniformly drawn buffered
    one, which is emitted; at the end the rest leave in random order. The item emitted ``t``-th always has
    stream index ``< t + buffer_size``, which bounds the rows a reader must hold.
    """
    size = min(buffer_size, n)
    if size <= 1:
        return np.arange(n)
    buffer = list(range(size))
    order = []
    for incoming, slot in zip(range(size, n), rng.integers(0, size, n - size).tolist()):
        order.append(buffer[slot])
        buffer[slot] = incoming
    order.extend(buffer[i] for i in rng.permutation(size).tolist())
    return np.asarray(order, dtype=np.int64)


def window_order(n: int, window: int, rng: np.random.Generator, breaks: Sequence[int] = ()) -> np.ndarray:
    """Indices ``0..n-1`` in consecutive windows of at most ``window``, each permuted, no window across one of the
    ascending ``breaks`` (where a new data file starts: a window then needs one file's rows, not two files' row
    groups): the item emitted ``t``-th lies in the window of index ``t``, so a reader holds one window at a time."""
    if window <= 1:
        return np.arange(n, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    bounds = [0, *(b for b in breaks if 0 < b < n), n]
    for segment_start, segment_stop in zip(bounds, bounds[1:]):
        for start in range(segment_start, segment_stop, window):
            stop = min(segment_stop, start + window)
            order[start:stop] = start + rng.permutation(stop - start)
    return order


def encode_mask(mask: np.ndarray) -> str:
    """A bool mask as JSON-able text: packed bits, zlib, base64 (runs of emitted samples compress to little)."""
    return base64.b64encode(zlib.compress(np.packbits(mask.astype(bool)).tobytes(), 6)).decode("ascii")


def decode_mask(text: str, n: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    if len(bits) != (n + 7) // 8:
        raise ValueError(f"loader state's sample set covers {len(bits) * 8} positions, this output has {n}")
    return np.unpackbits(bits)[:n].astype(bool)


@dataclass
class Progress:
    """Samples of this epoch the training loop has received, per worker stream of this rank."""

    sizes: list[int]
    consumed: list[int]
    next_worker: int = 0

    @property
    def complete(self) -> bool:
        return self.consumed == self.sizes

    def record(self, count: int) -> None:
        """Attribute a received batch to the stream DataLoader's round-robin says produced it."""
        streams = len(self.sizes)
        for _ in range(streams):
            if self.consumed[self.next_worker] < self.sizes[self.next_worker]:
                break
            self.next_worker = (self.next_worker + 1) % streams
        stream = self.next_worker
        if self.consumed[stream] + count > self.sizes[stream]:
            raise RuntimeError(
                f"received {count} samples from worker stream {stream}, which had "
                f"{self.sizes[stream] - self.consumed[stream]} left: the DataLoader did not deliver batches in "
                "in-order round-robin (was in_order=False or the dataset wrapped?)"
            )
        self.consumed[stream] += count
        self.next_worker = (stream + 1) % streams
