"""Streaming a byte range of a blob to one client, from the cache or from a Fill in progress.

Each response is a push producer of its own: it reads from its own file descriptor (which stays
valid when the partial file is renamed into ``blobs/``), writes until the client's socket says
pause, and waits on the Fill when it has caught up with the download.  So a slow client slows only
itself, and nothing is held in memory beyond one read.

Over plain TCP the bytes go from the page cache to the socket with ``os.sendfile`` (see
:class:`ZeroCopy`), without passing through Python; over TLS, HTTP/2 or a wrapped transport they
are read and written in bounded pieces.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ..cache.blobs import GrowingBlob
from ..events import Events

log = Logger(namespace="ollama_mirror.blobstream")  # pinned: log names are public

READ_SIZE = 256 * 1024
SENDFILE_TURN = 8 * 2**20  # bytes one response may send in one reactor turn, so that others get theirs


class ZeroCopy:
    """``os.sendfile`` from a blob's descriptor straight to a plain TCP connection's socket.

    Twisted has no sendfile; this works with the transport instead of around it.  It is used only
    when the connection is a plain ``tcp.Server`` (no TLS, no protocol wrapper, HTTP/1.x without
    chunked framing or content encoding), and only while the transport's own write buffer is empty
    (the headers, written through the request as usual, go first).  When the socket is full it
    marks the transport's producer (the HTTP channel) paused and asks for a write event: the
    transport drains its (empty) buffer and resumes the channel, which resumes the response.  So
    reading, timeouts, disconnects and keep-alive stay the transport's business.
    """

    def __init__(self, transport: tcp.Connection) -> None:
        self._transport = transport
        self._socket_fd = transport.fileno()

    @classmethod
    def for_request(cls, request: Request) -> ZeroCopy | None:
        """The zero-copy path for *request*'s connection, or None where it cannot be done safely."""
        if not hasattr(os, "sendfile"):
            return None
        channel = getattr(request, "channel", None)
        transport = getattr(channel, "transport", None)
        if (
            not isinstance(transport, tcp.Connection)
            or getattr(transport, "TLS", False)
            or ISSLTransport.providedBy(transport)
            or transport.producer is not channel  # not an HTTPChannel straight on the socket
            or request.clientproto not in (b"HTTP/1.0", b"HTTP/1.1")
            or request.chunked
            or not request.responseHeaders.hasHeader(b"content-length")
            or getattr(request, "_encoder", None) is not None
            or not all(hasattr(transport, a) for a in ("_tempDataLen", "dataBuffer", "offset"))
        ):
            return None
        return cls(transport)

    def idle(self) -> bool:
        """Whether everything the transport was given (the headers) has reached the socket."""
        t: Any = self._transport
        return not t._tempDataLen and len(t.dataBuffer) - t.offset <= 0

    def when_writable(self) -> None:
        """Have the transport resume its producer (and so this response) once the socket is writable
        and its own buffer is empty."""
        t: Any = self._transport
        if t.connected and not t.disconnecting:
            t.producerPaused = True
            t.startWriting()

    def send(self, fd: int, offset: int, count: int) -> int:
        """Bytes sent (0: the socket is full); OSError when the file or the connection failed."""
        t: Any = self._transport
        if not t.connected or t.disconnected or t.fileno() != self._socket_fd:
            raise BrokenPipeError(errno.EPIPE, "the connection is closed")  # never a reused descriptor
        try:
            return os.sendfile(self._socket_fd, fd, offset, count)
        except BlockingIOError:
            return 0


