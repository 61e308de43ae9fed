"""Helpers shared by the registry pull-through integration tests (pull and faults)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest

from tests.support.daemon import MirrorDaemon
from tests.support.faultproxy import FaultProxy
from tests.support.models import (
    MANIFEST_V2,
    Blob,
    KiB,
    MiB,
    PushedModel,
    Response,
    http_request,
)
from tests.support.puller import PullResult, pull

# --- shared helpers ------------------------------------------------------------------------------

CHUNK = 256 * KiB  # the mirror's upstream chunk size in these tests
CONNECTIONS = 4  # upstream.connections_per_blob (the default)
UPSTREAM_HOST = "registry.ollama.ai"  # upstream.host default: the cache's manifests/<host>/ directory
CLIENT_TIMEOUT = 30.0
on_every_s3_store = pytest.mark.parametrize("s3_store", ["seaweedfs", "moto"], indirect=True)
"""Run the test once on each S3 implementation of the test bed (the ``s3_store`` fixture)."""

UPSTREAM_SETTINGS: dict[str, Any] = {
    "chunk_size": "256KiB",
    "connections_per_blob": CONNECTIONS,
    "retry_attempts": 3,
    "retry_delay": 0.1,
    "idle_timeout": 5,
    "timeout": 5,
}


class MirrorStarter(Protocol):
    """The ``start_mirror`` fixture: a daemon whose upstream is the test's FaultProxy."""

    def __call__(
        self, upstream: Mapping[str, Any] | None = None, cache: Mapping[str, Any] | None = None
    ) -> MirrorDaemon: ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while piece := fh.read(MiB):
            sha.update(piece)
    return sha.hexdigest()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def blob_url(mirror: MirrorDaemon, model: PushedModel, blob: Blob) -> str:
    return f"{mirror.url}/v2/{model.repo}/blobs/{blob.digest}"


def manifest_url(mirror: MirrorDaemon, model: PushedModel, reference: str | None = None) -> str:
    return f"{mirror.url}/v2/{model.repo}/manifests/{reference or model.tag}"


def cached_blob(mirror: MirrorDaemon, blob: Blob) -> Path:
    return mirror.cache_dir / "blobs" / blob.cache_name


def partial_files(mirror: MirrorDaemon, blob: Blob) -> tuple[Path, Path]:
    """The partial download and its state record (finished chunk indices)."""
    partial = mirror.cache_dir / ".mirror" / "partial"
    return partial / f"{blob.cache_name}.part", partial / f"{blob.cache_name}.json"


def wait_cached(mirror: MirrorDaemon, blob: Blob, timeout: float = 15.0) -> Path:
    """Wait until the blob is published in ``blobs/``, then check its size and sha256."""
    path = cached_blob(mirror, blob)
    wait_until(path.exists, timeout, f"{blob.digest} in blobs/")
    assert path.stat().st_size == blob.size
    assert sha256_file(path) == blob.hex
    return path


def get_manifest(mirror: MirrorDaemon, model: PushedModel, method: str = "GET") -> Response:
    return http_request(method, manifest_url(mirror, model), headers={"Accept": MANIFEST_V2})


def registry_error_code(response: Response) -> str:
    """The first ``errors[].code`` of a registry JSON error body (fails the test if it is not one)."""
    assert response.header("content-type").startswith("application/json"), response.headers
    document = json.loads(response.body)
    assert isinstance(document.get("errors"), list) and document["errors"], document
    code = document["errors"][0]["code"]
    assert isinstance(code, str) and document["errors"][0].get("message")
    return code


