"""Reading upstream response bodies that are small (documents) or unwanted (errors, redirects)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

_DRAIN_LIMIT = 64 * 1024


class BodyTooSlow(Exception):
    """A small body did not arrive within its time."""


class _Collector(Protocol):
    """Collect at most *limit* bytes; past that, drop the connection and fail (or just stop, to drain)."""

    def __init__(self, limit: int, keep: bool) -> None:
        self.limit = limit
        self.keep = keep
        self.parts: list[bytes] = []
        self.received = 0
        self.done: Deferred[bytes] = Deferred()
        self.over = False
        self.late = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > self.limit:
            if not self.over:
                self.over = True
                assert self.transport is not None
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        if self.keep:
            self.parts.append(data)

    def give_up(self) -> None:
        """Too slow: drop the connection, and fail with :class:`BodyTooSlow`."""
        self.late = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.late:
            self.done.errback(BodyTooSlow("the body did not arrive in time"))
        elif self.over:
            if self.keep:
                self.done.errback(ValueError("body too large"))
            else:
                self.done.callback(b"")
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


async def collect_limited(
    response: IResponse, limit: int, clock: IReactorTime | None = None, timeout: float = 0
) -> bytes:
    """The whole body, which must be at most *limit* bytes (else ``ValueError``) and, with a *clock*,
    arrive within *timeout* seconds (else the connection is dropped and :class:`BodyTooSlow` raised: a
    body that stalls must not hold the request that waits for it)."""
    collector = _Collector(limit, keep=True)
    response.deliverBody(collector)
    if clock is None:
        return await collector.done
    timer = clock.callLater(timeout, collector.give_up)
    try:
        return await collector.done
    finally:
        if timer.active():
            timer.cancel()


async def drain(response: IResponse) -> None:
    """Read and drop a body: a short one is read to the end (the connection can be reused), a long
    one is cut off (the connection is closed) so that an unwanted blob is never downloaded."""
    collector = _Collector(_DRAIN_LIMIT, keep=False)
    response.deliverBody(collector)
    await collector.done