@implementer(IPushProducer)
class BlobProducer:
    """Writes bytes [first, last] of a blob from *fd* to *request*, then finishes it.

    *fd* is an open descriptor, or a function that opens one when the first bytes are ready.

    With a *fill*, bytes are sent as the download puts them on disk; if the download fails, the
    connection is aborted so that the client never mistakes a short body for a complete one.  With
    *hold_last* (a whole-blob response), the last byte waits until the digest has been verified, so
    that a corrupt download can never end as a clean, complete-looking response.  The producer owns
    *fd* and closes it.
    """

    def __init__(
        self,
        request: Request,
        fd: int | Callable[[], int],
        first: int,
        last: int,
        fill: GrowingBlob | None = None,
        hold_last: bool = False,
        events: Events | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self._request = request
        self._fd = fd if isinstance(fd, int) else -1
        self._open_fd = None if isinstance(fd, int) else fd  # opened at the first read instead
        self._position = first
        self._last = last
        self._fill = fill
        self._hold_last = hold_last
        self._paused = False
        self._stopped = False
        self._waiting: Deferred[None] | None = None
        self._events = events or Events()
        self._source = "cache" if fill is None else "fill"
        self._on_end = on_end
        self._zero_copy: ZeroCopy | None = None
        self.sent = 0

    def start(self) -> None:
        """Begin; the request is finished (or aborted) by this producer."""
        self._request.notifyFinish().addErrback(self._client_gone)
        self._request.registerProducer(self, True)
        self._zero_copy = ZeroCopy.for_request(self._request)
        if self._zero_copy is not None:
            self._request.write(b"")  # the headers, through the transport's buffer, before any body byte
        self._pump()

    @property
    def zero_copy(self) -> bool:
        """Whether this response goes out with sendfile."""
        return self._zero_copy is not None

    def _available(self) -> int:
        wanted = self._last + 1 - self._position
        if self._fill is None or self._fill.complete:
            return wanted
        if self._fill.failure is not None:
            return 0  # a failed download: stop here (waiting on it aborts), never stream on
        ready = min(self._fill.available(self._position), wanted)
        return min(ready, wanted - 1) if self._hold_last else ready

    def _pump(self) -> None:
        while not self._stopped:
            if self._position > self._last:
                self._finish()
                return
            if self._paused:
                return
            available = self._available()
            if available <= 0:
                assert self._fill is not None
                holding = self._hold_last and self._position == self._last
                self._waiting = self._fill.when_done() if holding else self._fill.wait(self._position)
                self._waiting.addCallbacks(self._more, self._fill_failed)
                return
            if self._fd < 0 and self._open_fd is not None:
                try:
                    self._fd = self._open_fd()
                except OSError as e:
                    self._abort(f"cannot open the blob: {e.strerror}")
                    return
            if self._zero_copy is not None:
                self._send_zero_copy(self._zero_copy, available)
                return
            data = os.pread(self._fd, min(READ_SIZE, available), self._position)
            if not data:
                self._abort(f"blob file ended at {self._position}")
                return
            self._position += len(data)
            self.sent += len(data)
            self._request.write(data)

    def _send_zero_copy(self, zero_copy: ZeroCopy, available: int) -> None:
        """Send up to one turn's worth with sendfile, then wait for the socket (or the Fill)."""
        if not zero_copy.idle():
            self._paused = True
            zero_copy.when_writable()
            return
        budget = SENDFILE_TURN
        while available > 0 and budget > 0 and not self._stopped:
            wanted = min(available, budget)
            try:
                sent = zero_copy.send(self._fd, self._position, wanted)
            except OSError as e:
                self._abort(f"sendfile failed: {e.strerror}")
                return
            if sent == 0 and wanted > 0 and self._is_eof():
                self._abort(f"blob file ended at {self._position}")
                return
            self._position += sent
            self.sent += sent
            self._request.sentLength += sent
            available -= sent
            budget -= sent
            if sent < wanted:  # the socket is full
                break
        if self._stopped:
            return
        if self._position > self._last:
            self._finish()
            return
        # More to send: come back when the socket can take it (at once if it can), which also lets
        # other connections have their turn.  With nothing on disk yet, _pump waits on the Fill.
        if available > 0 or budget <= 0:
            self._paused = True
            zero_copy.when_writable()
        else:
            self._pump()

    def _is_eof(self) -> bool:
        try:
            return os.fstat(self._fd).st_size <= self._position
        except OSError:
            return True

    def _more(self, _: object) -> None:
        self._waiting = None
        self._pump()

    def _fill_failed(self, failure: Failure) -> None:
        self._waiting = None
        if not self._stopped:
            self._abort(failure.getErrorMessage())

    def _finish(self) -> None:
        self._stopped = True
        self._close()
        self._events.blob_served(self._source, self.sent, True)
        self._request.unregisterProducer()
        self._request.finish()

    def _abort(self, why: str) -> None:
        """End the response without a clean end, so that the client knows the body is incomplete."""
        log.warn("aborting blob response at byte {position}: {why}", position=self._position, why=why)
        self._stopped = True
        self._close()
        self._events.blob_served(self._source, self.sent, False)
        self._request.unregisterProducer()
        transport: Any = self._request.channel.transport if self._request.channel else None
        if transport is not None:
            transport.abortConnection()

    def _client_gone(self, failure: Failure) -> None:
        self.stopProducing()

    def _close(self) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            if self._waiting is None:
                self._pump()

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._close()
            self._events.blob_served(self._source, self.sent, False)


class StreamingResource(Resource):
    """A leaf that starts a :class:`BlobProducer` when rendered.

    Klein finishes a request as soon as a handler's result is written; a handler that returns
    this resource instead hands the request over to the producer, which finishes (or aborts) it.
    """

    isLeaf = True

    def __init__(self, producer: BlobProducer) -> None:
        super().__init__()
        self._producer = producer

    def render(self, request: IRequest) -> int:
        self._producer.start()
        return NOT_DONE_YET  # type: ignore[no-any-return]
