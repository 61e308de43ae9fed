"""Streaming a byte range of a blob to one client, from the cache or from a Fill in progress.

Each response is a push producer of its own: it reads from its own file descriptor (which stays
valid when the partial file is renamed into ``blobs/``), writes until the client's socket says
pause, and waits on the Fill when it has caught up with the download.  So a slow client slows only
itself, and nothing is held in memory beyond one read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .events import Events
from .fill import Fill

log = Logger()

READ_SIZE = 256 * 1024


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
        fill: Fill | None = None,
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
        self.sent = 0

    def start(self) -> None:
        """Begin; the request is finished (or aborted) by this producer."""
        self._request.notifyFinish().addErrback(self._client_gone)
        self._request.registerProducer(self, True)
        self._pump()

    def _available(self) -> int:
        wanted = self._last + 1 - self._position
        if self._fill is None or self._fill.complete:
            return wanted
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
            data = os.pread(self._fd, min(READ_SIZE, available), self._position)
            if not data:
                self._abort(f"blob file ended at {self._position}")
                return
            self._position += len(data)
            self.sent += len(data)
            self._request.write(data)

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
