"""A test puller that requests exactly what the Go Ollama server requests when it pulls (classic path).

It follows what the Go server requests when it pulls, as in Ollama's ``server/download.go`` /
``server/images.go``:

1. ``GET {base}/v2/{repo}/manifests/{tag}`` with
   ``Accept: application/vnd.docker.distribution.manifest.v2+json``, ``Accept-Encoding: gzip`` (added by
   Go's transport) and the Ollama ``User-Agent``; redirects followed.
2. Layers first, then the config blob, one after another. For each: ``HEAD .../blobs/{digest}``
   (redirects followed), which must answer 200 with an exact ``Content-Length``.
3. The *discovery* ``GET`` on the same URL without ``Range``, following redirects only to the same
   hostname. A ``307`` (to another host) or a ``200`` must carry ``Location``; the body is never read, the
   connection is hung up at once. A ``200`` without ``Location`` fails with
   ``http: no Location header in response``; any other status fails with ``unexpected status code N``;
   network errors and statuses >= 400 are retried with Go's n^2*10 ms backoff inside a 30 s window.
4. The blob is split in parts of ``clamp(total // 16, part_size_min, part_size_max)`` bytes, fetched by at
   most ``max_parts`` threads with ``Range: bytes=a-b`` on the Location, ``User-Agent: Go-http-client/1.1``
   and no ``Authorization``. **The status code is not checked**: whatever body arrives is written at the
   part's offset (``os.pwrite`` into a preallocated file). A part with no bytes for ``stall_timeout``
   seconds is abandoned and re-requested from the offset reached (no sleep); any other failure is retried
   from the offset reached after ``retry_backoff * 2**try`` seconds, ``max_retries`` attempts in all (Go: 6
   attempts, sleeping 1 s, 2 s, 4 s ...).
5. After all layers, each new blob's sha256 is checked; a mismatch deletes the file and raises
   ``PullError`` (``digest mismatch, file must be downloaded again: want ..., got ...``).

Where this tool deliberately differs from Go, so that a test can never hang:

- Go never declares a part stalled before its first byte (nor, after a stall, before the next byte), and
  retries stalled parts forever. Here the stall clock also runs from the start of each attempt (connect +
  headers), and stalls are bounded by ``max_stalls``.
- ``timeout`` (optional) bounds each blob's ranged phase.
- Go takes the blob size from ``HEAD`` alone; here a ``Content-Length`` differing from the manifest's size
  is an error as well ("corrupt"), and so is a missing one (Go would fetch 0 bytes and fail the digest
  check).
- Registry auth only with a ``key`` (:class:`tests.support.ollamakey.OllamaKey`): then a 401 is answered as
  Go's ``makeRequestWithRetry`` does (the realm's host:port must be the one asked, a signed token request,
  one retry with ``Authorization: Bearer <token>``, the token kept for the rest of the pull); without one a
  401 is an error. ``https://`` URLs use HTTP/1.1 with the system's CAs or the given ``ssl_context`` (Go
  would use HTTP/2 there). ``connect_to`` sends a URL's ``host:port`` to another address while ``Host``, SNI
  and the certificate check keep the URL's name, as when a client's DNS points ``registry.ollama.ai`` at a
  mirror (transparent mode).
- Newer Ollama builds accept a ``200`` without ``Location`` (they reuse the blob URL) and a ``302``; pass
  ``newer_discovery=True`` to emulate them.

Blobs are written as ``dest_dir/partial/sha256-<hex>-partial`` and moved to ``dest_dir/blobs/sha256-<hex>``
once verified; the manifest (verbatim bytes) goes to
``dest_dir/manifests/<host>/<namespace>/<model>/<tag>``.

CLI, for benchmarks: ``python -m tests.support.puller BASE REPO TAG DEST [--part-size-min N] ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from tests.support.ollamakey import OllamaKey, parse_challenge, token_url

__all__ = [
    "DEFAULT_USER_AGENT",
    "GO_MAX_PART_SIZE",
    "GO_MIN_PART_SIZE",
    "GO_USER_AGENT",
    "MANIFEST_ACCEPT",
    "BlobResult",
    "PartResult",
    "PullError",
    "PullResult",
    "RangedResult",
    "RequestLog",
    "compute_parts",
    "main",
    "pull",
    "pull_blob_ranged",
]

DEFAULT_USER_AGENT = "ollama/0.33.0 (amd64 linux) Go/go1.24.0"
GO_USER_AGENT = "Go-http-client/1.1"
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
NUM_DOWNLOAD_PARTS = 16
GO_MIN_PART_SIZE = 100 * 1000 * 1000
GO_MAX_PART_SIZE = 1000 * 1000 * 1000
MAX_REDIRECTS = 10
READ_CHUNK = 256 * 1024
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY = 4096
DISCOVERY_TIMEOUT = 30.0
WATCHDOG_TICK = 0.05
NO_LOCATION = "http: no Location header in response"
DIGEST_MISMATCH = "digest mismatch, file must be downloaded again"

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_NAME_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


class PullError(Exception):
    """The pull failed the way the Go server's pull would fail; the message says why."""


class _Stalled(Exception):
    """A part attempt got no byte for ``stall_timeout`` seconds."""


class _Cancelled(Exception):
    """The blob download was cancelled (another part failed, or the pull timed out)."""


@dataclass
class RequestLog:
    """One HTTP exchange as seen by the puller (one entry per redirect hop)."""

    method: str
    url: str
    range: str | None
    status: int | None
    bytes_received: int
    elapsed: float
    error: str | None = None
    part: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class PartResult:
    """One ranged part of a blob: its span, the status codes its attempts saw, and how it went."""

    index: int
    offset: int
    size: int
    completed: int = 0
    statuses: list[int] = field(default_factory=list)
    attempts: int = 0
    stalls: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class RangedResult:
    """What ``pull_blob_ranged`` did."""

    url: str
    size: int
    path: Path
    parts: list[PartResult]
    requests: list[RequestLog]
    elapsed: float


@dataclass
class BlobResult:
    """One blob of a pull. ``cached`` blobs were already in ``blobs/`` and were not requested (as in Go)."""

    digest: str
    size: int
    path: Path
    cached: bool = False
    location: str | None = None
    parts: list[PartResult] = field(default_factory=list)


@dataclass
class PullResult:
    """Everything a test may want to assert about a pull."""

    manifest_bytes: bytes
    manifest_digest: str
    manifest: dict[str, Any]
    manifest_path: Path
    blobs: list[tuple[str, int, Path]]
    blob_results: list[BlobResult]
    requests: list[RequestLog]
    elapsed: float

    @property
    def total_bytes(self) -> int:
        """Bytes received in blob bodies over all requests (including retried and corrupt ones)."""
        return sum(r.bytes_received for r in self.requests if r.range is not None)


