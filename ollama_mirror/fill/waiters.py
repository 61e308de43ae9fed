"""Who waits on a Fill: readers waiting for bytes at an offset, and callers waiting for the end.

Each waiter gets a Deferred of its own, so that one hanging up (Klein cancels its handler) never cancels
the download for the others.  Readers are kept by chunk, so that each write looks only at the readers
of its own chunk.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class Waiters:
    def __init__(self, available: Callable[[int], int]) -> None:
        """*available* says how many bytes at an offset are readable now."""
        self._available = available
        self._readers: dict[int, list[tuple[int, Deferred[None]]]] = {}  # chunk -> (offset, waiter)
        self._finished: list[Deferred[None]] = []

    def chunks(self) -> set[int]:
        """The chunks readers wait on."""
        return set(self._readers)

    def reader(self, index: int, offset: int) -> Deferred[None]:
        """A waiter for bytes at *offset*, in chunk *index*, fired by :meth:`wake`."""
        d: Deferred[None] = Deferred(lambda d: self._forget(d, index))
        self._readers.setdefault(index, []).append((offset, d))
        return d

    def finished(self) -> Deferred[None]:
        """A waiter for the end, fired by :meth:`succeed` or :meth:`fail`."""
        d: Deferred[None] = Deferred(lambda d: self._forget(d))
        self._finished.append(d)
        return d

    def _forget(self, d: Deferred[None], index: int | None = None) -> None:
        waiting = self._readers.get(index) if index is not None else None
        if waiting is not None:
            waiting[:] = [(o, w) for o, w in waiting if w is not d]
            if not waiting:
                del self._readers[index]  # type: ignore[arg-type]
        if d in self._finished:
            self._finished.remove(d)

    def wake(self, index: int | None = None) -> None:
        """Fire the readers whose bytes are readable: those of chunk *index*, or all of them."""
        for chunk in list(self._readers) if index is None else [index]:
            waiting = self._readers.get(chunk)
            if not waiting:
                continue
            ready = [d for o, d in waiting if self._available(o) > 0]
            if not ready:
                continue
            left = [(o, d) for o, d in waiting if self._available(o) <= 0]
            if left:
                self._readers[chunk] = left
            else:
                del self._readers[chunk]
            for d in ready:
                d.callback(None)

    def succeed(self) -> None:
        """The blob is published: every reader can read to the end, and the end has come."""
        self.wake()
        finished, self._finished = self._finished, []
        for d in finished:
            d.callback(None)

    def fail(self, failure: Failure) -> None:
        """The download failed: every waiter hears it."""
        readers, self._readers = self._readers, {}
        finished, self._finished = self._finished, []
        for d in [d for waiting in readers.values() for _, d in waiting] + finished:
            d.errback(failure)
