"""The fault table: every scenario of test_object_store_faults, several seeds each, both executors.

    .venv/bin/python tests/fault_trials.py [--trials 5] [--executors local,ray]

Prints one row per (scenario, executor): trials, faults injected, lost, duplicated, exit codes of the faulted
run and of the rerun. Not part of the suite (minutes); the tests run one seed of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import FAKE_AWS_ENV, _free_port
from test_object_store_faults import SCENARIOS, run_scenario

from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--scenarios", default=",".join(sorted(SCENARIOS)))
    args = parser.parse_args()
    os.environ.update(FAKE_AWS_ENV)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    options = {"client_kwargs": {"endpoint_url": endpoint}, "anon": False}
    root = Path(tempfile.mkdtemp())
    write_corpus(CorpusConfig(output=str(root), n=9, shard_size=3, heldout_fraction=0.0, seed=11, image_size=64))
    if "ray" in args.executors:
        import ray
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    print("lost and duplicated: over both runs of each trial; 'assert': an audit failed")
    print("| scenario | executor | trials | faults injected | lost | duplicated | exit codes | rerun exit codes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.scenarios.split(","):
        for executor in args.executors.split(","):
            rows = []
            for seed in range(args.trials):
                bucket = f"trial-{uuid.uuid4().hex[:10]}"
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
                try:
                    rows.append(run_scenario(name, executor, root / "train", bucket, endpoint, options, seed))
                except AssertionError as exc:
                    if "no fault was injected" in str(exc):
                        continue  # this seed drew no fault: not a trial of anything
                    print(f"FAILED {name} {executor} seed {seed}: {str(exc)[:300]}", file=sys.stderr, flush=True)
                    rows.append({"exit": "assert", "rerun_exit": "-", "injected": 0, "failed": True})
            exits, reruns = Counter(str(r["exit"]) for r in rows), Counter(str(r["rerun_exit"]) for r in rows)
            lost = sum(r.get("lost", 0) + r.get("rerun_lost", 0) for r in rows)
            print(f"| {name} | {executor} | {len(rows)} | {sum(r['injected'] for r in rows)} | {lost} | "
                  f"{sum(r.get('duplicated', 0) + r.get('rerun_duplicated', 0) for r in rows)} | "
                  f"{', '.join(f'{k}×{v}' for k, v in sorted(exits.items()))} | "
                  f"{', '.join(f'{k}×{v}' for k, v in sorted(reruns.items()))} |", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
