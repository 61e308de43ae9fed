"""The inference proxy: ``/api/generate``, ``/api/chat``, ``/v1/*``... forwarded to a backend Ollama.

The backend runs on the mirror's cache (``OLLAMA_MODELS=<cache dir>``), so it can run every cached
model.  Responses are relayed as they arrive: the backend connection is the client response's
producer, so a slow client slows the backend read (backpressure), nothing is buffered, and a client
that hangs up closes the backend connection, which makes Ollama stop generating.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .errors import json_body, ollama_error

log = Logger(namespace="ollama_mirror.proxy")  # pinned: log names are public

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length"}
MAX_UNLOAD_BODY = 64 * 1024


class InferenceProxy:
    def __init__(
        self, agent: IAgent | None, base_url: str, enabled: bool, timeout: float, clock: IReactorTime
    ) -> None:
        self._agent = agent
        self._base = base_url.rstrip("/")
        self._enabled = enabled
        self._timeout = timeout
        self._clock = clock
        self.asked = False  # a client asked for inference since start (health: the proxy is in use)

    def resource(self) -> Resource:
        """A leaf that forwards whatever request renders it."""
        return _ProxyResource(self)

    async def forward(self, request: Request) -> None:
        if _unload_of(request) is None:  # unloading asks for nothing to run
            self.asked = True
        if not self._enabled or self._agent is None:
            if not _answered_unload(request):
                _answer(request, 502, "the inference proxy is disabled (features.enable_api_proxy)")
            return
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in NOT_FORWARDED:
                headers.setRawHeaders(name, values)
        peer = request.getClientAddress()
        headers.addRawHeader(b"x-forwarded-for", str(getattr(peer, "host", "")).encode())
        body = None
        if request.content is not None:
            request.content.seek(0, 2)
            if request.content.tell():
                request.content.seek(0)
                body = FileBodyProducer(request.content)
        d: Deferred[IResponse] = self._agent.request(
            request.method, (self._base + request.uri.decode("latin-1")).encode("latin-1"), headers, body
        )
        d.addTimeout(self._timeout, self._clock)
        gone = request.notifyFinish()
        gone.addErrback(lambda _: d.cancel())
        try:
            response = await d
        except CancelledError:
            if not request.finished and not getattr(request, "_disconnected", False):
                _answer(request, 504, f"the backend Ollama at {self._base} did not answer in time")
            return
        except (ConnectError, DNSLookupError, TxTimeoutError, ResponseFailed) as e:
            if not _answered_unload(request):
                _answer(request, 502, f"the backend Ollama at {self._base} is unreachable: {e}")
            return
        if getattr(request, "_disconnected", False):
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                request.responseHeaders.setRawHeaders(name, values)
        response.deliverBody(_Relay(request))


def _unload_of(request: Request) -> dict[str, Any] | None:
    """Ollama's answer to *request* if it only asks to unload a model (``POST /api/generate`` or
    ``/api/chat`` with nothing to generate and ``keep_alive`` 0, which ``ollama rm`` and ``ollama stop``
    send first), else ``None``."""
    if request.method != b"POST" or request.path not in (b"/api/generate", b"/api/chat"):
        return None
    content = request.content
    if content is None:
        return None
    content.seek(0)
    try:
        body = json.loads(content.read(MAX_UNLOAD_BODY) or b"null")
    except (ValueError, RecursionError):
        return None
    finally:
        content.seek(0)
    if not isinstance(body, dict) or body.get("keep_alive") not in (0, "0", "0s", "0m"):
        return None
    if body.get("prompt") or body.get("messages") or not isinstance(body.get("model"), str):
        return None
    answer: dict[str, Any] = {
        "model": body["model"],
        "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "done": True,
        "done_reason": "unload",
    }
    if request.path == b"/api/chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    return answer


def _answered_unload(request: Request) -> bool:
    """Answer an unload request for a backend that is not running: nothing is loaded there, so the
    model is unloaded (a cache-only mirror lets ``ollama rm`` through without a warning)."""
    answer = _unload_of(request)
    if answer is None or getattr(request, "_disconnected", False) or request.finished:
        return False
    request.write(json_body(request, 200, answer))
    request.finish()
    return True


def _answer(request: Request, code: int, message: str) -> None:
    if getattr(request, "_disconnected", False) or request.finished:
        return
    body = ollama_error(request, code, message)
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


class _ProxyResource(Resource):
    isLeaf = True

    def __init__(self, proxy: InferenceProxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: Request) -> int:
        Deferred.fromCoroutine(self._proxy.forward(request)).addErrback(self._failed, request)
        return NOT_DONE_YET  # type: ignore[no-any-return]

    def _failed(self, failure: Failure, request: Request) -> None:
        log.failure("inference proxy failed", failure)
        _answer(request, 502, "the inference proxy failed")


class _Relay(Protocol):
    """Copies a backend response body to the client; the backend connection is the client's producer."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._gone = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self._request.registerProducer(self.transport, True)
        self._request.notifyFinish().addErrback(self._client_gone)

    def _client_gone(self, failure: Failure) -> None:
        self._gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if not self._gone:
            self._request.write(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self._gone:
            return
        self._request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._request.finish()
        else:
            log.warn("backend response broke off: {why}", why=reason.getErrorMessage())
            transport: Any = self._request.channel.transport if self._request.channel else None
            if transport is not None:
                transport.abortConnection()


class _Discard(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
