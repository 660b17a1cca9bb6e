"""A loopback HTTP proxy in front of the moto S3 server that injects the faults real object stores produce.

Point ``storage.endpoint_url`` at :attr:`FaultProxy.url`. Each request is classified by kind (``PUT``, ``GET``,
``HEAD``, ``LIST``, ``DELETE``, ``POST``) and, with a seeded per-kind rate, gets one fault:

- ``slowdown``: a 503 SlowDown answered by the proxy, nothing forwarded;
- ``error500``: a 500 InternalError answered by the proxy, nothing forwarded;
- ``reset_before``: the connection is reset before the request is forwarded;
- ``reset_after``: the request is forwarded (moto applies it), then the connection is reset instead of
  answering: the lost response;
- ``short_read``: the response is forwarded with its Content-Length but only half its body, then closed;
- ``truncate``: a GET answered with half the object and a Content-Length to match: a store that returns
  fewer bytes than it listed, which no HTTP client can notice.

``latency_s`` delays every request (the benchmark's stand-in for a region away); ``counts`` tallies the
requests by kind, forwarded or not.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

FAULTS = ("slowdown", "error500", "reset_before", "reset_after", "short_read", "truncate")
KINDS = ("PUT", "GET", "HEAD", "LIST", "DELETE", "POST")
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
               '<RequestId>fault-proxy</RequestId></Error>')


def request_kind(method: str, target: str) -> str:
    query = urlsplit(target).query
    if method == "GET" and ("list-type" in query or urlsplit(target).path.count("/") <= 1):
        return "LIST"
    return method


class FaultProxy:
    """``rates``: {kind: {fault: probability}}; kinds missing from it are never faulted."""

    def __init__(self, upstream: str, rates: dict[str, dict[str, float]] | None = None, seed: int = 0,
                 latency_s: float = 0.0) -> None:
        upstream_parts = urlsplit(upstream)
        self.upstream = (upstream_parts.hostname, upstream_parts.port)
        self.rates = rates or {}
        self.latency_s = latency_s
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.injected: Counter = Counter()
        self.scripted: list[tuple[str, str, str]] = []  # (kind, path substring, fault), each used once
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_rates(self, rates: dict[str, dict[str, float]]) -> None:
        with self.lock:
            self.rates = rates

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()
            self.injected.clear()

    def fail_next(self, kind: str, fault: str, path_contains: str = "") -> None:
        """Inject ``fault`` into the next request of ``kind`` whose path contains ``path_contains``."""
        assert fault in FAULTS, fault
        with self.lock:
            self.scripted.append((kind, path_contains, fault))

    def draw(self, kind: str, path: str = "") -> str | None:
        with self.lock:
            self.counts[kind] += 1
            for index, (scripted_kind, part, fault) in enumerate(self.scripted):
                if scripted_kind == kind and part in path:
                    del self.scripted[index]
                    self.injected[(kind, fault)] += 1
                    return fault
            roll = self.random.random()
            for fault, rate in self.rates.get(kind, {}).items():
                assert fault in FAULTS, fault
                if roll < rate:
                    self.injected[(kind, fault)] += 1
                    return fault
                roll -= rate
        return None


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reset(self) -> None:
        """Close with RST: the client sees 'connection reset', not a clean end."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.close()
        except OSError:
            pass

    def _answer_error(self, status: int, code: str, message: str) -> None:
        body = _ERROR_BODY.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        owner = self.owner
        body = self._body()
        if owner.latency_s:
            time.sleep(owner.latency_s)
        fault = owner.draw(request_kind(self.command, self.path), self.path)
        if fault == "slowdown":
            return self._answer_error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "error500":
            return self._answer_error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "reset_before":
            return self._reset()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            status, reason, response_headers = response.status, response.reason, response.getheaders()
        finally:
            upstream.close()
        if fault == "reset_after":
            return self._reset()
        self.send_response(status, reason)
        for name, value in response_headers:
            if name.lower() in ("transfer-encoding", "connection", "content-length", "server", "date"):
                continue
            if fault == "truncate" and name.lower().startswith("x-amz-checksum"):
                continue  # a store without checksums (many S3-compatible ones): only the length can tell
            self.send_header(name, value)
        if fault == "truncate" and self.command == "GET":
            data = data[: len(data) // 2]
        length = response.getheader("Content-Length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "short_read" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy
