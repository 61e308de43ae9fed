"""A fault-injecting, byte-counting HTTP/1.1 reverse proxy to put between the mirror and its upstream.

``FaultProxy(upstream_base_url)`` listens on ``127.0.0.1`` (port 0 by default) and forwards every request
(method, path, headers with ``Host`` rewritten, body streamed) to the upstream, streaming each response body
back in bounded chunks (never a whole body in memory). Client connections are kept alive when possible:
upstream bodies with a ``Content-Length`` are passed through as they are, others are re-framed as chunked
(HTTP/1.1 clients) or close-delimited (HTTP/1.0 clients). A ``Location`` pointing at the upstream is
rewritten to point at the proxy, so that a client following it stays behind the proxy.
``keep_host=True`` forwards the client's ``Host`` as it came instead: a transparent link, for an upstream
that checks it (an S3 endpoint verifies the ``Host`` its client signed with AWS Signature Version 4).

It records, thread-safely, every request (``ProxyRecord``: method, path, the client's ``Range``, status,
response body bytes sent, faults applied, ...), and answers ``bytes_for(substring)`` /
``requests_for(substring)`` over the requests whose path contains ``substring``.

Fault knobs can be set at any time, from any thread. Each applies to requests whose path (the request target
as received, query included) contains ``path`` (default: every request) and, if ``method`` is given, whose
method is that one; ``times`` is how many such requests it applies to (``None``: all of them). The body
faults (``cut_after``, ``corrupt``, ``stall_after``) apply only to responses that have a body and a 200 or
206 status, and a request consumes a ``times`` count only when the fault was applied to it. ``fail`` is
checked first, then the body faults (at most one of cut/stall per response; corrupt combines with them).

Every sleep is bounded and interrupted by ``stop()``/``down()``; ``stop()`` returns within a few seconds even
while requests are stalled. Usage::

    with FaultProxy("http://127.0.0.1:5000") as proxy:
        proxy.cut_after(1_000_000, times=1, path="/blobs/")
        ...  # point the mirror at proxy.url
        assert proxy.bytes_for("/blobs/") < 2 * blob_size
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["FaultProxy", "ProxyRecord"]

LISTEN_HOST = "127.0.0.1"
CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
BLOB_MARK = "/blobs/sha256:"


@dataclass
class ProxyRecord:
    """One request as the proxy saw and answered it."""

    method: str
    path: str
    range: str | None
    client: str
    host: str | None
    started: float
    status: int | None = None
    bytes_sent: int = 0
    upstream_range: str | None = None
    forwarded: bool = False
    faults: list[str] = field(default_factory=list)
    error: str | None = None
    elapsed: float | None = None
    done: bool = False


@dataclass
class _Rule:
    kind: str
    path: str
    method: str | None
    remaining: int | None
    status: int = 503
    nbytes: int = 0
    offset: int = 0
    seconds: float = 0.0
    body: bytes | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path in path


class _ClientGone(Exception):
    """The client connection broke (or was killed) while we were writing to it."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128  # the default 5 drops SYNs under 16 parallel connects (1 s retransmit)

    def __init__(self, address: tuple[str, int], proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients hanging up is normal here."""


class _Bucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.tokens = burst
        self.burst = burst
        self.last = time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultproxy"
    timeout = 60.0  # bounds an idle keep-alive connection

    proxy: FaultProxy
    _abort: threading.Event
    _upstream_sock: socket.socket | None
    _bucket: _Bucket | None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.proxy = cast(_Server, self.server).proxy
        self._abort = threading.Event()
        self._upstream_sock = None
        self._bucket = None
        self.proxy._register(self)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.proxy._unregister(self)

    def handle(self) -> None:
        if self.proxy._closing_connections():
            self.close_connection = True
            self.kill()
            return
        with contextlib.suppress(OSError):
            super().handle()

    def handle_one_request(self) -> None:
        if self.proxy._closing_connections() or self._abort.is_set():
            self.close_connection = True
            return
        super().handle_one_request()

    def kill(self) -> None:
        """Abort this connection now: wake any sleep, break both sockets."""
        self._abort.set()
        for sock in (self.connection, self._upstream_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    # -- helpers ---------------------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False if the connection was aborted meanwhile (stop/down)."""
        return not self._abort.wait(max(0.0, seconds))

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._abort.is_set():
            raise _ClientGone("connection aborted by the proxy")
        try:
            self.wfile.write(data)
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    def _iter_request_body(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _ClientGone("request body cut")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exact(size)
                self.rfile.readline(3)
        length = self.headers.get("Content-Length")
        if length:
            yield from self._read_exact(int(length))

    def _read_exact(self, n: int) -> Iterator[bytes]:
        while n > 0:
            data = self.rfile.read(min(n, CHUNK))
            if not data:
                raise _ClientGone("request body cut")
            n -= len(data)
            yield data

    def _drain_request_body(self) -> None:
        for _ in self._iter_request_body():
            pass

    def _simple_response(
        self,
        rec: ProxyRecord,
        status: int,
        body: bytes,
        content_type: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        self._drain_request_body()
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc
        self.proxy._update(rec, status=status)
        if self.command != "HEAD" and body:
            self._write(body)
            self.proxy._update(rec, add_bytes=len(body))

    # -- the proxy -------------------------------------------------------------------------------------

    def do_proxy(self) -> None:
        rec = self.proxy._new_record(
            self.command,
            self.path,
            self.headers.get("Range"),
            f"{self.client_address[0]}:{self.client_address[1]}",
            self.headers.get("Host"),
        )
        try:
            self._serve(rec)
        except (_ClientGone, OSError, http.client.HTTPException, ValueError) as exc:
            self.close_connection = True
            self.proxy._update(rec, error=f"{type(exc).__name__}: {exc}")
            self.kill()
        finally:
            self.proxy._finish(rec)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_proxy

    def _serve(self, rec: ProxyRecord) -> None:
        proxy = self.proxy
        method = self.command
        target = self.path
        split = urlsplit(target)
        query = parse_qsl(split.query, keep_blank_values=True)
        sig = next((v for k, v in query if k == "sig"), None)

        # Signed (redirected) URLs: check expiry, then serve the path with the query stripped.
        if sig is not None:
            if not proxy._signature_valid(sig):
                proxy._note_fault(rec, "expired")
                body = (
                    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b"<Message>Request has expired</Message></Error>"
                )
                self._simple_response(rec, 403, body, "application/xml")
                return
            rest = [(k, v) for k, v in query if k != "sig"]
            target = split.path + ("?" + urlencode(rest) if rest else "")
        elif proxy._should_redirect(method, target):
            location = proxy._signed_location(target)
            proxy._note_fault(rec, "redirect")
            self._simple_response(rec, 307, b"", "text/plain", {"Location": location})
            return

        rule = proxy._take_rule("fail", method, self.path)
        if rule is not None:
            proxy._note_fault(rec, f"fail:{rule.status}")
            message = f"faultproxy: injected {rule.status}"
            fail_body = rule.body
            if fail_body is None:
                fail_body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": message}]}).encode()
            self._simple_response(rec, rule.status, fail_body, "application/json")
            return

        self._forward(rec, method, target)

    def _forward(self, rec: ProxyRecord, method: str, target: str) -> None:
        proxy = self.proxy
        up = proxy._upstream
        connection_tokens = {
            t.strip().lower() for t in self.headers.get("Connection", "").split(",") if t.strip()
        }
        strip_range = proxy._ignoring_range(self.path)
        host = self.headers.get("Host") if proxy._keep_host else None
        headers: list[tuple[str, str]] = [("Host", host or up.netloc)]
        chunked_request = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        for name, value in self.headers.items():
            low = name.lower()
            if low in HOP_BY_HOP or low in connection_tokens or low in ("host", "expect"):
                continue
            if strip_range and low in ("range", "if-range"):
                continue
            if low == "range":
                proxy._update(rec, upstream_range=value)
            headers.append((name, value))
        if strip_range and rec.range is not None:
            proxy._note_fault(rec, "ignore_range")
        if chunked_request:
            headers.append(("Transfer-Encoding", "chunked"))

        conn = proxy._upstream_connection()
        try:
            try:
                conn.connect()
            except OSError as exc:
                body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": f"upstream: {exc}"}]})
                self._simple_response(rec, 502, body.encode(), "application/json")
                return
            self._upstream_sock = conn.sock
            if self._abort.is_set():
                raise _ClientGone("aborted")
            conn.putrequest(method, up.prefix + target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            for data in self._iter_request_body():
                conn.send(b"%x\r\n%s\r\n" % (len(data), data) if chunked_request else data)
            if chunked_request:
                conn.send(b"0\r\n\r\n")
            resp = conn.getresponse()
            proxy._update(rec, forwarded=True)
            self._relay(rec, method, resp)
        finally:
            self._upstream_sock = None
            with contextlib.suppress(Exception):
                conn.close()

    def _relay(self, rec: ProxyRecord, method: str, resp: http.client.HTTPResponse) -> None:
        proxy = self.proxy
        status = resp.status
        has_body = method != "HEAD" and status >= 200 and status not in (204, 304)
        cut: _Rule | None = None
        corrupt: _Rule | None = None
        if has_body and status in (200, 206):
            cut = proxy._take_rule("cut", method, self.path) or proxy._take_rule("stall", method, self.path)
            corrupt = proxy._take_rule("corrupt", method, self.path)
        for rule in (cut, corrupt):
            if rule is not None:
                proxy._note_fault(rec, rule.kind)

        upstream_tokens = {
            t.strip().lower() for t in (resp.getheader("Connection") or "").split(",") if t.strip()
        }
        self.send_response_only(status, resp.reason)
        has_length = False
        for name, value in resp.getheaders():
            low = name.lower()
            if low in HOP_BY_HOP or low in upstream_tokens:
                continue
            if low == "content-length":
                has_length = True
            if low in ("location", "content-location"):
                self.send_header(name, proxy._rewrite_location(value))
            else:
                self.send_header(name, value)
        chunked = False
        if has_body and not has_length:
            if self.request_version == "HTTP/1.1":
                chunked = True
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc
        proxy._update(rec, status=status)
        if not has_body:
            return

        limit = cut.nbytes if cut is not None else None
        sent = 0
        while True:
            want = CHUNK
            rate = proxy._rate_for(self.path)
            if rate is not None:
                want = max(1, min(want, int(rate / 20)))
            if limit is not None:
                want = min(want, limit - sent)
                if want <= 0:
                    break
            data = resp.read1(want)
            if not data:
                break
            if corrupt is not None and sent <= corrupt.offset < sent + len(data):
                buf = bytearray(data)
                buf[corrupt.offset - sent] ^= 0xFF
                data = bytes(buf)
            if rate is not None and not self._throttle(len(data), rate):
                raise _ClientGone("aborted while throttled")
            self._write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
            proxy._update(rec, add_bytes=len(data))

        if cut is not None and limit is not None and sent >= limit:
            if cut.kind == "stall":
                self._sleep(cut.seconds)
            self.close_connection = True
            self.kill()  # abrupt: the client sees a short body
            return
        if resp.length:  # the upstream body ended early: pass the truncation on
            self.close_connection = True
            self.kill()
            return
        if chunked:
            self._write(b"0\r\n\r\n")

    def _throttle(self, n: int, rate: float) -> bool:
        bucket = self._bucket
        if bucket is None or bucket.rate != rate:
            bucket = self._bucket = _Bucket(rate, burst=max(1.0, rate / 20))
        now = time.monotonic()
        bucket.tokens = min(bucket.burst, bucket.tokens + (now - bucket.last) * rate)
        bucket.last = now
        bucket.tokens -= n
        if bucket.tokens < 0:
            return self._sleep(-bucket.tokens / rate)
        return True


@dataclass(frozen=True)
class _Upstream:
    scheme: str
    host: str
    port: int
    netloc: str
    prefix: str
    origin: str


class FaultProxy:
    """A threaded reverse proxy on ``127.0.0.1`` in front of ``upstream_base_url`` (see the module doc)."""

    def __init__(
        self,
        upstream_base_url: str,
        *,
        port: int = 0,
        upstream_timeout: float = 30.0,
        upstream_ssl_context: ssl.SSLContext | None = None,
        keep_host: bool = False,
    ) -> None:
        parts = urlsplit(upstream_base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad upstream URL {upstream_base_url!r}")
        default_port = 443 if parts.scheme == "https" else 80
        port_up = parts.port or default_port
        self._upstream = _Upstream(
            scheme=parts.scheme,
            host=parts.hostname,
            port=port_up,
            netloc=parts.netloc.rsplit("@", 1)[-1],
            prefix=parts.path.rstrip("/"),
            origin=f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}",
        )
        self._upstream_timeout = upstream_timeout
        self._upstream_ssl_context = upstream_ssl_context
        self._keep_host = keep_host
        self._requested_port = port
        self._port = 0
        self._lock = threading.Lock()
        self._records: list[ProxyRecord] = []
        self._rules: list[_Rule] = []
        self._throttles: list[tuple[str, float]] = []
        self._ignore_range: str | None = None
        self._redirect_host: str | None = None
        self._redirect_head = False
        self._redirect_expiry: float | None = None
        self._sig_counter = 0
        self._down_mode: str | None = None
        self._stopped = threading.Event()
        self._handlers: set[_Handler] = set()
        self._threads: set[threading.Thread] = set()
        self._server: _Server | None = None
        self._server_thread: threading.Thread | None = None
        self._cond = threading.Condition(self._lock)

    # -- lifecycle -----------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (fixed at ``start()``; kept across ``down()``/``up()``)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the base URL to give the mirror as its upstream."""
        return f"http://{LISTEN_HOST}:{self._port}"

    @property
    def upstream_url(self) -> str:
        return self._upstream.origin + self._upstream.prefix

    def start(self) -> FaultProxy:
        """Bind and start serving (returns self)."""
        if self._server is not None:
            return self
        self._stopped.clear()
        self._start_server(self._requested_port)
        return self

    def stop(self, timeout: float = 3.0) -> None:
        """Stop listening, abort every open connection (stalled ones too) and join the handler threads."""
        self._stopped.set()
        self._stop_server()
        self._kill_all()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_server(self, port: int) -> None:
        deadline = time.monotonic() + 3.0
        while True:
            try:
                server = _Server((LISTEN_HOST, port), self)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or port == 0 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True
        )
        thread.start()
        self._server, self._server_thread = server, thread

    def _stop_server(self) -> None:
        server, thread = self._server, self._server_thread
        self._server = self._server_thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(2.0)

    def _kill_all(self) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.kill()

    def _register(self, handler: _Handler) -> None:
        with self._lock:
            self._handlers.add(handler)
            self._threads.add(threading.current_thread())

    def _unregister(self, handler: _Handler) -> None:
        with self._lock:
            self._handlers.discard(handler)
            self._threads.discard(threading.current_thread())

    def _closing_connections(self) -> bool:
        return self._stopped.is_set() or self._down_mode is not None

    def _upstream_connection(self) -> http.client.HTTPConnection:
        up = self._upstream
        if up.scheme == "https":
            return http.client.HTTPSConnection(
                up.host,
                up.port,
                timeout=self._upstream_timeout,
                context=self._upstream_ssl_context or ssl.create_default_context(),
            )
        return http.client.HTTPConnection(up.host, up.port, timeout=self._upstream_timeout)

    # -- fault knobs -------------------------------------------------------------------------------------

    def _add_rule(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def fail(
        self,
        status: int = 503,
        times: int | None = None,
        *,
        path: str = "",
        method: str | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer matching requests with ``status`` and a small JSON body, without contacting the upstream.

        The default body is registry-style: ``{"errors":[{"code":"UNAVAILABLE","message":...}]}``.
        """
        self._add_rule(_Rule("fail", path, method, times, status=status, body=body))

    def cut_after(
        self, nbytes: int, times: int | None = None, *, path: str = "", method: str | None = None
    ) -> None:
        """Forward the headers, then only ``nbytes`` of the body, then break the connection (a short body)."""
        self._add_rule(_Rule("cut", path, method, times, nbytes=nbytes))

    def corrupt(
        self, offset: int, times: int | None = None, *, path: str = "", method: str | None = None
    ) -> None:
        """Flip (xor 0xFF) the byte at ``offset`` of the response body (relative to its first byte)."""
        self._add_rule(_Rule("corrupt", path, method, times, offset=offset))

    def stall_after(
        self,
        nbytes: int,
        seconds: float,
        times: int | None = None,
        *,
        path: str = "",
        method: str | None = None,
    ) -> None:
        """Send ``nbytes`` of the body, then nothing for ``seconds`` (cut short by stop/down), then close."""
        self._add_rule(_Rule("stall", path, method, times, nbytes=nbytes, seconds=seconds))

    def throttle(self, bytes_per_second: float | None, *, path: str = "") -> None:
        """Limit response bodies to ``bytes_per_second`` per client connection (token bucket, 50 ms burst).

        ``None`` removes every throttle. Several calls with different ``path`` substrings add up; the first
        matching one applies.
        """
        with self._lock:
            if bytes_per_second is None:
                self._throttles.clear()
            else:
                self._throttles = [(p, r) for p, r in self._throttles if p != path]
                self._throttles.append((path, float(bytes_per_second)))

    def ignore_range(self, enabled: bool = True, *, path: str = "") -> None:
        """Strip ``Range``/``If-Range`` from matching requests: the upstream answers 200 + the whole body."""
        with self._lock:
            self._ignore_range = path if enabled else None

    def redirect_blobs(self, to_host: str | None = "localhost", *, head: bool = False) -> None:
        """Answer blob GETs (path contains ``/blobs/sha256:``) with ``307`` to a signed URL on ``to_host``.

        The Location is ``http://<to_host>:<port><path>?sig=...``: the proxy itself under another hostname,
        like registry.ollama.ai's 307 to presigned storage URLs. Requests carrying ``?sig=`` are served (the
        query stripped before forwarding). ``head=True`` redirects HEADs too. ``None`` turns it off (URLs
        already handed out keep working).
        """
        with self._lock:
            self._redirect_host = to_host
            self._redirect_head = head

    def expire_redirects_after(self, seconds: float | None) -> None:
        """Signed URLs older than ``seconds`` answer ``403`` AccessDenied (like expired presigned URLs)."""
        with self._lock:
            self._redirect_expiry = seconds

    def down(self, mode: str = "refuse") -> None:
        """Make the upstream unreachable and break every open connection.

        ``mode="refuse"`` closes the listening socket (connections are refused); ``mode="close"`` keeps
        accepting but closes each connection at once without an answer.
        """
        if mode not in ("refuse", "close"):
            raise ValueError("mode must be 'refuse' or 'close'")
        with self._lock:
            self._down_mode = mode
        if mode == "refuse":
            self._stop_server()
        self._kill_all()

    def up(self) -> None:
        """Undo ``down()``: listen again on the same port."""
        with self._lock:
            mode, self._down_mode = self._down_mode, None
        if mode == "refuse" and not self._stopped.is_set() and self._server is None:
            self._start_server(self._port)

    @property
    def is_down(self) -> bool:
        return self._down_mode is not None

    def clear_faults(self) -> None:
        """Remove every fault (rules, throttles, ignore_range, redirects, expiry); ``up()`` if down."""
        with self._lock:
            self._rules.clear()
            self._throttles.clear()
            self._ignore_range = None
            self._redirect_host = None
            self._redirect_head = False
            self._redirect_expiry = None
        if self._down_mode is not None:
            self.up()

    def clear_records(self) -> None:
        """Forget the recorded requests (counters back to 0)."""
        with self._lock:
            self._records.clear()

    def reset(self) -> None:
        """Clear faults and counters."""
        self.clear_faults()
        self.clear_records()

    # -- observations ----------------------------------------------------------------------------------

    def records(self, path_substring: str = "") -> list[ProxyRecord]:
        """Copies of the recorded requests whose path contains ``path_substring``, oldest first."""
        with self._lock:
            return [replace(r, faults=list(r.faults)) for r in self._records if path_substring in r.path]

    def bytes_for(self, path_substring: str = "") -> int:
        """Response body bytes sent to clients for requests whose path contains ``path_substring``."""
        with self._lock:
            return sum(r.bytes_sent for r in self._records if path_substring in r.path)

    def requests_for(self, path_substring: str = "", method: str | None = None) -> int:
        """How many requests (optionally of ``method``) had a path containing ``path_substring``."""
        with self._lock:
            return sum(
                1
                for r in self._records
                if path_substring in r.path and (method is None or r.method == method.upper())
            )

    def wait_for_requests(
        self, path_substring: str, count: int, timeout: float = 5.0, *, done: bool = True
    ) -> bool:
        """Wait up to ``timeout`` s until ``count`` matching requests were seen (and done, if ``done``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                n = sum(1 for r in self._records if path_substring in r.path and (r.done or not done))
                if n >= count:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    # -- internals used by the handler -----------------------------------------------------------------

    def _new_record(
        self, method: str, path: str, rng: str | None, client: str, host: str | None
    ) -> ProxyRecord:
        rec = ProxyRecord(
            method=method, path=path, range=rng, client=client, host=host, started=time.monotonic()
        )
        with self._cond:
            self._records.append(rec)
            self._cond.notify_all()
        return rec

    def _update(
        self,
        rec: ProxyRecord,
        *,
        status: int | None = None,
        add_bytes: int = 0,
        forwarded: bool | None = None,
        error: str | None = None,
        upstream_range: str | None = None,
    ) -> None:
        with self._lock:
            if status is not None:
                rec.status = status
            rec.bytes_sent += add_bytes
            if forwarded is not None:
                rec.forwarded = forwarded
            if error is not None:
                rec.error = error
            if upstream_range is not None:
                rec.upstream_range = upstream_range

    def _note_fault(self, rec: ProxyRecord, name: str) -> None:
        with self._lock:
            rec.faults.append(name)

    def _finish(self, rec: ProxyRecord) -> None:
        with self._cond:
            rec.elapsed = time.monotonic() - rec.started
            rec.done = True
            self._cond.notify_all()

    def _take_rule(self, kind: str, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.kind == kind and rule.matches(method, path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return replace(rule)
        return None

    def _rate_for(self, path: str) -> float | None:
        with self._lock:
            for substring, rate in self._throttles:
                if substring in path:
                    return rate
        return None

    def _ignoring_range(self, path: str) -> bool:
        with self._lock:
            return self._ignore_range is not None and self._ignore_range in path

    def _should_redirect(self, method: str, path: str) -> bool:
        with self._lock:
            if self._redirect_host is None or BLOB_MARK not in path:
                return False
            return method == "GET" or (method == "HEAD" and self._redirect_head)

    def _signed_location(self, target: str) -> str:
        with self._lock:
            self._sig_counter += 1
            sig = f"{time.monotonic_ns()}-{self._sig_counter}"
            host = self._redirect_host or LISTEN_HOST
        split = urlsplit(target)
        query = urlencode([*parse_qsl(split.query, keep_blank_values=True), ("sig", sig)])
        return f"http://{host}:{self._port}{split.path}?{query}"

    def _signature_valid(self, sig: str) -> bool:
        try:
            issued = int(sig.split("-", 1)[0])
        except ValueError:
            return False
        with self._lock:
            expiry = self._redirect_expiry
        return expiry is None or (time.monotonic_ns() - issued) / 1e9 <= expiry

    def _rewrite_location(self, value: str) -> str:
        origin = self._upstream.origin
        if value.startswith(origin + "/") or value == origin:
            return self.url + value[len(origin) :]
        return value
