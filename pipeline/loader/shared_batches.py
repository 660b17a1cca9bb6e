"""Batch buffers that a loader reuses once the training loop has let go of them (shared memory in DataLoader workers).

A batch made in a worker reaches the training loop without a copy only from shared memory, and a fresh
shared-memory tensor costs a zero-filled page fault per 4 KiB page: on 26 MB float16 batches that was about a
third of a worker's time (``perf``: ``clear_page_erms``, ``shmem_fault``), and two workers delivered fewer samples/s
than the main process alone. So each worker keeps its buffers, with a board of their states in shared memory
(1: with the main process). A batch's tensors are carved from one buffer (so one file descriptor crosses to the
main process per batch, not one per tensor: the per-descriptor handshake was half the main process's time) and the
batch carries a :class:`HeldBuffers` naming its slots; unpickled in the main process it puts a finalizer on each
buffer's storage that marks the slot free when nothing holds that storage any more (a view, a numpy array over it or
a pinned-memory thread's reference all keep it taken). A batch whose HeldBuffers never reaches the main process keeps
its slots taken; once all are, the worker allocates fresh buffers, as without a pool. Without workers the same pool,
in plain memory, spares the page faults of a fresh large tensor per batch.

Only :class:`pipeline.loader.PrunedTokenLoader` turns the pool on (through :class:`PooledCollate`); the collates
called on their own allocate as ``default_collate`` does.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

HELD_KEY = "_held_buffers"
ALIGN = 64  # bytes between the tensors carved from one buffer
# The running collate's batch: allocations come from its buffer.
_ACTIVE: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("atr_pooled_batch", default=None)
# Main process: each worker pool's board, sent with its first batch (pools of exited workers are pruned).
_BOARDS: dict[tuple[int, int], torch.Tensor] = {}
_BOARDS_LOCK = threading.Lock()


def _release(board: torch.Tensor, slot: int) -> None:
    board[slot] = 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(owner: tuple[int, int], board: torch.Tensor | None, held: list[tuple[int, torch.Tensor]]) -> None:
    """Runs where the batch is unpickled (the main process): free each slot once its storage is gone."""
    with _BOARDS_LOCK:
        if board is not None:
            for key in [key for key in _BOARDS if not _pid_alive(key[0])]:
                del _BOARDS[key]  # batches still alive keep their board through their finalizers
            _BOARDS[owner] = board
        board = _BOARDS.get(owner)
    if board is not None:  # else the board never arrived: the slots stay taken, the worker allocates fresh buffers
        _release_when_dropped(board, held)


def _release_when_dropped(board: torch.Tensor, held: list[tuple[int, torch.Tensor]]) -> None:
    for slot, tensor in held:
        weakref.finalize(tensor.untyped_storage(), _release, board, slot)


class HeldBuffers:
    """The pool slots a batch's tensors live in; pickles to a claim of them on the receiving side."""

    def __init__(self, owner: tuple[int, int], board: torch.Tensor | None,
                 held: list[tuple[int, torch.Tensor]]) -> None:
        self.owner, self.board, self.held = owner, board, held

    def __reduce__(self):
        return _claim, (self.owner, self.board, self.held)