class _Log:
    """A thread-safe list of ``RequestLog``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[RequestLog] = []

    def add(self, entry: RequestLog) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[RequestLog]:
        with self._lock:
            return list(self._entries)


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing


ConnectTo = Mapping[str, tuple[str, int]]


class _RedirectedHTTPConnection(http.client.HTTPConnection):
    """Connects to another address than the URL's host (like ``curl --connect-to``)."""

    def __init__(self, host: str, port: int | None, address: tuple[str, int], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection(self._address, self.timeout)


class _RedirectedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to another address; the name sent (SNI) and verified stays the URL's host."""

    def __init__(
        self, host: str, port: int | None, address: tuple[str, int], timeout: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def _connection(
    url: str, timeout: float, ssl_context: ssl.SSLContext | None, connect_to: ConnectTo | None = None
) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.hostname is None:
        raise PullError(f"bad URL {url!r}")
    default_port = 443 if parts.scheme == "https" else 80
    address = (connect_to or {}).get(f"{parts.hostname}:{parts.port or default_port}")
    if parts.scheme == "https":
        context = ssl_context or ssl.create_default_context()
        if address is not None:
            return _RedirectedHTTPSConnection(parts.hostname, parts.port, address, timeout, context)
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    if parts.scheme != "http":
        raise PullError(f"unsupported scheme in {url!r}")
    if address is not None:
        return _RedirectedHTTPConnection(parts.hostname, parts.port, address, timeout)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def _target(url: str) -> str:
    parts = urlsplit(url)
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


def _host_header(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


def _hangup(conn: http.client.HTTPConnection, sock: socket.socket | None) -> None:
    """Close a connection at once, whatever is left unread (the client hangs up)."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.close()


class _Exchange:
    """An open response: its connection, raw socket (for hang-ups and the watchdog) and final URL."""

    def __init__(
        self,
        conn: http.client.HTTPConnection,
        sock: socket.socket | None,
        resp: http.client.HTTPResponse,
        url: str,
    ) -> None:
        self.conn = conn
        self.sock = sock
        self.resp = resp
        self.url = url

    def close(self) -> None:
        _hangup(self.conn, self.sock)


def _send(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    on_socket: Callable[[socket.socket], None] | None = None,
    connect_to: ConnectTo | None = None,
) -> _Exchange:
    conn = _connection(url, timeout, ssl_context, connect_to)
    sock: socket.socket | None = None
    try:
        conn.connect()
        sock = conn.sock
        if on_socket is not None and sock is not None:
            on_socket(sock)
        conn.putrequest(method, _target(url), skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", _host_header(url))
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
    except BaseException:
        _hangup(conn, sock)
        raise
    return _Exchange(conn, sock, resp, url)


def _request(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]],
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    log: _Log,
    follow: Callable[[str], bool] | None,
    part: int | None = None,
    on_socket: Callable[[socket.socket], None] | None = None,
    connect_to: ConnectTo | None = None,
) -> tuple[_Exchange, float]:
    """Send a request, following redirects like Go's ``http.Client`` while ``follow(new_url)`` is true.

    Returns the final exchange (its body unread) and the time the last hop was sent. Every hop but the last is
    logged here; the caller logs the last one when done with its body.
    """
    hops = 0
    while True:
        started = time.monotonic()
        range_value = dict(headers).get("Range")
        try:
            ex = _send(
                method,
                url,
                headers,
                timeout=timeout,
                ssl_context=ssl_context,
                on_socket=on_socket,
                connect_to=connect_to,
            )
        except (OSError, http.client.HTTPException) as exc:
            log.add(
                RequestLog(
                    method, url, range_value, None, 0, time.monotonic() - started, _describe(exc), part
                )
            )
            raise
        location = ex.resp.getheader("Location")
        if ex.resp.status not in _REDIRECT_CODES or not location or follow is None:
            return ex, started
        new_url = urljoin(url, location)
        if not follow(new_url):
            return ex, started
        hops += 1
        ex.close()
        log.add(
            RequestLog(
                method,
                url,
                range_value,
                ex.resp.status,
                0,
                time.monotonic() - started,
                None,
                part,
                _header_dict(ex.resp),
            )
        )
        if hops > MAX_REDIRECTS:
            raise PullError(f"stopped after {MAX_REDIRECTS} redirects")
        if ex.resp.status in (301, 302, 303) and method not in ("GET", "HEAD"):
            method = "GET"
        if urlsplit(new_url).hostname != urlsplit(url).hostname:
            headers = [(k, v) for k, v in headers if k.lower() not in ("authorization", "cookie")]
        url = new_url


def _registry_request(
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    auth: _RegistryAuth | None,
    **kwargs: Any,
) -> tuple[_Exchange, float]:
    """A registry request as ``makeRequestWithRetry`` sends it: with the pull's token, and on a 401 (when
    the pull has a key) once more with a fresh token."""
    if auth is None:
        return _request(method, url, headers, **kwargs)
    ex, started = _request(method, url, [*headers, *auth.headers()], **kwargs)
    if ex.resp.status != 401:
        return ex, started
    challenge = ex.resp.getheader("WWW-Authenticate") or ""
    ex.close()
    kwargs["log"].add(
        RequestLog(
            method, ex.url, None, 401, 0, time.monotonic() - started, "401", None, _header_dict(ex.resp)
        )
    )
    auth.fetch_token(challenge, ex.url, dict(headers).get("User-Agent", DEFAULT_USER_AGENT))
    return _request(method, url, [*headers, *auth.headers()], **kwargs)


def _header_dict(resp: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.getheaders()}


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_all(resp: http.client.HTTPResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = resp.read(min(READ_CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise PullError(f"response body larger than {limit} bytes")


def _registry_error(resp: http.client.HTTPResponse) -> str:
    """The error Go's ``makeRequestWithRetry`` returns for a status >= 400, or "" for a usable response."""
    if resp.status == 404:
        return "file does not exist"
    if resp.status == 401:
        return "unauthorized: access denied"
    if resp.status >= 400:
        try:
            body = resp.read(MAX_ERROR_BODY).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            body = str(exc)
        return f"{resp.status}: {body}"
    return ""


class _RegistryAuth:
    """The token the Go server keeps in its ``registryOptions`` for one pull, and how it gets one."""

    def __init__(
        self,
        key: OllamaKey,
        ssl_context: ssl.SSLContext | None,
        log: _Log,
        timeout: float,
        connect_to: ConnectTo | None = None,
    ) -> None:
        self.key = key
        self.connect_to = connect_to
        self.ssl_context = ssl_context
        self.log = log
        self.timeout = timeout
        self.token: str | None = None
        self.token_requests = 0

    def headers(self) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {self.token}")] if self.token else []

    def fetch_token(self, challenge_header: str, request_url: str, user_agent: str) -> None:
        challenge = parse_challenge(challenge_header)
        if "realm" not in challenge:
            raise PullError("unauthorized: no realm in the challenge")
        url = token_url(challenge)
        if urlsplit(url).netloc != urlsplit(request_url).netloc:  # Ollama >= 0.14.3
            raise PullError(
                f"realm host {urlsplit(url).netloc} does not match {urlsplit(request_url).netloc}"
            )
        self.token_requests += 1
        started = time.monotonic()
        headers = [("Authorization", self.key.token_request_authorization(url)), ("User-Agent", user_agent)]
        ex = _send(
            "GET",
            url,
            headers,
            timeout=self.timeout,
            ssl_context=self.ssl_context,
            connect_to=self.connect_to,
        )
        try:
            body = _read_all(ex.resp, MAX_ERROR_BODY)
        finally:
            ex.close()
        self.log.add(
            RequestLog("GET", url, None, ex.resp.status, len(body), time.monotonic() - started, None, None)
        )
        if ex.resp.status != 200:
            raise PullError(f"unauthorized: token request answered {ex.resp.status}: {body[:200]!r}")
        token = json.loads(body).get("token")
        if not isinstance(token, str) or not token:
            raise PullError("unauthorized: no token in the token response")
        self.token = token


# ----------------------------------------------------------------------------------------------------
# Ranged blob download


def compute_parts(total: int, part_size_min: int, part_size_max: int) -> list[tuple[int, int]]:
    """Go's split: part size clamp(total // 16, min, max); (offset, size) pairs, the last one shorter."""
    size = total // NUM_DOWNLOAD_PARTS
    size = max(part_size_min, min(size, part_size_max))
    size = max(size, 1)
    parts: list[tuple[int, int]] = []
    offset = 0
    while offset < total:
        this = min(size, total - offset)
        parts.append((offset, this))
        offset += this
    return parts


class _Attempt:
    """One in-flight part request, watched for stalls."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.sock: socket.socket | None = None
        self.stalled = False
        self.cancelled = False
        self.lock = threading.Lock()

    def set_socket(self, sock: socket.socket) -> None:
        with self.lock:
            self.sock = sock
            doomed = self.stalled or self.cancelled
        if doomed:
            _shutdown(sock)

    def kill(self, *, stalled: bool) -> None:
        with self.lock:
            if stalled:
                self.stalled = True
            else:
                self.cancelled = True
            sock = self.sock
        if sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """Go's per-part ticker: abandons attempts idle for ``stall_timeout``; enforces cancellation."""

    def __init__(self, stall_timeout: float, cancel: threading.Event, deadline: float | None) -> None:
        self._stall_timeout = stall_timeout
        self._cancel = cancel
        self._deadline = deadline
        self._lock = threading.Lock()
        self._active: set[_Attempt] = set()
        self._done = threading.Event()
        self.timed_out = False
        self._thread = threading.Thread(target=self._run, name="puller-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def register(self, attempt: _Attempt) -> None:
        with self._lock:
            self._active.add(attempt)

    def unregister(self, attempt: _Attempt) -> None:
        with self._lock:
            self._active.discard(attempt)

    def _run(self) -> None:
        while not self._done.wait(WATCHDOG_TICK):
            now = time.monotonic()
            if self._deadline is not None and now > self._deadline and not self._cancel.is_set():
                self.timed_out = True
                self._cancel.set()
            with self._lock:
                active = list(self._active)
            for attempt in active:
                if self._cancel.is_set():
                    attempt.kill(stalled=False)
                elif now - attempt.last > self._stall_timeout:
                    attempt.kill(stalled=True)


@dataclass
class _RangedConfig:
    stall_timeout: float
    max_retries: int
    max_stalls: int
    retry_backoff: float
    ssl_context: ssl.SSLContext | None
    headers: list[tuple[str, str]]
    connect_to: ConnectTo | None = None


def _fetch_part_once(
    url: str, *, fd: int, part: PartResult, cfg: _RangedConfig, watchdog: _Watchdog, log: _Log
) -> None:
    start = part.offset + part.completed
    stop = part.offset + part.size - 1
    range_value = f"bytes={start}-{stop}"
    attempt = _Attempt()
    watchdog.register(attempt)
    received = 0
    status: int | None = None
    ex: _Exchange | None = None
    started = time.monotonic()
    error: str | None = None
    try:
        # Go's http.DefaultClient: follows any redirect (up to 10), keeping the Range header.
        ex, started = _request(
            "GET",
            url,
            [*cfg.headers, ("Range", range_value)],
            timeout=cfg.stall_timeout + 5.0,
            ssl_context=cfg.ssl_context,
            connect_to=cfg.connect_to,
            log=log,
            follow=lambda _u: True,
            part=part.index,
            on_socket=attempt.set_socket,
        )
        status = ex.resp.status
        part.statuses.append(status)
        attempt.last = time.monotonic()
        remaining = stop - start + 1
        buf = bytearray(min(READ_CHUNK, remaining))
        view = memoryview(buf)
        while remaining > 0:
            n = ex.resp.readinto(view[: min(len(buf), remaining)])
            if not n:
                break
            # The status code is not checked: whatever arrives goes to the part's offset (as in Go).
            os.pwrite(fd, view[:n], part.offset + part.completed)
            part.completed += n
            received += n
            remaining -= n
            attempt.last = time.monotonic()
        if remaining > 0:
            raise http.client.IncompleteRead(b"", remaining)
    except BaseException as exc:
        error = _describe(exc)
        if attempt.cancelled:
            raise _Cancelled() from exc
        if attempt.stalled:
            raise _Stalled(f"part {part.index} stalled") from exc
        raise
    finally:
        watchdog.unregister(attempt)
        if ex is not None:
            ex.close()
            log.add(
                RequestLog(
                    "GET",
                    ex.url,
                    range_value,
                    status,
                    received,
                    time.monotonic() - started,
                    error,
                    part.index,
                    _header_dict(ex.resp),
                )
            )


def _run_part(
    url: str,
    *,
    fd: int,
    part: PartResult,
    cfg: _RangedConfig,
    watchdog: _Watchdog,
    cancel: threading.Event,
    log: _Log,
) -> None:
    tries = 0
    while part.completed < part.size:
        if cancel.is_set():
            raise _Cancelled()
        part.attempts += 1
        try:
            _fetch_part_once(url, fd=fd, part=part, cfg=cfg, watchdog=watchdog, log=log)
        except (_Cancelled, KeyboardInterrupt):
            raise
        except _Stalled as exc:
            part.stalls += 1
            part.errors.append(str(exc))
            if part.stalls > cfg.max_stalls:
                raise PullError(f"part {part.index} stalled {part.stalls} times") from exc
            continue  # Go: no sleep, the try is not counted
        except Exception as exc:
            part.errors.append(_describe(exc))
            if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC: Go gives up at once
                raise
            if tries + 1 >= cfg.max_retries:
                raise PullError(f"max retries exceeded: part {part.index}: {_describe(exc)}") from exc
            if cancel.wait(cfg.retry_backoff * (2**tries)):
                raise _Cancelled() from exc
            tries += 1


def _download_ranged(
    url: str,
    size: int,
    path: Path,
    *,
    part_size_min: int,
    part_size_max: int,
    max_parts: int,
    cfg: _RangedConfig,
    log: _Log,
    timeout: float | None,
) -> list[PartResult]:
    parts = [
        PartResult(i, off, sz)
        for i, (off, sz) in enumerate(compute_parts(size, part_size_min, part_size_max))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        if not parts:
            return parts
        cancel = threading.Event()
        deadline = None if timeout is None else time.monotonic() + timeout
        with (
            _Watchdog(cfg.stall_timeout, cancel, deadline) as watchdog,
            ThreadPoolExecutor(
                max_workers=max(1, min(max_parts, len(parts))), thread_name_prefix="puller-part"
            ) as pool,
        ):
            futures: list[Future[None]] = [
                pool.submit(_run_part, url, fd=fd, part=p, cfg=cfg, watchdog=watchdog, cancel=cancel, log=log)
                for p in parts
            ]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            first: BaseException | None = None
            for fut in futures:
                if fut in done and fut.exception() is not None:
                    first = fut.exception()
                    break
            if first is not None:
                cancel.set()
                for fut in futures:
                    fut.cancel()
                wait(futures, timeout=cfg.stall_timeout + 10.0)
                if watchdog.timed_out:
                    raise PullError(f"timed out after {timeout} s") from first
                if isinstance(first, PullError):
                    raise first
                raise PullError(_describe(first)) from first
    finally:
        os.close(fd)
    return parts


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def pull_blob_ranged(
    url: str,
    size: int,
    dest_path: str | os.PathLike[str],
    *,
    part_size_min: int = GO_MIN_PART_SIZE,
    part_size_max: int = GO_MAX_PART_SIZE,
    max_parts: int = NUM_DOWNLOAD_PARTS,
    stall_timeout: float = 30.0,
    max_retries: int = 6,
    max_stalls: int = 6,
    retry_backoff: float = 0.1,
    expected_digest: str | None = None,
    timeout: float | None = None,
    user_agent: str = GO_USER_AGENT,
    ssl_context: ssl.SSLContext | None = None,
) -> RangedResult:
    """Fetch ``size`` bytes of ``url`` into ``dest_path`` with Go's parallel ranged GETs (step 4 alone).

    No HEAD and no discovery GET: ``url`` is used as the resolved Location. If ``expected_digest`` is given,
    the file's sha256 is checked afterwards and the file deleted on mismatch (``PullError``).
    """
    log = _Log()
    started = time.monotonic()
    path = Path(dest_path)
    cfg = _RangedConfig(
        stall_timeout, max_retries, max_stalls, retry_backoff, ssl_context, [("User-Agent", user_agent)]
    )
    parts = _download_ranged(
        url,
        size,
        path,
        part_size_min=part_size_min,
        part_size_max=part_size_max,
        max_parts=max_parts,
        cfg=cfg,
        log=log,
        timeout=timeout,
    )
    if expected_digest is not None:
        got = _file_digest(path)
        if got != expected_digest:
            path.unlink(missing_ok=True)
            raise PullError(f"{DIGEST_MISMATCH}: want {expected_digest}, got {got}")
    return RangedResult(url, size, path, parts, log.entries(), time.monotonic() - started)


# ----------------------------------------------------------------------------------------------------
# The whole pull


def _split_repo(repo: str, tag: str) -> list[str]:
    names = repo.split("/")
    for name in [*names, tag]:
        if not _NAME_PART_RE.match(name) or name in (".", ".."):
            raise PullError(f"invalid model name part {name!r}")
    return names


def _discover(
    blob_url: str,
    headers: list[tuple[str, str]],
    *,
    log: _Log,
    ssl_context: ssl.SSLContext | None,
    discovery_timeout: float,
    newer_discovery: bool,
    connect_to: ConnectTo | None = None,
    auth: _RegistryAuth | None = None,
) -> str:
    """Step 3: the GET without Range that yields the URL the ranged GETs go to."""
    deadline = time.monotonic() + discovery_timeout
    blob_host = urlsplit(blob_url).hostname
    n = 0
    while True:
        remaining = deadline - time.monotonic()
        failure: str
        try:
            ex, started = _registry_request(
                "GET",
                blob_url,
                [*headers, ("Accept-Encoding", "gzip")],
                auth,
                timeout=max(0.1, remaining),
                ssl_context=ssl_context,
                connect_to=connect_to,
                log=log,
                follow=lambda u: urlsplit(u).hostname == blob_host,
            )
        except (OSError, http.client.HTTPException) as exc:
            failure = _describe(exc)
        else:
            resp = ex.resp
            status = resp.status
            failure = _registry_error(resp)
            # Hang up at once: the body (possibly the whole blob) is never read.
            ex.close()
            log.add(
                RequestLog(
                    "GET",
                    ex.url,
                    None,
                    status,
                    0,
                    time.monotonic() - started,
                    failure or None,
                    None,
                    _header_dict(resp),
                )
            )
            if not failure:
                location = resp.getheader("Location")
                accepted = (307, 302) if newer_discovery else (307,)
                if status in accepted or status == 200:
                    if location:
                        return urljoin(ex.url, location)
                    if status == 200 and newer_discovery:
                        return ex.url
                    raise PullError(NO_LOCATION)
                raise PullError(f"unexpected status code {status}")
        # Network error or status >= 400: Go backs off (n^2 * 10 ms, max 10 s, jittered) inside its deadline.
        n += 1
        delay = min(n * n * 0.01, 10.0) * (random.random() + 0.5)
        if time.monotonic() + delay >= deadline:
            raise PullError(f"failed to get direct URL: {failure}")
        time.sleep(delay)


def _head_size(
    blob_url: str,
    headers: list[tuple[str, str]],
    *,
    log: _Log,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    connect_to: ConnectTo | None = None,
    auth: _RegistryAuth | None = None,
) -> int:
    ex, started = _registry_request(
        "HEAD",
        blob_url,
        headers,
        auth,
        timeout=timeout,
        ssl_context=ssl_context,
        connect_to=connect_to,
        log=log,
        follow=lambda _u: True,
    )
    resp = ex.resp
    try:
        failure = _registry_error(resp)
    finally:
        ex.close()
    log.add(
        RequestLog(
            "HEAD",
            ex.url,
            None,
            resp.status,
            0,
            time.monotonic() - started,
            failure or None,
            None,
            _header_dict(resp),
        )
    )
    if failure:
        raise PullError(failure)
    if resp.status != 200:
        raise PullError(f"HEAD {ex.url}: unexpected status code {resp.status}")
    length = resp.getheader("Content-Length")
    if length is None or not length.strip().isdigit():
        raise PullError(f"corrupt: HEAD {ex.url} has no valid Content-Length ({length!r})")
    return int(length)


def pull(
    base_url: str,
    repo: str,
    tag: str,
    dest_dir: str | os.PathLike[str],
    *,
    part_size_min: int = GO_MIN_PART_SIZE,
    part_size_max: int = GO_MAX_PART_SIZE,
    max_parts: int = NUM_DOWNLOAD_PARTS,
    stall_timeout: float = 30.0,
    max_retries: int = 6,
    max_stalls: int = 6,
    retry_backoff: float = 0.1,
    user_agent: str = DEFAULT_USER_AGENT,
    discovery_timeout: float = DISCOVERY_TIMEOUT,
    request_timeout: float = 30.0,
    timeout: float | None = None,
    newer_discovery: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    connect_to: ConnectTo | None = None,
    key: OllamaKey | None = None,
) -> PullResult:
    """Pull ``repo:tag`` from ``base_url`` (``http://127.0.0.1:8080``) into ``dest_dir`` as Go Ollama does.

    Raises ``PullError`` with Go's message where Go has one. ``request_timeout`` bounds each manifest/HEAD
    socket operation; ``timeout`` (per blob download) bounds the ranged phase. ``connect_to`` maps
    ``host:port`` of a URL to the address to connect to instead (``curl --connect-to``): ``Host``, SNI and
    certificate checks keep the URL's name, as for a client whose DNS points that name at a mirror.
    """
    started_all = time.monotonic()
    base = base_url.rstrip("/")
    names = _split_repo(repo, tag)
    dest = Path(dest_dir)
    log = _Log()
    registry_headers = [("User-Agent", user_agent)]
    auth = _RegistryAuth(key, ssl_context, log, request_timeout, connect_to) if key is not None else None

    # 1. The manifest.
    manifest_url = f"{base}/v2/{repo}/manifests/{tag}"
    ex, started = _registry_request(
        "GET",
        manifest_url,
        [*registry_headers, ("Accept", MANIFEST_ACCEPT), ("Accept-Encoding", "gzip")],
        auth,
        timeout=request_timeout,
        ssl_context=ssl_context,
        connect_to=connect_to,
        log=log,
        follow=lambda _u: True,
    )
    resp = ex.resp
    try:
        failure = _registry_error(resp)
        body = b"" if failure else _read_all(resp, MAX_MANIFEST_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        failure = _describe(exc)
        body = b""
    finally:
        ex.close()
    log.add(
        RequestLog(
            "GET",
            ex.url,
            None,
            resp.status,
            len(body),
            time.monotonic() - started,
            failure or None,
            None,
            _header_dict(resp),
        )
    )
    if failure:
        raise PullError(f"pull model manifest: {failure}")
    if (resp.getheader("Content-Encoding") or "").lower() == "gzip":
        body = gzip.decompress(body)  # Go's transport asked for gzip, so it decodes it transparently
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise PullError(f"pull model manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise PullError("pull model manifest: not a JSON object")
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()

    layers: list[dict[str, Any]] = list(manifest.get("layers") or [])
    config = manifest.get("config")
    if isinstance(config, dict) and config.get("digest"):
        layers.append(config)  # Go: layers first, then the config
    wanted: list[tuple[str, int]] = []
    for layer in layers:
        digest = layer.get("digest") if isinstance(layer, dict) else None
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise PullError(f"invalid digest format: {digest!r}")
        if not isinstance(size, int) or size < 0:
            raise PullError(f"invalid size for {digest}: {size!r}")
        wanted.append((digest, size))

    blobs_dir = dest / "blobs"
    partial_dir = dest / "partial"
    blobs_dir.mkdir(parents=True, exist_ok=True)
    results: list[BlobResult] = []
    fetched: dict[str, Path] = {}
    cfg = _RangedConfig(
        stall_timeout,
        max_retries,
        max_stalls,
        retry_backoff,
        ssl_context,
        [("User-Agent", GO_USER_AGENT)],
        connect_to,
    )
    try:
        for digest, size in wanted:
            hexdigest = digest.removeprefix("sha256:")
            final = blobs_dir / f"sha256-{hexdigest}"
            if final.exists() or digest in fetched:
                results.append(BlobResult(digest, size, final, cached=True))
                continue
            blob_url = f"{base}/v2/{repo}/blobs/{digest}"
            # 2. HEAD for the size.
            head_size = _head_size(
                blob_url,
                registry_headers,
                log=log,
                ssl_context=ssl_context,
                timeout=request_timeout,
                connect_to=connect_to,
                auth=auth,
            )
            if head_size != size:
                raise PullError(
                    f"corrupt: HEAD Content-Length {head_size} != manifest size {size} for {digest}"
                )
            # 3. Discovery GET.
            location = _discover(
                blob_url,
                registry_headers,
                log=log,
                ssl_context=ssl_context,
                connect_to=connect_to,
                discovery_timeout=discovery_timeout,
                newer_discovery=newer_discovery,
                auth=auth,
            )
            # 4. Parallel ranges.
            partial = partial_dir / f"sha256-{hexdigest}-partial"
            fetched[digest] = partial
            parts = _download_ranged(
                location,
                head_size,
                partial,
                part_size_min=part_size_min,
                part_size_max=part_size_max,
                max_parts=max_parts,
                cfg=cfg,
                log=log,
                timeout=timeout,
            )
            results.append(BlobResult(digest, size, final, location=location, parts=parts))

        # 5. Verify every new blob; publish the good ones, delete the bad ones.
        mismatch: str | None = None
        for digest, partial in fetched.items():
            got = _file_digest(partial)
            if got != digest:
                partial.unlink(missing_ok=True)
                mismatch = mismatch or f"{DIGEST_MISMATCH}: want {digest}, got {got}"
                continue
            os.replace(partial, blobs_dir / f"sha256-{digest.removeprefix('sha256:')}")
        if mismatch:
            raise PullError(mismatch)
    finally:
        for partial in fetched.values():
            partial.unlink(missing_ok=True)

    manifest_path = dest.joinpath("manifests", _host_header(base + "/"), *names, tag)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, manifest_path)
    return PullResult(
        manifest_bytes=body,
        manifest_digest=manifest_digest,
        manifest=manifest,
        manifest_path=manifest_path,
        blobs=[(r.digest, r.size, r.path) for r in results],
        blob_results=results,
        requests=log.entries(),
        elapsed=time.monotonic() - started_all,
    )


# ----------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.support.puller BASE REPO TAG DEST``: pull and print a one-line JSON summary."""
    p = argparse.ArgumentParser(
        prog="python -m tests.support.puller", description="Go-style Ollama test puller"
    )
    p.add_argument("base", help="registry base URL, e.g. http://127.0.0.1:11434")
    p.add_argument("repo", help="namespace/model, e.g. library/tinyllama")
    p.add_argument("tag")
    p.add_argument("dest", help="models directory to write into")
    p.add_argument("--part-size-min", type=int, default=GO_MIN_PART_SIZE)
    p.add_argument("--part-size-max", type=int, default=GO_MAX_PART_SIZE)
    p.add_argument("--max-parts", type=int, default=NUM_DOWNLOAD_PARTS)
    p.add_argument("--stall-timeout", type=float, default=30.0)
    p.add_argument("--max-retries", type=int, default=6)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--user-agent", default=DEFAULT_USER_AGENT)
    args = p.parse_args(argv)
    try:
        result = pull(
            args.base,
            args.repo,
            args.tag,
            args.dest,
            part_size_min=args.part_size_min,
            part_size_max=args.part_size_max,
            max_parts=args.max_parts,
            stall_timeout=args.stall_timeout,
            max_retries=args.max_retries,
            timeout=args.timeout,
            user_agent=args.user_agent,
        )
    except PullError as exc:
        print(json.dumps({"error": str(exc)}), file=sys.stderr)
        return 1
    size = sum(s for _d, s, _p in result.blobs)
    print(
        json.dumps(
            {
                "manifest_digest": result.manifest_digest,
                "blobs": len(result.blobs),
                "bytes": size,
                "elapsed": round(result.elapsed, 6),
                "mb_per_s": round(size / result.elapsed / 1e6, 3) if result.elapsed > 0 else None,
                "requests": len(result.requests),
                "retries": sum(max(0, pt.attempts - 1) for b in result.blob_results for pt in b.parts),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
