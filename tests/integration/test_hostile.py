"""Hostile input against the real daemon: traversal, NUL, malformed names, digests and ranges, huge
headers and bodies, bad JSON, slowloris.  Every answer is a JSON 4xx (or a normal answer), never a 5xx or
a traceback; nothing outside the cache is read or created; the daemon still serves a pull afterwards."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import go_pull, pull_into_cache
from tests.integration.hostile import SECRET, Answer, check, exchange, parse, request
from tests.support.daemon import REPO_ROOT, MirrorDaemon, MirrorFactory
from tests.support.models import PushedModel

HOSTILE_SETTINGS = {
    "server": {"max_body_size": "1MiB", "request_timeout": 2, "idle_timeout": 5},
    "security": {"rate_limit_requests": 0},
}


def snapshot(root: Path, skip: tuple[Path, ...]) -> set[str]:
    found: set[str] = set()
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(directory, d) not in skip]
        found.update(os.path.join(directory, f) for f in files)
    return found


@pytest.fixture
def hostile_mirror(
    mirror_factory: MirrorFactory, small_model: PushedModel, tmp_path: Path
) -> Iterator[MirrorDaemon]:
    (tmp_path / "secret.txt").write_text(SECRET)
    (tmp_path / "cache0").mkdir()
    (tmp_path / "cache0" / "secret.txt").write_text(SECRET)  # in the cache directory, but not cache content
    mirror = mirror_factory(config=HOSTILE_SETTINGS)
    pull_into_cache(mirror, small_model)
    skip = (
        mirror.cache_dir / "blobs",
        mirror.cache_dir / "manifests",
        mirror.cache_dir / ".mirror",
        mirror.workdir,
    )
    before, repo_before = snapshot(tmp_path, skip), set(os.listdir(REPO_ROOT))
    yield mirror
    assert snapshot(tmp_path, skip) == before, "a file was created outside the cache"
    assert set(os.listdir(REPO_ROOT)) == repo_before, "a file was created in the daemon's working directory"
    assert mirror.is_running()
    result = go_pull(mirror, small_model, tmp_path / "after")
    assert result.manifest_bytes == small_model.manifest


def blob_path(model: PushedModel) -> str:
    return f"/v2/{model.repo}/blobs/{model.blobs[0].digest}"


TRAVERSALS = [
    "/v2/../../../../etc/passwd",
    "/v2/library/../../../../etc/passwd/manifests/latest",
    "/v2/library/%2e%2e/manifests/latest",
    "/v2/%2e%2e%2f%2e%2e%2fetc/passwd/manifests/latest",
    "/v2/library/tiny%2f..%2f..%2f..%2fsecret.txt/manifests/latest",
    "/v2/library/tiny/manifests/..%2f..%2f..%2f..%2fsecret.txt",
    "/v2/library/tiny/manifests/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/v2/library/tiny/blobs/sha256:..%2f..%2fsecret.txt",
    "/v2/library/tiny/blobs/..%2f..%2fsecret.txt",
    "/v2/library/tiny/blobs/%2fetc%2fpasswd",
    "/v2/library/tiny/manifests/%2fetc%2fpasswd",
    "//etc/passwd",
    "/api/../../etc/passwd",
    "/api/show/../../../etc/passwd",
    "/mirror/../secret.txt",
    "/etc/passwd",
    "http://127.0.0.1/../../etc/passwd",
    "/v2/library/tiny%00/manifests/latest",
    "/v2/library/tiny/manifests/latest%00",
    "/v2/library/tiny/manifests/latest%00.txt",
    "/v2/library/tiny/blobs/sha256:%00",
    "/v2/lib%5crary/tiny/manifests/latest",
    "/v2/library/tiny/manifests/..",
    "/v2/library/../manifests/latest",
    "/v2/./library/tiny/manifests/latest",
    "/v2/library/tiny/manifests/%ff%fe",
    "/v2/%c0%ae%c0%ae/%c0%ae%c0%ae/manifests/latest",
    "/v2/library/" + "a" * 5000 + "/manifests/latest",
    "/v2/library//tiny/manifests/latest",  # empty segments: werkzeug's redirect, answered as JSON
    "/v2/library/tiny//manifests/latest",
    "/api//tags",
    "/mirror//stats",
]
DIGESTS = [
    "sha256:xyz",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 65,
    "sha512:" + "a" * 128,
    "md5:d41d8cd98f00b204e9800998ecf8427e",
    "sha256",
    "sha256:",
    ":" + "a" * 64,
    "sha256:" + "a" * 64 + "%2f..",
    "SHA256:" + "a" * 64,
]
RANGES = [
    "bytes=abc",
    "bytes=5-1",
    "bytes=-0",
    "bytes=99999999999999999999999999-",
    "bytes=0-99999999999999999999999999",
    "bytes=-99999999999999999999999999",
    "bytes=0-0,5-",
    "bytes=0-0," * 2000 + "1-1",
    "items=0-1",
    "bytes=--1",
    "bytes= 0-1",
    "bytes=0x10-0x20",
    "bytes=1e3-2e3",
    "bytes=१-२",
    "bytes=",
    "=",
]
BODIES = [
    b"{",
    b"[]",
    b"null",
    b'"model"',
    b"\xff\xfe\x00",
    b'{"model": 5}',
    b'{"model": ["tiny"]}',
    b'{"model": {"$ne": null}}',
    b'{"model": "../../../../etc/passwd"}',
    b'{"model": "/etc/passwd"}',
    b'{"model": "tiny/../../../secret.txt"}',
    b'{"model": "a\\u0000b"}',
    b'{"model": "' + b"a" * 100000 + b'"}',
    b'{"model": "tiny", "stream": "yes"}',
    b"[" * 100000 + b"]" * 100000,
    b'{"model": "tiny"' + b', "x": 1' * 50000 + b"}",
]


def test_traversal_and_nul_never_leave_the_cache(hostile_mirror: MirrorDaemon) -> None:
    for target in TRAVERSALS:
        for method in ("GET", "HEAD"):
            check(exchange(hostile_mirror.port, request(method, target)), f"{method} {target}", method)


def test_malformed_digests_and_ranges(hostile_mirror: MirrorDaemon, small_model: PushedModel) -> None:
    for digest in DIGESTS:
        target = f"/v2/{small_model.repo}/blobs/{digest}"
        answer = exchange(hostile_mirror.port, request("GET", target))
        check(answer, target)
        assert answer.status in (400, 404), target
        check(
            exchange(hostile_mirror.port, request("GET", f"/v2/{small_model.repo}/manifests/{digest}")),
            digest,
        )
    for value in RANGES:
        answer = exchange(hostile_mirror.port, request("GET", blob_path(small_model), {"Range": value}))
        check(answer, f"Range: {value}")
        assert answer.status in (200, 206, 400, 416, 431), value


def test_bad_json_bodies(hostile_mirror: MirrorDaemon) -> None:
    for route in ("/api/pull", "/api/show", "/api/delete"):
        method = "DELETE" if route == "/api/delete" else "POST"
        for body in BODIES:
            data = request(method, route, body=body)
            if method == "DELETE":
                data = data.replace(
                    b"Connection: close\r\n", b"Connection: close\r\nContent-Length: %d\r\n" % len(body), 1
                )
            answer = exchange(hostile_mirror.port, data)
            check(answer, f"{method} {route} {body[:40]!r}")
            if not body.startswith(b'{"model": "tiny"'):
                assert answer.status in (400, 404, 413), (route, body[:40], answer.status)


def test_oversized_and_malformed_requests(hostile_mirror: MirrorDaemon) -> None:
    port = hostile_mirror.port
    cases: list[tuple[bytes, int]] = [
        (request("GET", "/api/version", {"X-Big": "a" * 20000}), 431),
        (request("GET", "/api/version", {f"X-{i}": "1" for i in range(150)}), 431),
        (request("GET", "/" + "a" * 20000), 431),
        (request("POST", "/api/pull").replace(b"Content-Length: 0", b"Content-Length: 10000000000"), 413),
        (request("POST", "/api/pull", body=b"x" * (2 * 1024 * 1024)), 413),
        (
            b"POST /api/pull HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"100000\r\n"
            + b"x" * 0x100000
            + b"\r\n"
            + b"100000\r\n"
            + b"x" * 0x100000
            + b"\r\n0\r\n\r\n",
            413,
        ),
        (b"POST /api/pull HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
        (b"POST /api/pull HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", 400),
        (b"GET /api/version HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
            400,
        ),  # TLS to a plain port
        (b"GET\r\n\r\n", 400),
    ]
    for data, status in cases:
        answer = exchange(port, data)
        check(answer, repr(data[:60]))
        assert answer.status == status, (data[:60], answer.status, answer.body[:200])
    for method in ("BREW", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"):
        for target in ("/", "/v2/library/tiny/manifests/latest", "/api/tags", "/mirror/stats"):
            check(exchange(port, request(method, target)), f"{method} {target}", method)


def test_slowloris_connections_are_cut_and_do_not_starve_others(hostile_mirror: MirrorDaemon) -> None:
    """30 clients dribble a header byte every 0.3 s; server.request_timeout (2 s here) cuts each of them
    off with a 408, while a normal request is answered at once all along."""
    port = hostile_mirror.port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    answers: list[bytes] = [b""] * len(socks)
    started = time.monotonic()

    def dribble(index: int, sock: socket.socket) -> None:
        try:
            sock.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while time.monotonic() - started < 8:
                sock.sendall(b"a")
                time.sleep(0.3)
        except OSError:
            pass
        try:
            sock.settimeout(2)
            answers[index] = sock.recv(4096)
        except OSError:
            pass

    threads = [threading.Thread(target=dribble, args=(i, s)) for i, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        quick = time.monotonic()
        check(exchange(port, request("GET", "/api/version")), "a normal request beside the slow ones")
        assert time.monotonic() - quick < 2
    finally:
        for thread in threads:
            thread.join(timeout=15)
        for sock in socks:
            sock.close()
    assert time.monotonic() - started < 12
    for raw in answers:
        answer = parse(raw) if raw else Answer(None)
        assert answer.status == 408, raw[:200]
        check(answer, "slowloris")
