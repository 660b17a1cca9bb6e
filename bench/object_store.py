"""Object-store cost of a run at scale: requests and wall time of planning and the manifest update.

``python -m bench.object_store [--shards 1000,10000] [--latency-ms 20]``

For each size N: a moto S3 server (in this process) behind the loopback proxy of ``tests/fault_proxy.py``
with ``latency-ms`` added to every request; N input shards and N committed markers fabricated straight into
moto's backend (as a previous run would have left them, with its manifest, marker index and key index), plus one new
input shard. Then, through the proxy: ``--dry-run``; a nightly run that compresses the one new shard
(planning + the manifest update timed apart from the encoding); and a dry run with the marker index gone
(the first run after an upgrade, or after ``jobs.gc repair=true``'s full read). Requests are counted by kind
at the proxy; the growth is a least-squares line through the sizes (seconds per 1,000 shards).

moto walks and sorts the whole bucket for every ListObjectsV2 page, which S3 does not; by default the benchmark
answers listings from a sorted index instead (``bench.moto_listing``: same pages, tested against moto's own), so
the wall time is the client's CPU plus the injected latency. ``--moto-listing moto`` keeps moto's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3

from bench import moto_listing
from bench.common import machine, markdown_table, report
from pipeline.compress import plan as plan_module
from pipeline.compress.run import run_compress
from pipeline.config import CompressConfig, CorpusConfig, load_config
from pipeline.corpus import write_corpus
from pipeline.output.commit import (
    COMMITTED_DIR,
    CommittedShard,
    IndexedMarker,
    WrittenFile,
    marker_name,
    write_marker_index,
)
from pipeline.output.manifest import key_hashes, write_key_index, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fault_proxy import FaultProxy

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "NO_PROXY": "127.0.0.1,localhost"}


LISTING_NOTE = {
    "indexed": ("ListObjectsV2 pages answered from a sorted index (bench.moto_listing, same pages as moto's "
                "own), as S3 answers them; moto runs in a process of its own, as S3 is another machine."),
    "moto": ("moto (Python, in a process of its own) sorts the whole bucket for every ListObjectsV2 page, "
             "so at 100k+ keys a page costs it seconds of CPU that S3 does not; the request counts, times the "
             "latency, are the figure that carries over to a real store."),
}


def _config(endpoint: str, bucket: str, *overrides: str) -> CompressConfig:
    return load_config(CompressConfig, None, [
        f"input.path=s3://{bucket}/in/*.tar", f"output.path=s3://{bucket}/out", f"storage.endpoint_url={endpoint}",
        "executor=local", "selector.method=norm", "selector.mode=ratio", "selector.ratio=0.5",
        "encoder.batch_size=4", "progress_interval_s=60", *overrides])


class MotoProcess:
    """moto in a process of its own (``bench.moto_listing.serve``), fed fabricated objects straight into its
    backend."""

    def __init__(self, indexed: bool) -> None:
        from conftest import _free_port  # tests/conftest.py
        context = multiprocessing.get_context("spawn")
        self.port = _free_port()
        self.commands, self.replies = context.Queue(), context.Queue()
        self.process = context.Process(target=moto_listing.serve, daemon=True,
                                       args=(self.port, indexed, FAKE_AWS_ENV, self.commands, self.replies))
        self.process.start()
        assert self.replies.get(timeout=120) == "ready"
        self.url = f"http://127.0.0.1:{self.port}"

    def put(self, bucket: str, objects: list[tuple[str, bytes]], chunk: int = 10_000) -> None:
        for start in range(0, len(objects), chunk):
            self.commands.put(("put", bucket, objects[start:start + chunk]))
            self.replies.get(timeout=600)

    def stop(self) -> None:
        self.commands.put(("stop",))
        self.process.join(timeout=60)


def fabricate(moto: MotoProcess, bucket: str, output_dir_key: str, n: int) -> dict[str, IndexedMarker]:
    """N input shards with their markers, as a previous run left them (its manifest and indexes are written after)."""
    objects, markers = [], {}
    for i in range(n):
        shard_id = f"shard-{i:06d}"
        body = f"input {i}".encode()
        fingerprint = hashlib.md5(body).hexdigest()  # moto's ETag of a single-part object
        objects.append((f"in/{shard_id}.tar", body))
        shard = CommittedShard(
            shard_id=shard_id, source_url=f"s3://{bucket}/in/{shard_id}.tar", source_fingerprint=fingerprint,
            attempt="fabricated", rows=10, tokens_full=640, tokens_kept=320, kept_histogram={"32": 10},
            committed_at=1.0 + i,
            files=[WrittenFile(path=f"data/{shard_id}.fabricated.parquet", rows=10, bytes=1000, sha256="0" * 64)])
        payload = json.dumps(dataclasses.asdict(shard), sort_keys=True, indent=1).encode()
        name = marker_name(shard_id, fingerprint)
        objects.append((f"{output_dir_key}/{COMMITTED_DIR}/{name}", payload))
        markers[name] = IndexedMarker(shard, hashlib.md5(payload).hexdigest(), payload)
    moto.put(bucket, objects)
    return markers


def measure(proxy: FaultProxy, action) -> tuple[float, dict[str, int], Any]:
    proxy.reset_counts()
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, dict(proxy.counts), result


def one_size(n: int, latency_s: float, new_tar: bytes, full_read_max: int, indexed: bool) -> dict[str, Any]:
    moto = MotoProcess(indexed)
    upstream = moto.url
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=upstream)
    s3.create_bucket(Bucket=bucket)
    options = {"client_kwargs": {"endpoint_url": upstream}, "anon": False}
    try:
        with FaultProxy(upstream, latency_s=latency_s) as proxy:
            # The output prefix (cfg_hash) of this config, from a dry run on a bucket with the new shard only.
            moto.put(bucket, [("in/zz-new.tar", new_tar)])
            output_dir = run_compress(_config(upstream, bucket, "dry_run=true"))["output"]
            markers = fabricate(moto, bucket, output_dir.split("/", 3)[3], n)
            shards = [m.shard for m in markers.values()]
            write_manifest(output_dir, shards, options)
            write_marker_index(output_dir, markers, options)
            write_key_index(output_dir, shards, [key_hashes([f"{s.shard_id}/{j}" for j in range(s.rows)])
                                                 for s in shards], options)

            row: dict[str, Any] = {"shards": n}
            wall, counts, dry = measure(proxy, lambda: run_compress(_config(proxy.url, bucket, "dry_run=true")))
            assert dry["todo"] == ["zz-new"], dry["todo"][:5]
            row["dry_run"] = {"wall_s": round(wall, 2), "requests": counts}

            phases: dict[str, float] = {}
            real_plan = plan_module.plan_compress

            def timed_plan(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return real_plan(*args, **kwargs)
                finally:
                    phases["plan_s"] = time.perf_counter() - started

            import pipeline.compress.run as run_module
            run_module.plan_compress = timed_plan
            try:
                wall, counts, summary = measure(proxy, lambda: run_compress(_config(proxy.url, bucket)))
            finally:
                run_module.plan_compress = real_plan
            assert summary["shards_processed"] == 1 and summary["shards_skipped"] == n, summary
            row["nightly"] = {"wall_s": round(wall, 2), "plan_s": round(phases["plan_s"], 2), "requests": counts}

            proxy.reset_counts()
            started = time.perf_counter()
            from pipeline.output.commit import by_source, load_markers
            from pipeline.output.manifest import current_shards
            loaded = load_markers(output_dir, {"client_kwargs": {"endpoint_url": proxy.url}, "anon": False})
            write_manifest(output_dir, current_shards(by_source(loaded), {}),
                           {"client_kwargs": {"endpoint_url": proxy.url}, "anon": False})
            row["manifest_update"] = {"wall_s": round(time.perf_counter() - started, 2),
                                      "requests": dict(proxy.counts)}

            if n <= full_read_max:
                s3.delete_object(Bucket=bucket, Key=f"{output_dir.split('/', 3)[3]}/_committed_index.parquet")
                wall, counts, _ = measure(proxy, lambda: run_compress(_config(proxy.url, bucket, "dry_run=true")))
                row["dry_run_no_index"] = {"wall_s": round(wall, 2), "requests": counts}
            return row
    finally:
        moto.stop()


def slope_per_1000(xs: list[int], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def requests_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {counts[kind]}" for kind in sorted(counts)) + f" (total {sum(counts.values())})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="1000,10000")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--full-read-max", type=int, default=10000,
                        help="largest size at which the no-index dry run (every marker read) is measured")
    parser.add_argument("--moto-listing", choices=("indexed", "moto"), default="indexed",
                        help="answer ListObjectsV2 from a sorted index (as S3 does) or with moto's full sort per page")
    args = parser.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(CorpusConfig(output=tmp, n=3, shard_size=3, heldout_fraction=0.0, seed=1, image_size=64))
        new_tar = next(Path(tmp, "train").glob("*.tar")).read_bytes()
    rows = [one_size(int(n), args.latency_ms / 1000, new_tar, args.full_read_max, args.moto_listing == "indexed")
            for n in args.shards.split(",")]
    table = markdown_table(
        ["shards", "run", "wall s", "of which planning s", "requests"],
        [[r["shards"], name, r[key]["wall_s"], r[key].get("plan_s", ""), requests_text(r[key]["requests"])]
         for r in rows for key, name in (("dry_run", "--dry-run"), ("nightly", "one new shard"),
                                         ("manifest_update", "manifest update alone"),
                                         ("dry_run_no_index", "--dry-run, no marker index (full read)"))
         if key in r])
    fits = {}
    for key in ("dry_run", "nightly", "manifest_update", "dry_run_no_index"):
        measured = [r for r in rows if key in r]
        fits[key] = round(slope_per_1000([r["shards"] for r in measured], [r[key]["wall_s"] for r in measured]), 3)
    body = (f"{args.latency_ms:g} ms added to every request by the loopback proxy in front of moto; markers, "
            "inputs, manifest and marker index fabricated as a previous run leaves them. Shared 2-core host "
            f"(other jobs running; load average {os.getloadavg()[0]:.1f} at the end). "
            + LISTING_NOTE[args.moto_listing] + "\n\n"
            f"{table}\n\nGrowth (least squares over the sizes, seconds per 1,000 shards): "
            + ", ".join(f"{k} {v}" for k, v in fits.items()) + ".\n")
    report("object_store", "Object store at scale (bench.object_store)", body, {"rows": rows, "fits": fits}, info)


if __name__ == "__main__":
    main()