@dataclass
class Fetched:
    """A response read as far as it went: ``error`` says why it stopped early, if it did."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None
    elapsed: float = 0.0

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    @property
    def clean(self) -> bool:
        """The whole body arrived as framed (Content-Length bytes) with no error."""
        return self.error is None and self.status is not None


def fetch(url: str, headers: Mapping[str, str] | None = None, timeout: float = CLIENT_TIMEOUT) -> Fetched:
    """GET that never raises on a broken response: an aborted or short body is reported in ``error``."""
    parsed = urlsplit(url)
    assert parsed.hostname is not None
    started = time.monotonic()
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    status: int | None = None
    response_headers: dict[str, str] = {}
    pieces: list[bytes] = []
    error: str | None = None
    try:
        target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        conn.request("GET", target, headers=dict(headers or {}))
        response = conn.getresponse()
        status = response.status
        response_headers = {k.lower(): v for k, v in response.getheaders()}
        while piece := response.read(MiB):
            pieces.append(piece)
    except http.client.IncompleteRead as exc:
        pieces.append(exc.partial)
        error = f"IncompleteRead: {exc!r}"
    except (OSError, http.client.HTTPException) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    body = b"".join(pieces)
    length = response_headers.get("content-length", "")
    if error is None and length.isdigit() and len(body) < int(length):
        # http.client's read(amt) ends quietly at EOF even when Content-Length was not reached.
        error = f"short body: {len(body)} of {length} bytes"
    return Fetched(status, response_headers, body, error, time.monotonic() - started)


def fetch_blob(mirror: MirrorDaemon, model: PushedModel, blob: Blob, rng: str | None = None) -> Fetched:
    return fetch(blob_url(mirror, model, blob), {"Range": rng} if rng else None)


def assert_blob_served(got: Fetched, blob: Blob) -> None:
    assert got.clean, got.error
    assert got.status == 200
    assert got.header("content-length") == str(blob.size)
    assert len(got.body) == blob.size
    assert sha256_hex(got.body) == blob.hex


def pull_into_cache(mirror: MirrorDaemon, model: PushedModel) -> None:
    """Fetch a model's manifest and every blob through the mirror and wait until all are cached."""
    assert get_manifest(mirror, model).status == 200
    for blob in model.blobs:
        assert_blob_served(fetch_blob(mirror, model, blob), blob)
    for blob in model.blobs:
        wait_cached(mirror, blob)


def go_pull(mirror: MirrorDaemon, model: PushedModel, dest: Path) -> PullResult:
    """The Go server's pull, with parts small enough that a few-MiB blob is split into 16 of them."""
    return pull(
        mirror.url,
        model.repo,
        model.tag,
        dest,
        part_size_min=16 * KiB,
        part_size_max=MiB,
        stall_timeout=10.0,
        request_timeout=CLIENT_TIMEOUT,
        timeout=60.0,
    )


def assert_valid_models_dir(cache_dir: Path) -> None:
    """The cache is a models directory Ollama can run every model of: each manifest under ``manifests/``
    lists only blobs that are in ``blobs/`` at their full size (whatever fault came before)."""
    for manifest in (cache_dir / "manifests").rglob("*"):
        if not manifest.is_file() or manifest.name.startswith("."):
            continue
        document = json.loads(manifest.read_bytes())
        for entry in [document["config"], *document["layers"]]:
            blob = cache_dir / "blobs" / entry["digest"].replace(":", "-")
            assert blob.exists(), f"{manifest.relative_to(cache_dir)} lists {entry['digest']}, not in blobs/"
            assert blob.stat().st_size == entry["size"], f"{blob.name} is not whole"


def blob_records_bytes(proxy: FaultProxy, blob: Blob) -> int:
    """Body bytes the upstream (through the proxy) sent for one blob, redirected fetches included."""
    return proxy.bytes_for(blob.hex)


class RawClient:
    """A plain socket GET, for clients that read slowly or hang up mid-body."""

    def __init__(self, mirror: MirrorDaemon, path: str, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(("127.0.0.1", mirror.port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
        self.received = bytearray()

    def recv(self, n: int) -> int:
        data = self.sock.recv(n)
        self.received += data
        return len(data)

    def body_bytes(self) -> int:
        end = self.received.find(b"\r\n\r\n")
        return 0 if end < 0 else len(self.received) - end - 4

    def status_line(self) -> str:
        return bytes(self.received.split(b"\r\n", 1)[0]).decode("latin-1")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- fixtures ------------------------------------------------------------------------------------
