"""The local executor: the stages in one process without Ray, overlapped in threads.

    decode threads ─▶ queue of row chunks ─▶ batches ─▶ stage thread ─▶ this thread ──────▶ write threads
    (a shard each)    (bounded)                          (batch k + 2)   queue batch k + 1,   (table, Parquet,
                                                                         gather batch k       file)

Each decode thread reads whole shards and hands their rows on in chunks, so a batch spans few shards (few part
files). The queue bounds the decoded rows held in memory. One batch is staged (decoded on the GPU, uploaded)
while this thread queues the next one on the GPU and only then gathers the previous one's kept tokens, so the
GPU always has work queued; the host work on the kept tokens (building the table) happens in the write
threads, of which at most ``WRITE_THREADS`` batches wait. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

from pipeline.compress.plan import RunPlan
from pipeline.compress.progress import LiveProgress
from pipeline.config import CompressConfig
from pipeline.sources import ShardRef
from pipeline.stages.decode import decode_shard
from pipeline.stages.encode_select import EncodeSelectStage, Models, StagedBatch
from pipeline.stages.gpu_decode import gpu_decode_requested
from pipeline.stages.kept_tokens import KeptTokens
from pipeline.stages.records import batches
from pipeline.stages.write import WriteStage
from pipeline.timeline import record

ROW_CHUNK = 32
WRITE_THREADS = 4


def run_local(plan: RunPlan, metadata: dict[str, Any], live: LiveProgress,
              models: Models | None = None) -> Iterator[dict[str, Any]]:
    cfg = plan.config
    encode = EncodeSelectStage(cfg, models)
    encode.on_encoded = live.add
    if gpu_decode_requested(cfg) and not encode.decodes_jpegs_on_gpu:
        # The stage logged why; the decode threads then decode every image, in parallel.
        cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, device="cpu"))
    write = WriteStage(cfg, plan.output_dir, plan.run_id, metadata)
    threads = decode_threads(encode.decodes_jpegs_on_gpu)
    capacity = max(threads, 2 * cfg.encoder.batch_size // ROW_CHUNK)
    decoded = decoded_rows(plan.todo, cfg, threads, capacity)
    with contextlib.closing(decoded), ThreadPoolExecutor(1, thread_name_prefix="stage") as stage_pool, \
            ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="write") as write_pool:
        writes: deque[Future] = deque()
        for staged, kept in encode.encode_overlapped(batches(decoded, cfg.encoder.batch_size), stage_pool):
            writes.append(write_pool.submit(_write, write, encode, staged, kept))
            while writes and (writes[0].done() or len(writes) > WRITE_THREADS):
                yield from writes.popleft().result()
        while writes:
            yield from writes.popleft().result()


def decode_threads(jpegs_on_gpu: bool) -> int:
    cpus = len(os.sched_getaffinity(0))
    # With nvJPEG the decode threads only read shards and check headers: a few keep up, and fewer threads
    # leave the GIL to the ones feeding the GPU.
    return max(4, cpus // 4) if jpegs_on_gpu else cpus


def _write(write: WriteStage, encode: EncodeSelectStage, batch: StagedBatch,
           kept: KeptTokens | None) -> list[dict[str, Any]]:
    started = time.perf_counter()
    records = write(encode.encoded_table(batch, kept)).to_pylist()
    record("write", started, len(batch.samples))
    return records


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_WORKER_DONE = object()


def decoded_rows(shards: list[ShardRef], cfg: CompressConfig, threads: int, capacity: int) -> Iterator[dict[str, Any]]:
    """The rows of every shard, decoded by ``threads`` threads a shard at a time, through a queue of at most
    ``capacity`` chunks; a decode thread's error is raised here. Closing the iterator stops the threads."""
    chunks: queue.Queue = queue.Queue(maxsize=capacity)
    todo = iter(shards)
    todo_lock = threading.Lock()
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            while not stop.is_set():
                with todo_lock:
                    shard = next(todo, None)
                if shard is None:
                    return
                started, chunk, count = time.perf_counter(), [], 0
                for row in decode_shard(shard, cfg):
                    chunk.append(row)
                    count += 1
                    if len(chunk) == ROW_CHUNK:
                        put(chunk)
                        chunk = []
                if chunk:
                    put(chunk)
                record("decode", started, count)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failed(exc))
        finally:
            put(_WORKER_DONE)

    workers = [threading.Thread(target=work, name=f"decode-{i}", daemon=True) for i in range(max(1, threads))]
    for worker in workers:
        worker.start()
    try:
        finished = 0
        while finished < len(workers):
            item = chunks.get()
            if item is _WORKER_DONE:
                finished += 1
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield from item
    finally:
        stop.set()
        for worker in workers:
            worker.join()
