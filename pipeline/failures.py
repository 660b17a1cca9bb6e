"""Storage, network and model-hub failures as one line that names the URL and the likely fix.

The job runner asks :func:`describe_failure` about any exception a job raised; it walks the exception's chain
(``__cause__`` / ``__context__``) for the errors botocore, aiohttp, fsspec / s3fs and huggingface_hub raise, and
answers ``(exit code, message)`` or None for an error it does not know (a bug: the runner prints its traceback).
Types are matched by name, so nothing here imports botocore, aiohttp or huggingface_hub.

Messages never quote credentials: URLs lose any ``user:password@`` part, and no request or header is quoted.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

HUB_URL = "https://huggingface.co"
CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run with an instance "
                   "profile / IRSA / EKS Pod Identity; storage.anon=true reads a public bucket")


def redact(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://host``."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1", text)


def chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _find(exc: BaseException, *names: str) -> BaseException | None:
    return next((e for e in chain(exc) if _names(e) & set(names)), None)


def remote_urls(config: dict[str, Any]) -> list[str]:
    """Every ``scheme://`` value in a job's config (its inputs, outputs and checkpoints), in key order."""
    found: list[str] = []

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else name)
        elif isinstance(node, str) and "://" in node and not key.endswith("endpoint_url"):
            found.append(f"{key}={redact(node)}")

    walk(config, "")
    return found


def _where(exc: BaseException, config: dict[str, Any]) -> str:
    for e in chain(exc):
        filename = getattr(e, "filename", None)
        if isinstance(filename, str) and filename:
            return redact(filename if "://" in filename or filename.startswith("/") else f"s3://{filename}")
    urls = remote_urls(config)
    return ", ".join(urls) if urls else "the job's storage"


def _path_of(exc: BaseException, config: dict[str, Any]) -> str:
    """The file an OSError names, else its own first line (a local error names no config URL)."""
    filename = getattr(exc, "filename", None)
    if isinstance(filename, str) and filename:
        return _where(exc, config)
    first = (str(exc).strip().splitlines() or [""])[0]
    return redact(first) if first else _where(exc, config)


def _endpoint(exc: BaseException, config: dict[str, Any]) -> str:
    for e in chain(exc):
        url = (getattr(e, "kwargs", None) or {}).get("endpoint_url")
        if isinstance(url, str):
            parts = urlsplit(url)
            return redact(f"{parts.scheme}://{parts.netloc}")
        host, port = getattr(e, "host", None), getattr(e, "port", None)
        if isinstance(host, str) and port:
            return f"{host}:{port}"
    endpoint = (config.get("storage") or {}).get("endpoint_url")
    return redact(endpoint) if endpoint else "the S3 endpoint"


def _client_error_code(exc: BaseException) -> str | None:
    for e in chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str((response.get("Error") or {}).get("Code") or "") or None
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or HUB_URL


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout_s`` (assumed so behind a proxy, which a direct
    connection cannot judge). Checked before a download so a host without network fails in seconds, not after
    huggingface_hub's five retries (23 s)."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parts = urlsplit(hub_endpoint())
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hub_cache() -> str:
    """The cache folder huggingface_hub uses (fixed when it was imported), else the one the environment names."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def hub_failure(exc: BaseException, model: str, local_files_only: bool = False,
                reachable: bool = True) -> str | None:
    """One line for a ``from_pretrained(model)`` that failed for want of the hub, else None."""
    offline = local_files_only or hub_offline() or not reachable
    if _find(exc, "GatedRepoError"):
        return (f"{model}: the model is gated on {HUB_URL}; accept its terms there and set HF_TOKEN, or use a "
                "local copy (encoder.pretrained=/path/to/model)")
    if _find(exc, "RepositoryNotFoundError"):
        return (f"{model}: no such model on {HUB_URL} (or it is private): check the id, set HF_TOKEN for a "
                "private one, or give a local folder")
    cache = _hub_cache()
    if _find(exc, "LocalEntryNotFoundError", "OfflineModeIsEnabled") or offline:
        why = ("local_files_only=true" if local_files_only else "HF_HUB_OFFLINE is set" if hub_offline()
               else f"{hub_endpoint()} is unreachable")
        return (f"{model}: not in the Hugging Face cache {cache} and downloads are off ({why}); download it once "
                "with network access (or point HF_HOME at a cache that has it), or set encoder.pretrained=null "
                "for a random init")
    if _find(exc, "ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "HfHubHTTPError") or \
            "couldn't connect" in str(exc):
        return (f"{model}: cannot reach {HUB_URL}: check the network or proxy (HTTPS_PROXY, HF_ENDPOINT), or "
                f"run offline (HF_HUB_OFFLINE=1) with a cached copy in {cache}")
    return None


def describe_failure(exc: BaseException, config: dict[str, Any]) -> tuple[int, str] | None:
    """``(exit code, one line)`` for a storage, network or hub failure; None for anything else."""
    if _find(exc, "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return 1, f"no S3 credentials for {_where(exc, config)}: {CREDENTIALS_FIX}"
    code = _client_error_code(exc)
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return 1, f"the S3 credentials were refused ({code}) for {_where(exc, config)}: {CREDENTIALS_FIX}"
    if _find(exc, "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
             "ServerTimeoutError", "gaierror"):
        return 1, (f"cannot reach {_endpoint(exc, config)} for {_where(exc, config)}: check storage.endpoint_url, "
                   "the network and proxy settings (HTTPS_PROXY, NO_PROXY)")
    if _find(exc, "GatedRepoError", "RepositoryNotFoundError", "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        model = (config.get("encoder") or {}).get("pretrained") or config.get("model") or "the model"
        return 1, hub_failure(exc, str(model))
    if code == "NoSuchBucket" or "bucket does not exist" in str(exc).lower():
        return 1, f"{_where(exc, config)}: the bucket does not exist; check the URL (and storage.endpoint_url)"
    denied = _find(exc, "PermissionError")
    if denied is not None or code in ("AccessDenied", "403"):
        return 1, (f"access denied to {_path_of(denied or exc, config)}: the credentials' policy must allow "
                   "reading the input and writing the output (s3:ListBucket, s3:GetObject, s3:PutObject)")
    missing = _find(exc, "FileNotFoundError")
    if missing is not None:
        return 1, f"{_path_of(missing, config)} does not exist: check the path"
    if "Cannot traverse all of" in str(exc):
        return 2, f"{_where(exc, config)}: a bare scheme names no bucket; give s3://BUCKET/PREFIX"
    return None