class BufferPool:
    """At most ``slots`` reusable batch buffers of one process: shared memory in a DataLoader worker (claimed where
    the batch is unpickled), plain memory in the main process (claimed at once: a fresh large tensor page-faults
    there too)."""

    def __init__(self, slots: int, shared: bool) -> None:
        self.shared = shared
        self.owner = (os.getpid(), id(self))
        self.board = torch.zeros(slots, dtype=torch.int32)
        if shared:
            self.board.share_memory_()
        self.board_sent = False
        self.flags = self.board.numpy()  # the same memory, read without a tensor per look
        self.buffers: list[torch.UntypedStorage | np.ndarray | None] = []
        self.batch_bytes = 0  # the most one batch has needed: a new buffer gets that much and 1/8 more
        self.lock = threading.Lock()  # loaders iterated from several threads share a pool

    def take(self, nbytes: int, held: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes`` over a free buffer (taken for the batch whose slots are ``held``),
        or over a fresh one when none is free."""
        capacity = max(nbytes, self.batch_bytes)
        capacity += capacity // 8
        with self.lock:
            slot = self._free_slot(nbytes, capacity)
            if slot is not None:
                self.flags[slot] = 1
                buffer = self.buffers[slot]
        if slot is None:
            return self._bytes(self._new(nbytes))
        base = self._bytes(buffer)
        held.append((slot, base))
        return base

    def _new(self, nbytes: int) -> torch.UntypedStorage | np.ndarray:
        return torch.UntypedStorage._new_shared(nbytes) if self.shared else np.empty(nbytes, np.uint8)

    @staticmethod
    def _bytes(buffer: torch.UntypedStorage | np.ndarray) -> torch.Tensor:
        if isinstance(buffer, np.ndarray):  # a storage of its own per batch, so its finalizer sees the batch's end
            return torch.from_numpy(buffer)
        return torch.empty(0, dtype=torch.uint8).set_(buffer, 0, (buffer.nbytes(),))

    def _free_slot(self, nbytes: int, capacity: int) -> int | None:
        free = [slot for slot in range(len(self.buffers)) if not self.flags[slot]]
        capacities = {slot: _capacity(self.buffers[slot]) for slot in free}
        fitting = [slot for slot in free if capacities[slot] >= nbytes]
        if fitting:
            return min(fitting, key=capacities.get)
        if len(self.buffers) < len(self.board):  # room to grow: a new slot, or a free one too small replaced
            self.buffers.append(self._new(capacity))
            return len(self.buffers) - 1
        if free:
            self.buffers[free[0]] = self._new(capacity)
            return free[0]
        return None

    def finish_batch(self, batch: Any, call: _Batch) -> Any:
        """Hand the batch's slots to whoever will drop it: here at once, or where the batch is unpickled (a batch
        that cannot carry them gets them for good; the pool forgets them)."""
        self.batch_bytes = max(self.batch_bytes, call.total)
        held = call.held
        if not held:
            return batch
        if not self.shared:
            _release_when_dropped(self.board, held)
        elif isinstance(batch, dict):
            board = None if self.board_sent else self.board
            batch[HELD_KEY] = HeldBuffers(self.owner, board, held)
            self.board_sent = True
        else:
            self.release(held, forget=True)
        return batch

    def release(self, held: list[tuple[int, torch.Tensor]], forget: bool = False) -> None:
        """Free ``held``'s slots now (a failed collate); ``forget`` leaves their buffers to whoever holds them."""
        with self.lock:
            for slot, _ in held:
                if forget:
                    self.buffers[slot] = None
                self.flags[slot] = 0


def _capacity(buffer: torch.UntypedStorage | np.ndarray | None) -> int:
    if buffer is None:
        return 0
    return buffer.nbytes if isinstance(buffer, np.ndarray) else buffer.nbytes()


class _Batch:
    """One collate call's tensors, carved one after another from the pool buffer it took (another when full)."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool, self.held = pool, []
        self.base: torch.Tensor | None = None
        self.used = self.total = 0

    def empty(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        offset = -(-self.used // ALIGN) * ALIGN
        if self.base is None or offset + nbytes > self.base.numel():
            self.base, offset = self.pool.take(max(nbytes, self.pool.batch_bytes - self.total), self.held), 0
        self.used = offset + nbytes
        self.total += -(-nbytes // ALIGN) * ALIGN
        return self.base[offset:offset + nbytes].view(dtype).view(shape)


def pooled_empty() -> Callable[[torch.dtype, tuple[int, ...]], torch.Tensor] | None:
    """``empty(dtype, shape)`` from the pool while a :class:`PooledCollate` runs in this thread, else ``None``."""
    batch = _ACTIVE.get()
    return None if batch is None else batch.empty


class PooledCollate:
    """``collate`` with its batch tensors taken from a :class:`BufferPool` of this process (each DataLoader worker
    makes its own; the main process's lives as long as this collate, i.e. its loader).

    ``slots`` bounds the buffers a worker keeps: the DataLoader's ``prefetch_factor`` batches in flight, the one the
    training loop holds and the one it is about to replace, with room for batches that outgrow their buffer.
    """

    def __init__(self, collate: Callable[[list[dict[str, Any]]], Any], slots: int = 12) -> None:
        self.collate, self.slots = collate, slots
        self._pool: tuple[int, BufferPool] | None = None  # (pid, pool)

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker makes its own pool
        return {**self.__dict__, "_pool": None}

    def pool(self) -> BufferPool:
        if self._pool is None or self._pool[0] != os.getpid():
            self._pool = (os.getpid(), BufferPool(self.slots, shared=get_worker_info() is not None))
        return self._pool[1]

    def __call__(self, samples: list[dict[str, Any]]) -> Any:
        pool = self.pool()
        call = _Batch(pool)
        token = _ACTIVE.set(call)
        try:
            batch = self.collate(samples)
        except BaseException:
            pool.release(call.held)
            raise
        finally:
            _ACTIVE.reset(token)
        return pool.finish_batch(batch, call)


def without_held(batch: Any) -> Any:
    """The batch as the training loop sees it (the claim already happened on unpickling)."""
    if isinstance(batch, dict):
        batch.pop(HELD_KEY, None)
    return batch
