"""The encode + select stage: tiles -> the vision tower -> the selector -> each image's kept tokens.

One stage per actor (or per local run): it loads the encoder and selector once, then overlaps staging,
encoding and gathering across batches so the device always has work queued.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import CompressConfig
from pipeline.encoders import VisionEncoder
from pipeline.encoders.gpu_preprocess import prepare_images
from pipeline.failpoints import maybe_fail
from pipeline.selector import TokenSelector, build_selector, choose_tokens
from pipeline.sources.decode import DecodeError
from pipeline.stages.decode import decode_on_cpu
from pipeline.stages.gpu_decode import decode_jpegs, gpu_decode_requested, load_nvjpeg
from pipeline.stages.kept_tokens import KeptTokens, encode_tiles, gather_kept, per_image
from pipeline.stages.records import ENCODED_SCHEMA, QUARANTINE, SAMPLE, EncodedCounts, batches
from pipeline.timeline import record

log = logging.getLogger(__name__)


@dataclass
class StagedBatch:
    """A batch ready for the tower: its rows, the sample rows among them, and their tiles on the device."""

    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    tiles: torch.Tensor | None  # uint8 [sum of tile_counts, S, S, 3] on the encoder's device
    tile_counts: list[int]


@dataclass
class SelectedBatch:
    """A staged batch encoded and selected on the device, its kept tokens not gathered yet."""

    staged: StagedBatch
    tokens: torch.Tensor | None = None  # [B, N, D] in the encoder's dtype
    scores: torch.Tensor | None = None  # [B, N]
    keep: torch.Tensor | None = None  # [B, N] bool
    ready: torch.cuda.Event | None = None  # on a GPU: recorded once the selection is done


@dataclass(frozen=True)
class Models:
    """The encoder and the selector built for it, loaded once and shared by whoever needs them in a process."""

    encoder: VisionEncoder
    selector: TokenSelector

    @classmethod
    def around(cls, encoder: VisionEncoder, cfg: CompressConfig) -> Models:
        """``encoder`` with ``cfg.selector`` built on its device (a learned one checked against its fingerprint)."""
        selector = build_selector(cfg.selector, encoder.fingerprint(), encoder.device, side=encoder.side,
                                  storage_options=cfg.storage.storage_options())
        return cls(encoder, selector)


class EncodeSelectStage:
    """Loads the encoder and selector once; each call encodes a batch of sample rows and keeps their tokens.

    A call is four steps, so that an executor can keep the GPU busy: :meth:`stage` (JPEGs decoded with nvJPEG
    or on the CPU, resized on the device, tiles uploaded through pinned memory; on a CUDA stream of its own, in
    a thread of its own), :meth:`encode_and_select` (tower, selector and selection queued on the device),
    :meth:`gather` (the kept tokens gathered on the device and copied back, in the stored dtype, on a third
    stream, while the next batch's encoding runs) and :meth:`encoded_table` (the rows for the write stage).
    :meth:`encode_overlapped` chains them over a stream of batches (the local executor's whole run, a Ray
    actor's call of ``ray.batches_per_call`` batches).
    """

    def __init__(self, cfg: CompressConfig, models: Models | None = None) -> None:
        """``models``: loaded already in this process for ``cfg`` (the local executor's driver loads them once)."""
        self.cfg = cfg
        models = models or Models.around(VisionEncoder.from_config(cfg.encoder), cfg)
        self.encoder, self.selector = models.encoder, models.selector
        self.device = self.encoder.device
        self.needs_cls_attention = cfg.selector.method == "cls_attention"
        self.jpeg_decoder = self._load_jpeg_decoder()
        on_gpu = self.device.type == "cuda"
        self.staging_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.gather_stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.samples_seen = 0
        self.on_encoded: Callable[[EncodedCounts], None] | None = None  # live progress, set by the executor
        self._stage_pool: ThreadPoolExecutor | None = None  # for __call__, made on first use
        self._warm_up()

    @property
    def decodes_jpegs_on_gpu(self) -> bool:
        return self.jpeg_decoder is not None

    def __call__(self, batch: pa.Table) -> pa.Table:
        """A batch of decoded rows -> its ENCODED_SCHEMA rows, encoded ``encoder.batch_size`` samples at a time
        with the overlap of :meth:`encode_overlapped`."""
        if self._stage_pool is None:
            self._stage_pool = ThreadPoolExecutor(1, thread_name_prefix="stage")
        micro_batches = batches(batch.to_pylist(), self.cfg.encoder.batch_size)
        tables = [self.encoded_table(staged, kept)
                  for staged, kept in self.encode_overlapped(micro_batches, self._stage_pool)]
        return pa.concat_tables(tables) if tables else ENCODED_SCHEMA.empty_table()

    def encode_overlapped(self, row_batches: Iterable[list[dict[str, Any]]],
                          stage_pool: ThreadPoolExecutor) -> Iterator[tuple[StagedBatch, KeptTokens | None]]:
        """Each batch's staged rows and kept tokens, in order. Batch k + 1 is staged in ``stage_pool`` while
        batch k is queued on the device, and batch k - 1 is gathered only after that, so the device always has
        work queued."""
        staged: Future | None = None
        selected: SelectedBatch | None = None  # queued on the device, not gathered yet
        for rows in itertools.chain(row_batches, [None]):  # lazily: row_batches may be a stream
            next_staged = stage_pool.submit(self._timed_stage, rows) if rows is not None else None
            if staged is not None:
                batch: StagedBatch = staged.result()
                started = time.perf_counter()
                previous, selected = selected, self.encode_and_select(batch)
                record("encode", started, len(batch.samples))
                if previous is not None:
                    yield previous.staged, self._timed_gather(previous)
            staged = next_staged
        if selected is not None:
            yield selected.staged, self._timed_gather(selected)

    def _timed_stage(self, rows: list[dict[str, Any]]) -> StagedBatch:
        started = time.perf_counter()
        staged = self.stage(rows)
        record("stage", started, len(staged.samples))
        return staged

    def _timed_gather(self, selected: SelectedBatch) -> KeptTokens | None:
        started = time.perf_counter()
        kept = self.gather(selected)
        record("gather", started, len(selected.staged.samples))
        return kept

    def stage(self, rows: list[dict[str, Any]]) -> StagedBatch:
        """Everything up to the batch's uint8 tiles on the device; a sample no decoder can read is quarantined."""
        stream = self.staging_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            decoded_tiles = self._decode_jpegs([r for r in rows if r["kind"] == SAMPLE and r["image"] is not None])
            samples = [r for r in rows if r["kind"] == SAMPLE]
            tiles = self._gather_tiles(samples, decoded_tiles)
        if stream is not None:
            stream.synchronize()
        return StagedBatch(rows, samples, tiles, [r["n_tiles"] for r in samples])

    @torch.inference_mode()
    def encode_and_select(self, staged: StagedBatch) -> SelectedBatch:
        """Queue the tower, the selector and the selection on the device; returns before the device is done."""
        if not staged.samples:
            return SelectedBatch(staged)
        if self.staging_stream is not None:  # allocated on the staging stream, read and freed on this one
            staged.tiles.record_stream(torch.cuda.current_stream(self.device))
        features, attention = encode_tiles(self.encoder, staged.tiles, with_cls_attention=self.needs_cls_attention)
        tokens, mask = per_image(features, staged.tile_counts)
        cls_attention = per_image(attention, staged.tile_counts)[0] if attention is not None else None
        keys = [row["key"] for row in staged.samples]
        scores, keep = choose_tokens(self.selector, tokens, mask, self.cfg.selector, keys=keys,
                                     cls_attention=cls_attention)
        selected = SelectedBatch(staged, tokens, scores, keep)
        if self.gather_stream is not None:
            selected.ready = torch.cuda.Event()
            selected.ready.record(torch.cuda.current_stream(self.device))
        self.samples_seen += len(staged.samples)
        maybe_fail("ATR_FAIL_ENCODE_AFTER", self.samples_seen)
        return selected

    @torch.inference_mode()
    def gather(self, selected: SelectedBatch) -> KeptTokens | None:
        """The kept tokens, on the host in the stored dtype (None: no samples). On a GPU this waits for this
        batch's selection only, and gathers on its own stream, so a batch queued since keeps the GPU busy."""
        if selected.keep is None:
            return None
        stream = self.gather_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                stream.wait_event(selected.ready)
            return gather_kept(selected.tokens, selected.scores, selected.keep, self.cfg.output.dtype,
                               with_scores=self.cfg.selector.store_scores)

    def encoded_table(self, staged: StagedBatch, kept: KeptTokens | None) -> pa.Table:
        """The batch as ENCODED_SCHEMA rows: samples with their kept tokens (columns built on the host buffers,
        not copied), then the other rows. Host work only: any thread may do it."""
        others = [row for row in staged.rows if row["kind"] != SAMPLE]
        if self.on_encoded is not None:
            self.on_encoded(EncodedCounts(
                images=len(staged.samples), tokens_full=sum(staged.tile_counts) * self.encoder.tokens_per_tile,
                tokens_kept=int(kept.n_kept.sum()) if kept is not None else 0,
                source_bytes=sum(row["source_bytes"] or 0 for row in staged.samples)))
        tables = [pa.Table.from_pylist(others, schema=ENCODED_SCHEMA)]
        for images, token_columns in kept.arrow_columns() if kept is not None else ():
            samples = staged.samples[images]
            columns = {name: [row[name] for row in samples] for name in ENCODED_SCHEMA.names
                       if name not in token_columns and name != "n_tokens"}
            columns["n_tokens"] = [count * self.encoder.tokens_per_tile for count in staged.tile_counts[images]]
            tables.append(pa.Table.from_pydict({**columns, **token_columns}, schema=ENCODED_SCHEMA))
        return pa.concat_tables(tables)

    # ----------------------------------------------------------------------------------------- staging

    def _load_jpeg_decoder(self):
        if not gpu_decode_requested(self.cfg):
            return None
        decoder, why_not = load_nvjpeg(self.device)
        if decoder is None:
            log.warning("decode.device=%s: %s; decoding JPEGs on the CPU instead", self.cfg.decode.device, why_not)
        return decoder

    def _decode_jpegs(self, rows: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
        """Rows carrying JPEG bytes -> their tiles on the device, by ``id(row)``.

        What nvJPEG refuses (or every row, without nvJPEG) is decoded on the CPU into ``pixels`` instead, and
        a row the CPU cannot decode either becomes a quarantine row with the CPU decoder's reason.
        """
        sizes = [(row["width"], row["height"]) for row in rows]
        images = [None] * len(rows)
        if rows and self.jpeg_decoder is not None:
            images = decode_jpegs([row["image"] for row in rows], sizes, self.jpeg_decoder)
        on_device = [(row, image) for row, image in zip(rows, images) if image is not None]
        tiles: dict[int, torch.Tensor] = {}
        for (row, _), (row_tiles, grid) in zip(on_device, prepare_images([i for _, i in on_device], self.cfg.encoder)):
            row.update(n_tiles=len(row_tiles), grid_rows=grid[0], grid_cols=grid[1])
            tiles[id(row)] = row_tiles
        refused = [row for row, image in zip(rows, images) if image is None]
        if refused and self.jpeg_decoder is not None:
            log.info("nvJPEG refused %d of %d JPEGs; decoding them on the CPU", len(refused), len(rows))
        for row in refused:
            try:
                row.update(decode_on_cpu(row["image"], self.cfg))
            except DecodeError as exc:
                row.update(kind=QUARANTINE, reason=str(exc), samples=1)
        for row in rows:
            row["image"] = None
        return tiles

    def _gather_tiles(self, samples: list[dict[str, Any]], on_device: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """All samples' tiles in sample order, on the device: CPU-decoded ones uploaded in one pinned copy."""
        uploaded = self._upload([row for row in samples if id(row) not in on_device])
        if not on_device:
            return uploaded
        pieces, offset = [], 0
        for row in samples:
            if id(row) in on_device:
                pieces.append(on_device[id(row)])
            else:
                pieces.append(uploaded[offset : offset + row["n_tiles"]])
                offset += row["n_tiles"]
        return torch.cat(pieces)

    def _upload(self, rows: list[dict[str, Any]]) -> torch.Tensor | None:
        if not rows:
            return None
        size = self.cfg.encoder.image_size
        host = torch.empty((sum(row["n_tiles"] for row in rows), size, size, 3), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")
        flat, offset = host.numpy().reshape(-1), 0
        for row in rows:
            pixels = np.frombuffer(row.pop("pixels"), dtype=np.uint8)
            flat[offset : offset + pixels.size] = pixels
            offset += pixels.size
        return host.to(self.device, non_blocking=True)

    def _warm_up(self) -> None:
        """CUDA initialisation and ``encoder.compile``'s compilation, here, not in a batch (nvJPEG's start-up is
        paid when it is loaded)."""
        if not (self.cfg.encoder.compile or self.device.type == "cuda"):
            return
        started = time.perf_counter()
        size, batch = self.cfg.encoder.image_size, self.cfg.encoder.batch_size
        blank = torch.zeros(batch, size, size, 3, dtype=torch.uint8, device=self.device)
        with torch.inference_mode():
            features, attention = encode_tiles(self.encoder, blank, with_cls_attention=self.needs_cls_attention)
            tokens, mask = per_image(features, [1] * batch)
            self.selector.scores(tokens, mask, keys=[""] * batch, cls_attention=attention)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("encode stage warmed up in %.1f s (compile=%s)", time.perf_counter() - started,
                 self.cfg.encoder.compile)
