"""Limits on what a client may send, enforced by the HTTP channel before any route runs.

``twisted.web``'s :class:`HTTPChannel` already caps the header section (``totalHeadersSize``,
``maxHeaders``) and closes idle connections (the Site's ``timeOut``), but it answers a bad request
with a bare ``400`` and no body, buffers request bodies of any size, and lets a client that sends
a byte every few seconds hold a connection for ever.  :class:`HardenedChannel` adds a body cap
(``Content-Length`` checked up front, chunked bodies counted as they come), a deadline for the
whole request once its first byte arrived (slowloris), the connection caps (:mod:`.connections`), and
JSON bodies on every such refusal.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from ..config import ServerConfig
from .connections import ConnectionLimits

log = Logger(namespace="ollama_mirror.hardening")  # pinned: log names are public

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    503: b"Service Unavailable",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


class BodyTargets(Protocol):
    """Routes that take a request's body as it arrives (a push's parts), instead of a spool file."""

    def target(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> Any | None:
        """A file-like object the body is written to as it comes (``None``: the usual spool); *pause* and
        *resume* stop and restart reading from the connection."""


class StreamingRequest(Request):
    """A :class:`Request` whose body goes where the channel says (:class:`BodyTargets`), if anywhere."""

    body_target: Any | None = None

    def gotLength(self, length: int | None) -> None:
        if self.body_target is None:
            super().gotLength(length)
        else:
            self.content = self.body_target

    def connectionLost(self, reason: Failure) -> None:
        """A body cut off mid-way is abandoned (its target undoes what it wrote)."""
        if self.body_target is not None and not self.finished and hasattr(self.body_target, "abandon"):
            self.body_target.abandon()
        super().connectionLost(reason)


class HardenedChannel(HTTPChannel):
    """An :class:`HTTPChannel` with the limits of ``server.*`` (see the module docstring).  A body that
    a route takes as it arrives (:class:`BodyTargets`) is under neither ``server.max_body_size`` nor
    ``server.request_timeout`` (a part of a push is up to 1,000 MB); the idle timeout still holds."""

    max_body_size = 64 * 2**20
    request_timeout = 60.0
    limits: ConnectionLimits | None = None
    bodies: BodyTargets | None = None
    _streaming = False
    _body_received = 0
    _deadline: IDelayedCall | None = None
    _refused = False
    _counted = False
    _client: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.limits is None or self.transport is None:
            return
        peer = self.transport.getPeer()
        self._client = getattr(peer, "host", None)  # (a Unix socket's peer has none: total cap only)
        refusal = self.limits.admit(self._client)
        if refusal is None:
            self._counted = True
        else:
            self._refuse(503, f"too many connections: {refusal}; retry later", retry_after=1, quiet=True)

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse(431, f"request line and headers are larger than {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(431, f"request line and headers are larger than {self.totalHeadersSize} bytes")

    def headerReceived(self, line: bytes) -> bool:
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, f"more than {self.maxHeaders} request headers")
            return False
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        self._body_received = 0
        self._streaming = self._stream_body()
        if self._streaming and not getattr(self.requests[-1].body_target, "discards", False):
            self._cancel_deadline()  # (a body dropped unread still has to arrive in time)
        elif self.length is not None and self.length > self.max_body_size:
            self._refuse(
                413, f"request body is larger than {self.max_body_size} bytes (server.max_body_size)"
            )
            return
        super().allHeadersReceived()

    def _stream_body(self) -> bool:
        """Ask the routes whether they take this request's body as it arrives (then it goes there)."""
        request = self.requests[-1] if self.requests else None
        if self.bodies is None or not isinstance(request, StreamingRequest) or self.transport is None:
            return False
        transport = cast(IPushProducer, self.transport)  # (a TCP or TLS transport: it can stop reading)
        target = self.bodies.target(
            self._command,
            self._path,
            request.requestHeaders,
            transport.pauseProducing,
            transport.resumeProducing,
        )
        request.body_target = target
        return target is not None

    def rawDataReceived(self, data: bytes) -> None:
        if not self._handlingRequest and not self._streaming:
            self._body_received += len(data)
            if self._body_received > self.max_body_size + 65536:  # chunked framing included
                self._refuse(
                    413, f"request body is larger than {self.max_body_size} bytes (server.max_body_size)"
                )
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def _too_slow(self) -> None:
        self._deadline = None
        if not self._handlingRequest:
            self._refuse(
                408, f"the request did not arrive within {self.request_timeout:g} s (server.request_timeout)"
            )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, "malformed HTTP request")

    def _refuse(self, status: int, message: str, retry_after: int | None = None, quiet: bool = False) -> None:
        """Answer with a JSON error and close: the connection's state is unusable after this.  *quiet*:
        no log line of its own (the connection caps log their refusals, a minute apart)."""
        if self._refused or self.transport is None:
            return
        self._refused = True
        self._cancel_deadline()
        body = json.dumps({"error": message}).encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
        head += b"content-type: application/json; charset=utf-8\r\n"
        if retry_after is not None:
            head += b"retry-after: %d\r\n" % retry_after
        head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        if not quiet:
            peer = self.transport.getPeer()
            log.info(
                "refused a request from {peer}: {status} {message}",
                peer=str(getattr(peer, "host", peer)),
                status=status,
                message=message,
            )
        self.transport.write(head + body)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._counted and self.limits is not None:
            self._counted = False
            self.limits.closed(self._client)
        super().connectionLost(reason)


def harden(
    site: Site,
    config: ServerConfig,
    limits: ConnectionLimits | None = None,
    bodies: BodyTargets | None = None,
) -> Site:
    """Make *site* build :class:`HardenedChannel` connections with *config*'s limits, counted by
    *limits* (the connection caps, shared by every listener that serves clients); *bodies* are the
    routes that take bodies as they arrive."""
    if bodies is not None:
        site.requestFactory = StreamingRequest

    def protocol() -> _GenericHTTPChannelProtocol:
        channel = HardenedChannel()
        channel.limits = limits
        channel.bodies = bodies
        channel.maxHeaders = config.max_headers
        channel.totalHeadersSize = config.max_header_size
        channel.MAX_LENGTH = config.max_header_size  # one line can never be longer than the whole
        channel.max_body_size = config.max_body_size
        channel.request_timeout = config.request_timeout
        return _GenericHTTPChannelProtocol(channel)

    site.protocol = protocol  # type: ignore[assignment]
    site.timeOut = config.idle_timeout
    return site
