"""A stand-in for the backend Ollama that the mirror's inference proxy forwards to.

:class:`OllamaBackend` serves, from a thread on ``127.0.0.1`` (port 0 by default), enough of Ollama's
inference API for the official ``ollama`` Python client (0.6.x) and OpenAI-style clients:

- ``POST /api/generate`` without a prompt and with ``keep_alive`` 0 (an unload, as ``ollama rm`` sends):
  ``{"done": true, "done_reason": "unload"}`` in one JSON object, as Ollama answers.
- ``POST /api/chat`` and ``POST /api/generate``: with ``"stream"`` true (the default, as in Ollama) an
  ``application/x-ndjson`` stream in chunked transfer encoding, one token per line, each chunk flushed and
  separated by ``delay`` seconds, then a final ``{"done": true, "done_reason": "stop", ...}`` line; with
  ``"stream": false`` one JSON object. Chat lines carry ``"message": {"role": "assistant", "content": tok}``,
  generate lines ``"response": tok``. ``options.num_predict`` in the request sets how many tokens are sent
  (default: :attr:`OllamaBackend.tokens`, cycled).
- ``POST /api/embed`` (``{"embeddings": [[...], ...]}``, one vector per input) and ``POST /api/embeddings``
  (``{"embedding": [...]}``).
- ``GET /api/ps`` → ``{"models": []}``; ``GET|HEAD /api/version``; ``GET|HEAD /`` → ``Ollama is running``.
- ``GET /v1/models`` (OpenAI list) and ``POST /v1/chat/completions`` (server-sent events ``data: {...}``
  then ``data: [DONE]`` when streaming, one ``chat.completion`` object otherwise).

A model named in :attr:`OllamaBackend.missing` answers 404 ``{"error": "model 'x' not found"}`` as Ollama does.

Every request is recorded (:class:`BackendRequest`: method, path, headers, body, parsed JSON), and every
streamed response too (:class:`BackendStream`): how many chunks went out, whether it ended normally, and
whether the client went away mid-stream, seen either as a write failing with ``BrokenPipeError`` /
``ConnectionResetError`` or as end-of-file on the socket while waiting between chunks (a client that hung
up). Tests wait on those with bounded waits (:meth:`BackendStream.wait_client_gone`). Usage::

    with OllamaBackend(delay=0.2) as backend:
        ...  # start the mirror with overrides={"backend.url": backend.url}
        assert backend.requests_for("/api/chat")[0].json["model"] == "tiny"
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

__all__ = ["DEFAULT_TOKENS", "BackendRequest", "BackendStream", "OllamaBackend"]

LISTEN_HOST = "127.0.0.1"
DEFAULT_TOKENS: tuple[str, ...] = ("Hello", ",", " I", " am", " a", " test", " backend", ".")
EMBEDDING_DIMENSIONS = 8
MAX_BODY = 16 * 1024 * 1024
CLIENT_GONE_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass
class BackendRequest:
    """One request as the backend received it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received: float  # time.monotonic()

    @property
    def json(self) -> Any:
        """The body parsed as JSON (``None`` if empty or not JSON)."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


@dataclass
class BackendStream:
    """One streamed response: its progress and how it ended."""

    path: str
    model: str
    planned_chunks: int  # data chunks the backend meant to send (the final "done" line not counted)
    started: float
    chunks_sent: int = 0
    chunk_times: list[float] = field(default_factory=list)  # time.monotonic() at each flush
    error: str | None = None
    completed: threading.Event = field(default_factory=threading.Event)
    client_gone: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def wait_client_gone(self, timeout: float) -> bool:
        """True once the client went away mid-stream (within ``timeout`` seconds)."""
        return self.client_gone.wait(timeout)

    def wait_ended(self, timeout: float) -> bool:
        """True once the stream ended, whichever way (within ``timeout`` seconds)."""
        return self.ended.wait(timeout)


class _ClientGone(Exception):
    """The client connection broke while the backend was streaming to it."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], backend: OllamaBackend) -> None:
        self.backend = backend
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: clients hanging up is what some tests are about."""


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ollama-test-backend"
    timeout = 30.0  # bounds an idle keep-alive connection

    backend: OllamaBackend

    def setup(self) -> None:
        super().setup()
        self.backend = cast(_Server, self.server).backend
        self.backend._register(self.connection)

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.backend._unregister(self.connection)

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr."""

    # -- plumbing --------------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            pieces: list[bytes] = []
            total = 0
            while True:
                size_line = self.rfile.readline(1024)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("request body too large")
                pieces.append(self.rfile.read(size))
                self.rfile.readline(16)
            return b"".join(pieces)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, document: Any) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self._write_chunk(b"")  # (empty: only flushes the headers)

    def _write_chunk(self, data: bytes) -> None:
        try:
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except CLIENT_GONE_ERRORS as exc:
            raise _ClientGone(f"{type(exc).__name__}: {exc}") from exc

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except CLIENT_GONE_ERRORS as exc:
            raise _ClientGone(f"{type(exc).__name__}: {exc}") from exc

    def _peer_closed(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as the peer closed its side (EOF) or reset the connection."""
        deadline = time.monotonic() + max(0.0, seconds)
        sock = self.connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                readable, _, _ = select.select([sock], [], [], left)
            except (OSError, ValueError):
                return True
            if not readable:
                return False
            try:
                peeked = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError:
                return True
            if not peeked:
                return True
            # Data from the client mid-stream (not expected): do not spin on it.
            time.sleep(min(left, 0.01))

    def _stream(
        self,
        path: str,
        model: str,
        content_type: str,
        pieces: Sequence[bytes],
        final: bytes,
    ) -> None:
        """Send ``pieces`` one chunk each, ``delay`` apart, then ``final``; record how it went."""
        record = self.backend._new_stream(path, model, len(pieces))
        try:
            self._start_stream(content_type)
            for index, piece in enumerate(pieces):
                if index and self._peer_closed(self.backend.delay):
                    raise _ClientGone("the client closed the connection")
                self._write_chunk(piece)
                record.chunks_sent += 1
                record.chunk_times.append(time.monotonic())
            if pieces and self._peer_closed(self.backend.delay):
                raise _ClientGone("the client closed the connection")
            self._write_chunk(final)
            self._end_stream()
            record.completed.set()
        except _ClientGone as exc:
            record.error = str(exc)
            record.client_gone.set()
            self.close_connection = True
        finally:
            record.ended.set()

    # -- routes ----------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._send_error(400, str(exc))
            return
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.backend._record(BackendRequest(self.command, path, headers, body, time.monotonic()))
        routes: dict[tuple[str, str], Callable[[Any], None]] = {
            ("POST", "/api/chat"): self._chat,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embeddings,
            ("GET", "/api/ps"): self._ps,
            ("GET", "/api/version"): self._version,
            ("HEAD", "/api/version"): self._version,
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/chat/completions"): self._openai_chat,
        }
        route = routes.get((self.command, path))
        if route is None:
            self._send_error(404, "404 page not found")
            return
        document: Any = None
        if self.command == "POST":
            try:
                document = json.loads(body or b"{}")
            except ValueError as exc:
                self._send_error(400, f"invalid character in request body: {exc}")
                return
            if not isinstance(document, dict):
                self._send_error(400, "request body must be a JSON object")
                return
            model = document.get("model")
            if not isinstance(model, str) or not model:
                self._send_error(400, "model is required")
                return
            if model in self.backend.missing:
                self._send_error(404, f"model '{model}' not found")
                return
        route(document)

    def _tokens(self, document: dict[str, Any]) -> list[str]:
        options = document.get("options") or {}
        count = options.get("num_predict") if isinstance(options, dict) else None
        tokens = list(self.backend.tokens)
        if isinstance(count, int) and count > 0:
            return list(itertools.islice(itertools.cycle(tokens), count))
        return tokens

    @staticmethod
    def _line(document: dict[str, Any]) -> bytes:
        return json.dumps(document, separators=(",", ":")).encode() + b"\n"

    @staticmethod
    def _stats(n_tokens: int) -> dict[str, Any]:
        return {
            "total_duration": 1_000_000 * (n_tokens + 1),
            "load_duration": 1_000_000,
            "prompt_eval_count": 3,
            "prompt_eval_duration": 1_000_000,
            "eval_count": n_tokens,
            "eval_duration": 1_000_000 * n_tokens,
        }

    def _chat(self, document: dict[str, Any]) -> None:
        model, tokens = document["model"], self._tokens(document)
        if document.get("stream", True) is False:
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": "".join(tokens)},
                    "done": True,
                    "done_reason": "stop",
                    **self._stats(len(tokens)),
                },
            )
            return
        pieces = [
            self._line(
                {
                    "model": model,
                    "created_at": _now_rfc3339(),
                    "message": {"role": "assistant", "content": token},
                    "done": False,
                }
            )
            for token in tokens
        ]
        final = self._line(
            {
                "model": model,
                "created_at": _now_rfc3339(),
                "message": {"role": "assistant", "content": ""},
                "done": True,
                "done_reason": "stop",
                **self._stats(len(tokens)),
            }
        )
        self._stream("/api/chat", model, "application/x-ndjson", pieces, final)

    def _generate(self, document: dict[str, Any]) -> None:
        model, tokens = document["model"], self._tokens(document)
        if not document.get("prompt") and document.get("keep_alive") in (0, "0", "0s"):
            # Ollama's unload request (what `ollama stop` and `ollama rm` send): one JSON answer
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now_rfc3339(),
                    "response": "",
                    "done": True,
                    "done_reason": "unload",
                },
            )
            return
        if document.get("stream", True) is False:
            self._send_json(
                200,
                {
                    "model": model,
                    "created_at": _now_rfc3339(),
                    "response": "".join(tokens),
                    "done": True,
                    "done_reason": "stop",
                    "context": [1, 2, 3],
                    **self._stats(len(tokens)),
                },
            )
            return
        pieces = [
            self._line({"model": model, "created_at": _now_rfc3339(), "response": token, "done": False})
            for token in tokens
        ]
        final = self._line(
            {
                "model": model,
                "created_at": _now_rfc3339(),
                "response": "",
                "done": True,
                "done_reason": "stop",
                "context": [1, 2, 3],
                **self._stats(len(tokens)),
            }
        )
        self._stream("/api/generate", model, "application/x-ndjson", pieces, final)

    @staticmethod
    def _vector(text: str) -> list[float]:
        seed = sum(text.encode()) or 1
        return [round(((seed * (i + 1)) % 97 + 1) / 100, 6) for i in range(EMBEDDING_DIMENSIONS)]

    def _embed(self, document: dict[str, Any]) -> None:
        given = document.get("input", "")
        inputs = [given] if isinstance(given, str) else [str(item) for item in given or []]
        self._send_json(
            200,
            {
                "model": document["model"],
                "embeddings": [self._vector(text) for text in inputs],
                "total_duration": 1_000_000,
                "load_duration": 1_000,
                "prompt_eval_count": len(inputs),
            },
        )

    def _embeddings(self, document: dict[str, Any]) -> None:
        self._send_json(200, {"embedding": self._vector(str(document.get("prompt", "")))})

    def _ps(self, _document: Any) -> None:
        self._send_json(200, {"models": []})

    def _version(self, _document: Any) -> None:
        self._send_json(200, {"version": "0.0.0-test"})

    def _root(self, _document: Any) -> None:
        body = b"Ollama is running"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _openai_models(self, _document: Any) -> None:
        self._send_json(
            200,
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 1700000000, "owned_by": "library"}
                    for name in self.backend.models
                ],
            },
        )

    def _openai_chat(self, document: dict[str, Any]) -> None:
        model = document["model"]
        limit = document.get("max_tokens")
        tokens = list(self.backend.tokens)
        if isinstance(limit, int) and limit > 0:
            tokens = list(itertools.islice(itertools.cycle(tokens), limit))
        created = int(time.time())
        base = {"id": "chatcmpl-1", "created": created, "model": model, "system_fingerprint": "fp_ollama"}
        if not document.get("stream"):
            self._send_json(
                200,
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": len(tokens),
                        "total_tokens": 3 + len(tokens),
                    },
                },
            )
            return

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

        pieces = [event({"role": "assistant", "content": token}, None) for token in tokens]
        final = event({"role": "assistant", "content": ""}, "stop") + b"data: [DONE]\n\n"
        self._stream("/v1/chat/completions", model, "text/event-stream", pieces, final)


class OllamaBackend:
    """A threaded fake Ollama inference server on ``127.0.0.1`` (see the module doc); started at construction.

    ``delay`` is the pause between streamed chunks; ``tokens`` what a stream sends (one chunk each);
    ``models`` what ``/v1/models`` lists; ``missing`` model names that answer 404. All may be changed while
    it runs.
    """

    def __init__(
        self,
        *,
        delay: float = 0.2,
        tokens: Sequence[str] = DEFAULT_TOKENS,
        models: Sequence[str] = ("tiny:latest",),
        missing: Sequence[str] = (),
        port: int = 0,
    ) -> None:
        self.delay = delay
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.models: tuple[str, ...] = tuple(models)
        self.missing: frozenset[str] = frozenset(missing)
        self._lock = threading.Lock()
        self._requests: list[BackendRequest] = []
        self._streams: list[BackendStream] = []
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = _Server((LISTEN_HOST, port), self)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the mirror's ``backend.url``."""
        return f"http://{LISTEN_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        """Stop listening and break every open connection (the port then refuses connections). Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5.0)

    def __enter__(self) -> OllamaBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<OllamaBackend {self.url}{'' if self.running else ' stopped'}>"

    # -- records ---------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[BackendRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str, method: str | None = None) -> list[BackendRequest]:
        """The requests whose path is exactly ``path`` (and whose method is ``method``, if given)."""
        return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    @property
    def streams(self) -> list[BackendStream]:
        """Every streamed response so far, oldest first (a copy)."""
        with self._lock:
            return list(self._streams)

    def wait_for_stream(self, path: str, timeout: float, index: int = 0) -> BackendStream:
        """The ``index``-th stream on ``path``, waiting up to ``timeout`` s for it to start."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.streams if s.path == path]
            if len(found) > index:
                return found[index]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no stream #{index} on {path} within {timeout:g} s")
            time.sleep(0.02)

    def clear(self) -> None:
        """Forget the recorded requests and streams."""
        with self._lock:
            self._requests.clear()
            self._streams.clear()

    def _record(self, request: BackendRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _new_stream(self, path: str, model: str, planned: int) -> BackendStream:
        record = BackendStream(path=path, model=model, planned_chunks=planned, started=time.monotonic())
        with self._lock:
            self._streams.append(record)
        return record

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.add(sock)

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.discard(sock)
