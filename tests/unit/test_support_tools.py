"""Tests of the test-support tools: the Go-style puller and the fault proxy.

Both run against a tiny stdlib registry on 127.0.0.1 that implements the mirror-side contract (manifest,
HEAD with Content-Length, discovery GET answered 200 + Location, 206 ranges), with switches to misbehave.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.puller import (
    GO_USER_AGENT,
    MANIFEST_ACCEPT,
    NO_LOCATION,
    PullError,
    compute_parts,
    pull,
    pull_blob_ranged,
)

REPO = "library/tiny"
TAG = "latest"
PART = 64 * 1024
UA = "ollama/0.33.0 (amd64 linux) Go/go1.24.0"

_rng = random.Random(20240611)
MODEL = _rng.randbytes(1_000_003)  # 16 parts of 64 KiB (the last one shorter)
CONFIG = json.dumps({"model_format": "gguf", "model_family": "llama", "model_type": "1M"}).encode()
CHUNKED_BODY = _rng.randbytes(200_000)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MODEL_DIGEST = _digest(MODEL)
CONFIG_DIGEST = _digest(CONFIG)
BLOBS = {MODEL_DIGEST: MODEL, CONFIG_DIGEST: CONFIG}
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": MANIFEST_ACCEPT,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": CONFIG_DIGEST,
            "size": len(CONFIG),
        },
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": MODEL_DIGEST, "size": len(MODEL)}
        ],
    },
    separators=(",", ":"),
).encode()
MODEL_PATH = f"/v2/{REPO}/blobs/{MODEL_DIGEST}"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Registry:
    """State of the tiny registry; ``mode`` switches its discovery/range behaviour."""

    url: str = ""
    port: int = 0
    mode: str = "location"  # location | nolocation | ignore_range | nolength | redirect301
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, method: str | None = None, path: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if (method is None or s.method == method) and path in s.path]


class _RegistryServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    registry: Registry

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _RegistryHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10.0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def registry(self) -> Registry:
        return cast(_RegistryServer, self.server).registry

    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, *, length: bool = True
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            for i in range(0, len(body), 16384):
                self.wfile.write(body[i : i + 16384])
        except OSError:
            self.close_connection = True

    def _record(self) -> None:
        with self.registry.lock:
            self.registry.seen.append(
                Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            )

    def do_POST(self) -> None:
        self._record()
        h = hashlib.sha256()
        n = 0
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                h.update(data)
                n += len(data)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 65536))
                h.update(data)
                n += len(data)
                remaining -= len(data)
        self._send(
            200,
            json.dumps({"length": n, "sha256": h.hexdigest()}).encode(),
            {"Content-Type": "application/json"},
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._record()
        reg = self.registry
        path = urlsplit(self.path).path
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(CHUNKED_BODY), 50_000):
                piece = CHUNKED_BODY[i : i + 50_000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == f"/v2/{REPO}/manifests/{TAG}":
            self._send(200, MANIFEST, {"Content-Type": MANIFEST_ACCEPT})
            return
        prefix = f"/v2/{REPO}/blobs/"
        blob = BLOBS.get(path.removeprefix(prefix)) if path.startswith(prefix) else None
        if blob is None:
            self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', {"Content-Type": "application/json"})
            return
        if self.command == "HEAD":
            self._send(200, blob, length=reg.mode != "nolength")
            return
        rng = self.headers.get("Range")
        if rng is None:  # the discovery GET
            if reg.mode == "redirect301":
                self._send(301, b"", {"Location": f"http://localhost:{reg.port}{path}"})
            elif reg.mode == "nolocation":
                self._send(200, blob)
            else:
                self._send(200, blob, {"Location": path})  # relative self URL
            return
        if reg.mode == "ignore_range":
            self._send(200, blob)
            return
        first, _, last = rng.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) if last else len(blob) - 1, len(blob) - 1)
        self._send(206, blob[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(blob)}"})


@pytest.fixture
def registry() -> Iterator[Registry]:
    server = _RegistryServer(("127.0.0.1", 0), _RegistryHandler)
    reg = Registry()
    reg.port = server.server_address[1]
    reg.url = f"http://127.0.0.1:{reg.port}"
    server.registry = reg
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield reg
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as p:
        yield p


def _get(
    url_base: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    parts = urlsplit(url_base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------------
# puller


def test_compute_parts_matches_go() -> None:
    assert compute_parts(0, 100, 1000) == []
    assert compute_parts(50, 100, 1000) == [(0, 50)]
    parts = compute_parts(len(MODEL), PART, 4 * PART)
    assert len(parts) == 16 and parts[-1] == (15 * PART, len(MODEL) - 15 * PART)
    go = compute_parts(2_019_377_376, 100_000_000, 1_000_000_000)
    assert len(go) == 16 and {size for _, size in go} == {2_019_377_376 // 16}
    assert [size for _, size in compute_parts(450_000_000, 100_000_000, 1_000_000_000)] == [
        100_000_000
    ] * 4 + [50_000_000]
    assert len(compute_parts(32_000_000_000, 100_000_000, 1_000_000_000)) == 32


def test_pull_success_follows_the_go_request_sequence(registry: Registry, tmp_path: Path) -> None:
    result = pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART, part_size_max=4 * PART)

    assert result.manifest_bytes == MANIFEST
    assert result.manifest_digest == _digest(MANIFEST)
    assert (
        result.manifest_path
        == tmp_path / "manifests" / f"127.0.0.1:{registry.port}" / "library" / "tiny" / TAG
    )
    assert result.manifest_path.read_bytes() == MANIFEST
    # Layers first, then the config, as Go does.
    assert [d for d, _s, _p in result.blobs] == [MODEL_DIGEST, CONFIG_DIGEST]
    for digest, size, path in result.blobs:
        assert path == tmp_path / "blobs" / f"sha256-{digest[7:]}"
        assert path.stat().st_size == size
        assert _digest(path.read_bytes()) == digest
    assert not list((tmp_path / "partial").iterdir())

    model = result.blob_results[0]
    assert model.location == f"{registry.url}{MODEL_PATH}"
    assert len(model.parts) == 16 and all(p.statuses == [206] and p.attempts == 1 for p in model.parts)

    manifest_get = registry.requests("GET", "/manifests/")
    assert len(manifest_get) == 1
    assert manifest_get[0].headers["accept"] == MANIFEST_ACCEPT
    assert manifest_get[0].headers["user-agent"] == UA
    heads = registry.requests("HEAD")
    assert [h.path.rsplit("/", 1)[1] for h in heads] == [MODEL_DIGEST, CONFIG_DIGEST]
    assert all(h.headers["user-agent"] == UA for h in heads)
    gets = registry.requests("GET", MODEL_PATH)
    discovery = [g for g in gets if "range" not in g.headers]
    ranged = [g for g in gets if "range" in g.headers]
    assert len(discovery) == 1 and discovery[0].headers["user-agent"] == UA
    assert len(ranged) == 16
    assert all(g.headers["user-agent"] == GO_USER_AGENT and "authorization" not in g.headers for g in ranged)
    assert sorted(g.headers["range"] for g in ranged) == sorted(
        f"bytes={o}-{o + s - 1}" for o, s in compute_parts(len(MODEL), PART, 4 * PART)
    )
    # The request log holds everything, ranged requests with what they received.
    assert sum(r.bytes_received for r in result.requests if r.range) == len(MODEL) + len(CONFIG)

    # A second pull finds the blobs in place and asks only for the manifest (Go's cache hit).
    again = pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART, part_size_max=4 * PART)
    assert all(b.cached for b in again.blob_results)
    assert [r.method for r in again.requests] == ["GET"]


def test_pull_detects_ranges_answered_with_whole_body(registry: Registry, tmp_path: Path) -> None:
    registry.mode = "ignore_range"
    with pytest.raises(PullError, match=r"digest mismatch, file must be downloaded again: want sha256:"):
        pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART, part_size_max=4 * PART)
    assert not (tmp_path / "blobs" / f"sha256-{MODEL_DIGEST[7:]}").exists()
    assert not list((tmp_path / "partial").iterdir())
    assert not (tmp_path / "manifests").exists()


def test_pull_discovery_200_without_location_fails_like_go(registry: Registry, tmp_path: Path) -> None:
    registry.mode = "nolocation"
    with pytest.raises(PullError) as info:
        pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART)
    assert str(info.value) == NO_LOCATION == "http: no Location header in response"
    assert all("range" not in s.headers for s in registry.requests("GET"))  # no part was requested
    # Newer Ollama builds reuse the blob URL instead.
    result = pull(registry.url, REPO, TAG, tmp_path / "newer", part_size_min=PART, newer_discovery=True)
    assert result.blob_results[0].location == registry.url + MODEL_PATH


def test_pull_discovery_301_and_missing_length_fail(registry: Registry, tmp_path: Path) -> None:
    registry.mode = "redirect301"
    with pytest.raises(PullError, match="unexpected status code 301"):
        pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART)
    registry.mode = "nolength"
    with pytest.raises(PullError, match="corrupt"):
        pull(registry.url, REPO, TAG, tmp_path, part_size_min=PART)
    with pytest.raises(PullError, match="pull model manifest: file does not exist"):
        pull(registry.url, "library/absent", TAG, tmp_path, part_size_min=PART)


def test_pull_blob_ranged_alone(registry: Registry, tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    result = pull_blob_ranged(
        registry.url + MODEL_PATH,
        len(MODEL),
        dest,
        part_size_min=PART,
        max_parts=4,
        expected_digest=MODEL_DIGEST,
    )
    assert dest.read_bytes() == MODEL
    assert len(result.parts) == 16 and len(result.requests) == 16
    with pytest.raises(PullError, match="digest mismatch"):
        pull_blob_ranged(
            registry.url + MODEL_PATH, len(MODEL), dest, part_size_min=PART, expected_digest=CONFIG_DIGEST
        )
    assert not dest.exists()


def test_pull_through_redirecting_faulty_proxy_recovers(
    registry: Registry, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.redirect_blobs("localhost")
    proxy.stall_after(1000, 5.0, times=1, path=f"{MODEL_DIGEST}?sig=")
    proxy.cut_after(5000, times=1, path=f"{MODEL_DIGEST}?sig=")
    result = pull(proxy.url, REPO, TAG, tmp_path, part_size_min=PART, stall_timeout=0.5, retry_backoff=0.01)

    assert (tmp_path / "blobs" / f"sha256-{MODEL_DIGEST[7:]}").read_bytes() == MODEL
    model = result.blob_results[0]
    assert model.location is not None and model.location.startswith(
        f"http://localhost:{proxy.port}{MODEL_PATH}?sig="
    )
    assert sum(p.stalls for p in model.parts) == 1
    assert sum(p.attempts for p in model.parts) == 16 + 2
    retried = [p for p in model.parts if len(p.statuses) > 1]
    assert retried and all(p.statuses == [206] * len(p.statuses) for p in retried)
    # The retries resumed where the faults stopped the parts.
    offsets = {o for o, _s in compute_parts(len(MODEL), PART, PART)}
    starts = [
        int((r.range or "bytes=0-").removeprefix("bytes=").split("-")[0]) for r in proxy.records("?sig=")
    ]
    assert sorted(s - o for s in starts for o in offsets if s - o in (1000, 5000)) == [1000, 5000]
    # The discovery GET was answered 307 by the "registry", never forwarded.
    redirects = [r for r in proxy.records(MODEL_PATH) if r.status == 307]
    assert len(redirects) == 1 and redirects[0].range is None and not redirects[0].forwarded


def test_pull_fails_after_max_retries(registry: Registry, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.redirect_blobs("localhost")
    proxy.fail(503, path=f"{MODEL_DIGEST}?sig=")  # Go writes the 503 body as data, then sees it short
    t0 = time.monotonic()
    with pytest.raises(PullError, match="max retries exceeded"):
        pull(proxy.url, REPO, TAG, tmp_path, part_size_min=PART, max_retries=3, retry_backoff=0.01)
    assert time.monotonic() - t0 < 5
    assert not (tmp_path / "blobs" / f"sha256-{MODEL_DIGEST[7:]}").exists()


# ------------------------------------------------------------------------------------------------------------
# fault proxy


def test_proxy_forwards_and_counts(registry: Registry, proxy: FaultProxy) -> None:
    parts = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("HEAD", MODEL_PATH)
        head = conn.getresponse()
        head.read()
        assert head.status == 200 and head.getheader("Content-Length") == str(len(MODEL))
        conn.request("GET", MODEL_PATH)  # same connection: keep-alive
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == MODEL
        conn.request("GET", MODEL_PATH, headers={"Range": "bytes=10-19"})
        resp = conn.getresponse()
        assert resp.status == 206 and resp.read() == MODEL[10:20]
    finally:
        conn.close()
    assert proxy.bytes_for("/blobs/") == len(MODEL) + 10
    assert proxy.requests_for("/blobs/") == 3 and proxy.requests_for("/blobs/", method="HEAD") == 1
    assert {s.headers["host"] for s in registry.requests()} == {f"127.0.0.1:{registry.port}"}
    recs = proxy.records("/blobs/")
    assert [(r.method, r.status, r.range) for r in recs] == [
        ("HEAD", 200, None),
        ("GET", 200, None),
        ("GET", 206, "bytes=10-19"),
    ]
    assert len({r.client for r in recs}) == 1

    # Chunked upstream bodies are re-framed; request bodies (plain and chunked) are forwarded.
    status, headers, body = _get(proxy.url, "/chunked")
    assert status == 200 and body == CHUNKED_BODY and headers["Transfer-Encoding"] == "chunked"
    payload = _rng.randbytes(300_000)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("POST", "/echo", body=payload)
        echoed = json.loads(conn.getresponse().read())
        conn.request("POST", "/echo", body=iter([payload[:1000], payload[1000:]]), encode_chunked=True)
        echoed_chunked = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    expected = {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    assert echoed == expected and echoed_chunked == expected

    proxy.reset()
    assert proxy.bytes_for() == 0 and proxy.requests_for() == 0


def test_proxy_fail(registry: Registry, proxy: FaultProxy) -> None:
    proxy.fail(503, times=1, path="/blobs/")
    status, headers, body = _get(proxy.url, MODEL_PATH)
    assert status == 503 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    assert headers["Content-Type"] == "application/json"
    assert not registry.requests("GET", MODEL_PATH)  # upstream not contacted
    status, _h, body = _get(proxy.url, MODEL_PATH)
    assert status == 200 and body == MODEL
    assert [r.faults for r in proxy.records()] == [["fail:503"], []]


def test_proxy_cut_after(proxy: FaultProxy) -> None:
    proxy.cut_after(1000, times=1, path="/blobs/")
    with pytest.raises(http.client.IncompleteRead) as info:
        _get(proxy.url, MODEL_PATH)
    assert info.value.partial == MODEL[:1000]
    assert proxy.bytes_for("/blobs/") == 1000
    assert _get(proxy.url, MODEL_PATH)[2] == MODEL


def test_proxy_corrupt(proxy: FaultProxy) -> None:
    proxy.corrupt(10, times=1, path="/blobs/")
    _s, _h, body = _get(proxy.url, MODEL_PATH, {"Range": "bytes=100-199"})
    assert len(body) == 100 and body[10] == MODEL[110] ^ 0xFF
    assert body[:10] == MODEL[100:110] and body[11:] == MODEL[111:200]
    assert _get(proxy.url, MODEL_PATH, {"Range": "bytes=100-199"})[2] == MODEL[100:200]


def test_proxy_stall_after(proxy: FaultProxy) -> None:
    proxy.stall_after(100, 0.5, times=1, path="/blobs/")
    t0 = time.monotonic()
    with pytest.raises(http.client.IncompleteRead) as info:
        _get(proxy.url, MODEL_PATH)
    elapsed = time.monotonic() - t0
    assert info.value.partial == MODEL[:100]
    assert 0.4 <= elapsed < 3


def test_proxy_throttle(proxy: FaultProxy) -> None:
    proxy.throttle(400_000, path="/blobs/")
    t0 = time.monotonic()
    _s, _h, body = _get(proxy.url, MODEL_PATH, {"Range": "bytes=0-199999"})
    elapsed = time.monotonic() - t0
    assert body == MODEL[:200_000]
    assert 0.4 <= elapsed < 2.0
    proxy.throttle(None)
    t0 = time.monotonic()
    assert _get(proxy.url, MODEL_PATH, {"Range": "bytes=0-199999"})[2] == MODEL[:200_000]
    assert time.monotonic() - t0 < 0.4


def test_proxy_ignore_range(registry: Registry, proxy: FaultProxy) -> None:
    proxy.ignore_range(True)
    status, _h, body = _get(proxy.url, MODEL_PATH, {"Range": "bytes=0-9"})
    assert status == 200 and body == MODEL
    assert "range" not in registry.requests("GET", MODEL_PATH)[-1].headers
    rec = proxy.records(MODEL_PATH)[-1]
    assert rec.range == "bytes=0-9" and rec.upstream_range is None and rec.faults == ["ignore_range"]
    proxy.ignore_range(False)
    assert _get(proxy.url, MODEL_PATH, {"Range": "bytes=0-9"})[0] == 206


def test_proxy_redirect_blobs_and_expiry(proxy: FaultProxy) -> None:
    proxy.redirect_blobs("localhost")
    status, headers, body = _get(proxy.url, MODEL_PATH)
    assert status == 307 and body == b""
    location = urlsplit(headers["Location"])
    assert location.hostname == "localhost" and location.port == proxy.port
    assert location.path == MODEL_PATH and location.query.startswith("sig=")
    target = f"{location.path}?{location.query}"
    status, _h, body = _get(f"http://localhost:{proxy.port}", target, {"Range": "bytes=5-9"})
    assert status == 206 and body == MODEL[5:10]
    # HEAD is not redirected unless asked.
    assert _get(proxy.url, MODEL_PATH, method="HEAD")[0] == 200

    proxy.expire_redirects_after(0.2)
    _s, headers, _b = _get(proxy.url, MODEL_PATH)
    fresh = urlsplit(headers["Location"])
    assert (
        _get(f"http://localhost:{proxy.port}", f"{fresh.path}?{fresh.query}", {"Range": "bytes=0-0"})[0]
        == 206
    )
    time.sleep(0.3)
    status, _h, body = _get(f"http://localhost:{proxy.port}", f"{fresh.path}?{fresh.query}")
    assert status == 403 and b"AccessDenied" in body


def test_proxy_down_and_up(proxy: FaultProxy) -> None:
    proxy.down()
    with pytest.raises(ConnectionRefusedError):
        _get(proxy.url, MODEL_PATH)
    proxy.up()
    assert _get(proxy.url, MODEL_PATH)[0] == 200
    proxy.down("close")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        _get(proxy.url, MODEL_PATH)
    proxy.up()
    assert _get(proxy.url, MODEL_PATH)[0] == 200


def test_proxy_stop_is_quick_with_a_stalled_request(registry: Registry) -> None:
    proxy = FaultProxy(registry.url).start()
    proxy.stall_after(10, 60.0, path="/blobs/")
    outcome: list[BaseException | bytes] = []

    def client() -> None:
        try:
            outcome.append(_get(proxy.url, MODEL_PATH)[2])
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while proxy.bytes_for("/blobs/") < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.bytes_for("/blobs/") == 10
    t0 = time.monotonic()
    proxy.stop()
    assert time.monotonic() - t0 < 2.0
    thread.join(3)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], http.client.IncompleteRead)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
