"""The cluster path end to end: `ray start --head`, `ray job submit --working-dir .`, output on S3 (moto).

The cluster is this test's own: its own temp dir, its own ports, its own process session, so teardown stops it
without touching other Ray clusters on the host (``ray stop`` would stop them all). As in production, the
storage credentials live in the cluster's environment, never in the submission.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from job_runs import (
    FAST_COMPRESS,
    REPO,
    duplicates,
    input_keys,
    job_env,
    loader_keys,
    manifest_keys,
    output_dir_under,
    stored_text,
)
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config import CorpusConfig
from pipeline.corpus import write_corpus
from pipeline.storage import filesystem_for

pytestmark = pytest.mark.slow

RAY_CLI = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300
# As infra/scripts/submit_local_cluster.sh uploads it; .gitignore'd paths are skipped as well.
UPLOAD_EXCLUDES = [".git", ".venv", "demo_output", "bench/results", "*.egg-info"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_range(size: int) -> tuple[int, int]:
    """A run of ports below the ephemeral range that are free now, away from Ray's default worker ports."""
    for _ in range(50):
        low = random.randrange(20000, 30000 - size)
        try:
            for port in range(low, low + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return low, low + size - 1
        except OSError:
            continue
    raise RuntimeError("no free worker port range")


def session_processes(session_id: int) -> list[int]:
    """Live (non-zombie) processes of one session: everything our `ray start` and its children spawned."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == session_id and state != "Z":
            pids.append(int(entry))
    return pids


def stop_session(process: subprocess.Popen, grace_s: float = 3) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(process.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    process.wait(timeout=grace_s)


@dataclass
class Cluster:
    dashboard: str
    temp_dir: Path
    env: dict[str, str]
    credentials: dict[str, str]


@pytest.fixture(scope="module")
def cluster(s3_server):
    tag = uuid.uuid4().hex.upper()
    credentials = {"AWS_ACCESS_KEY_ID": f"AKIAATRE2E{tag[:10]}", "AWS_SECRET_ACCESS_KEY": f"atr-e2e-secret-{tag}"}
    # Token auth would need a token shared by the cluster and the CLI; this private cluster listens on 127.0.0.1.
    env = job_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                  PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    temp_dir = Path(tempfile.mkdtemp(prefix="atr-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = free_ports(9)
    low, high = free_port_range(64)
    command = [
        RAY_CLI, "start", "--head", "--block", "--temp-dir", str(temp_dir), "--num-cpus", "2",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--metrics-export-port", str(metrics), "--min-worker-port", str(low), "--max-worker-port", str(high),
        "--disable-usage-stats",
    ]
    with open(temp_dir / "ray-start.log", "w") as log:
        process = subprocess.Popen(command, env={**env, **credentials}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, (temp_dir / "ray-start.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray dashboard did not come up"
                time.sleep(1)
        yield Cluster(address, temp_dir, env, credentials)
    finally:
        stop_session(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_job(client: JobSubmissionClient, submission_id: str) -> JobStatus:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (status := client.get_job_status(submission_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {JOB_TIMEOUT_S} s")
        time.sleep(2)
    return status


def test_compress_submitted_to_a_cluster_writes_every_sample_to_s3(cluster, tmp_path, s3_bucket, s3_options,
                                                                     s3_server):
    corpus = tmp_path / "corpus"
    write_corpus(CorpusConfig(output=str(corpus), n=8, shard_size=4, heldout_fraction=0.0, seed=2))
    expected = input_keys(str(corpus / "train"))
    output = f"s3://{s3_bucket}/tokens"
    submission_id = f"atr-e2e-{uuid.uuid4().hex[:8]}"

    submit = subprocess.run(
        [RAY_CLI, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id, "--no-wait",
         "--working-dir", ".", "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
         "--", sys.executable, "-m", "jobs.compress", f"input.path={corpus / 'train'}", f"output.path={output}",
         f"storage.endpoint_url={s3_server}", "executor=ray", *FAST_COMPRESS],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]

    client = JobSubmissionClient(cluster.dashboard)
    status = wait_for_job(client, submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    assert '"status": "ok"' in logs.strip().splitlines()[-1]

    output_dir = output_dir_under(output, s3_options)
    stored = manifest_keys(output_dir, s3_options)
    assert duplicates(stored) == {}
    assert sorted(stored) == expected and len(expected) == 8
    assert sorted(loader_keys(output_dir, s3_options)) == expected

    fs, root = filesystem_for(output_dir, s3_options)
    texts = {"submit": submit.stdout + submit.stderr, "job logs": logs}
    texts |= {path: stored_text(fs, path) for path in fs.find(root)}
    texts |= {str(p): p.read_bytes().decode("utf-8", "replace") for p in cluster.temp_dir.rglob("*") if p.is_file()}
    for value in cluster.credentials.values():
        leaks = [where for where, text in texts.items() if value in text]
        assert leaks == [], f"credential found in {leaks}"
