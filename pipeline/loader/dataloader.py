"""A torch DataLoader over :class:`PrunedTokenDataset` that counts what it yields, for exact resume.

With ``in_order=True`` a torch DataLoader hands out batches round-robin over its workers in worker-id order
starting at worker 0, skipping a worker once it has yielded all its batches. The loader replays that rule on each
batch it yields (counting ``len(batch["keys"])`` samples), so it knows which worker produced it. A resumed
iterator starts its round-robin at the worker that was due next: DataLoader worker ``i`` serves worker stream
``(i + next_worker) % num_workers``, which makes the resumed sequence identical to the uninterrupted one.
Iterating the dataset directly in the main process (no workers) counts each yielded sample itself. Loaded with
every rank's state (a list), a loader with another ``num_workers`` or world size splits the rest of the epoch anew.

Batches leave the workers in shared memory (the collates allocate them there, in buffers each worker reuses once
the training loop has dropped a batch: :mod:`pipeline.loader.shared_batches`) and, with ``tokens_dtype=None`` on
the dataset, in the stored dtype: pass ``pin_memory=True`` on a GPU host and cast on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import DataLoader

from pipeline.loader.collate import TokenBudgetBatcher, pack_collate, pad_collate
from pipeline.loader.dataset import PrunedTokenDataset
from pipeline.loader.shared_batches import PooledCollate, without_held


def _samples_in(batch: Any) -> int:
    if isinstance(batch, Mapping) and "keys" in batch:
        return len(batch["keys"])
    if isinstance(batch, Mapping) and "key" in batch:
        return 1
    raise TypeError("collate_fn must return a dict with 'keys' (one per sample) so the loader can count for resume")


class PrunedTokenLoader(DataLoader):
    """A DataLoader over a :class:`PrunedTokenDataset` that counts what it yields, for exact resume.

    Batches are ``batch_size`` samples (default collate :func:`pad_collate`) or, with ``max_tokens``, at most
    that many kept tokens each, packed inside the workers (default collate :func:`pack_collate`). Its
    ``state_dict()`` is the dataset's, valid after any yielded batch.
    """

    def __init__(
        self,
        dataset: PrunedTokenDataset,
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        max_samples: int | None = None,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep each worker's first epoch and progress; leave it off")
        if kwargs.get("in_order") is False:
            raise ValueError("in_order=False breaks the round-robin that resume relies on; leave it True")
        if batch_size is not None and max_tokens is not None:
            raise ValueError("pass batch_size or max_tokens, not both")
        if max_samples is not None and max_tokens is None:
            raise ValueError("max_samples caps token-budget batches; it needs max_tokens")
        self.pruned = dataset
        dataset._counted_by_loader = True
        if max_tokens is not None:
            source = TokenBudgetBatcher(dataset, max_tokens, PooledCollate(collate_fn or pack_collate), max_samples)
            super().__init__(source, batch_size=None, num_workers=num_workers, **kwargs)
        else:
            collate = collate_fn or (pad_collate if batch_size is not None else None)
            collate = None if collate is None else PooledCollate(collate)
            super().__init__(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        progress = self.pruned.begin_iteration(max(1, self.num_workers))
        for batch in super().__iter__():
            batch = without_held(batch)
            progress.record(_samples_in(batch))
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.pruned.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.pruned.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pruned.load_state_dict(state)
        self.pruned.progress_for(max(1, self.num_workers))
