"""Shared fixtures: one moto S3 server per session on 127.0.0.1, a fresh bucket per test.

``s3_server`` is the endpoint URL, ``s3_bucket`` a new empty bucket's name, ``s3_options`` the fsspec
storage options that reach it (pass them wherever a job takes ``storage_options``).
"""

from __future__ import annotations

import os
import socket
import uuid

import boto3
import pytest
import ray
import torch
from moto.server import ThreadedMotoServer

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "atr-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "atr-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's real profile, config and session token out of the tests.
    "AWS_CONFIG_FILE": "/nonexistent/atr-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/atr-test-aws-credentials",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_AWS_ENV.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        for name in ("NO_PROXY", "no_proxy"):
            env.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"])))
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_options(s3_server):
    return {"client_kwargs": {"endpoint_url": s3_server}, "anon": False}


@pytest.fixture
def s3_bucket(s3_server):
    name = f"atr-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def one_thread():
    """Tiny tensors on a busy 2-core host: syncing two threads per op costs far more than the maths.

    It is also what the training job's workers use (train.cpus_per_worker=1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ray_cluster():
    """A private in-process Ray cluster for the module's tests (never a cluster another process on this host started)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
