"""A recording proxy: what a real client sends the mirror, and what the mirror answers, as plain data.

:class:`RecordingProxy` listens on ``127.0.0.1:<free port>`` and forwards every request, unchanged (the
``Host`` header included, so that a registry challenge still names the address the client asked), to a
target URL, streaming both bodies. For each exchange it keeps an :class:`Exchange`: method, path and
query, the request headers, a JSON request body, the status, the response headers, how many body bytes
reached the client and whether the client read to the end (the Go client hangs up on a blob's discovery
GET at once). Secrets never reach a record's fields that are written out: see :mod:`tests.support.vectors`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
PIECE = 64 * 1024
BODY_KEEP = 64 * 1024  # request and NDJSON response bodies up to this size are kept


@dataclass
class Exchange:
    seq: int
    method: str
    target: str  # path and query as sent
    request_headers: dict[str, str]
    request_body: bytes = b""  # its start (BODY_KEEP bytes)
    request_bytes: int = 0  # its length
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0
    complete: bool = False  # the client received the whole body
    response_body: bytes = b""  # the start of the body, for JSON and NDJSON answers
    started: float = 0.0
    ended: float = 0.0

    def request_json(self) -> Any:
        try:
            return json.loads(self.request_body) if self.request_body else None
        except ValueError:
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog (5) drops the 6th of 16 parallel connects for 1 s


class RecordingProxy:
    """Forward to ``target`` (``http://127.0.0.1:PORT``) and record every exchange in :attr:`exchanges`."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.exchanges: list[Exchange] = []
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="recorder", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def take(self, timeout: float = 30.0) -> list[Exchange]:
        """The exchanges recorded so far, in arrival order, and forget them (first waiting, a bounded
        time, for those still under way: a client that hung up is noticed on the next write)."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            taken, self.exchanges = sorted(self.exchanges, key=lambda e: e.seq), []
        return taken

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self
        counter = iter(range(1, 1 << 30))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    return b"".join(_read_chunks(self.rfile))
                length = int(self.headers.get("content-length") or 0)
                return self.rfile.read(length) if length else b""

            def _forward(self) -> None:
                with proxy._lock:
                    seq = next(counter)
                    proxy._in_flight += 1
                exchange = Exchange(
                    seq=seq,
                    method=self.command,
                    target=self.path,
                    request_headers={k.lower(): v for k, v in self.headers.items()},
                    started=time.monotonic(),
                )
                body = self._body()
                exchange.request_body = body[:BODY_KEEP]
                exchange.request_bytes = len(body)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers.pop("Content-Length", None)
                connection = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=600)
                try:
                    connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in headers.items():
                        connection.putheader(name, value)
                    if body or self.command in ("POST", "PUT", "PATCH"):
                        connection.putheader("Content-Length", str(len(body)))
                    connection.endheaders(body or None)
                    response = connection.getresponse()
                    self._relay(response, exchange)
                finally:
                    connection.close()
                    exchange.ended = time.monotonic()
                    with proxy._lock:
                        proxy.exchanges.append(exchange)
                        proxy._in_flight -= 1

            def _relay(self, response: http.client.HTTPResponse, exchange: Exchange) -> None:
                exchange.status = response.status
                exchange.response_headers = {k.lower(): v for k, v in response.getheaders()}
                length = response.getheader("content-length")
                chunked = length is None and self.command != "HEAD" and response.status not in (204, 304)
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                keep = exchange.response_headers.get("content-type", "").startswith(
                    ("application/json", "application/x-ndjson", "text/")
                )
                try:
                    self.wfile.flush()
                    if self.command == "HEAD":
                        exchange.complete = True
                        return
                    while True:
                        piece = response.read1(PIECE) if chunked else response.read(PIECE)
                        if not piece:
                            break
                        if chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        else:
                            self.wfile.write(piece)
                        self.wfile.flush()
                        exchange.body_bytes += len(piece)
                        if keep and len(exchange.response_body) < BODY_KEEP:
                            exchange.response_body += piece[: BODY_KEEP - len(exchange.response_body)]
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                        self.wfile.flush()
                    exchange.complete = True
                except (TimeoutError, BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up: so does the recording

            def do_GET(self) -> None:
                self._forward()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        return Handler


def _read_chunks(stream: Any) -> Iterator[bytes]:
    while True:
        size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            with contextlib.suppress(OSError):
                while stream.readline() not in (b"\r\n", b"\n", b""):
                    pass
            return
        yield stream.read(size)
        stream.readline()
