"""The record of a download's progress, beside its partial file: what a restart resumes from.

It says which chunks are finished and how far each other chunk got; it is written in a thread after an
fdatasync of the data, so it never claims a byte that is not on disk.  It follows the data closely: after
every finished chunk, and within chunks every ``PROGRESS_SAVE_BYTES`` (at most every
``PROGRESS_SAVE_INTERVAL``), so that a killed daemon loses at most a few hundred KiB; at the end (a
shutdown, a full disk) one last record says exactly what is on disk.  One write at a time: a record asked
for while one is being written is written after it, with everything that arrived meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cache.store import PartialState
from .partial import PartialFile

log = Logger(namespace="ollama_mirror.fill")  # pinned: log names are public

# After this many bytes, at most this often: a record costs an fdatasync and a small atomic write, so at
# full speed it runs ten times a second, back to back with the data.
PROGRESS_SAVE_BYTES = 256 * 1024
PROGRESS_SAVE_INTERVAL = 0.1


class ProgressRecord:
    def __init__(
        self,
        partial: PartialFile,
        clock: IReactorTime,
        *,
        running: Callable[[], bool],
        fail: Callable[[Failure], None],
        every_bytes: int = PROGRESS_SAVE_BYTES,
    ) -> None:
        """*running* says whether the download still runs (a record of an ended one is not written);
        *fail* hears a record that could not be written (the download stops)."""
        self._partial = partial
        self._clock = clock
        self._running = running
        self._fail = fail
        self._every_bytes = every_bytes
        self.lock = DeferredLock()  # held while a record is written; the publish takes it for good
        self._queued = False
        self._unsaved = 0  # bytes received since the last record was taken
        self._taken_at = 0.0
        self._last: Deferred[None] = succeed(None)

    def count(self, received: int) -> None:
        """*received* more bytes are on disk (counted before the chunks' marks move: a record taken for a
        chunk that these bytes finish includes them)."""
        self._unsaved += received

    def keep_up(self) -> None:
        """Record what is on disk if enough came since the last record."""
        due = self._clock.seconds() - self._taken_at >= PROGRESS_SAVE_INTERVAL
        if self._unsaved >= self._every_bytes and due:
            self.save()

    def save(self) -> None:
        """Record what is on disk now, or right after the record being written."""
        if not self._queued:  # a record already waiting will say this too
            self._queued = True
            self.lock.run(self._take).addErrback(self._fail)

    def _take(self) -> Deferred[None]:
        self._queued = False  # progress from now on needs a record of its own
        if not self._running():
            return succeed(None)
        self._unsaved, self._taken_at = 0, self._clock.seconds()
        return self._partial.run(self._write, self._partial.state())

    def _write(self, state: PartialState) -> None:
        if self._running():  # (thread) an ended download's partial may be gone, or someone else's
            self._partial.write_state(state)

    def last(self, digest: str) -> None:
        """The download ended keeping its partial file: record exactly what is on disk (after any record
        being written; on a full disk this may fail too, and the last record stands), then close it."""

        def failed(failure: Failure) -> None:
            log.warn(
                "fill {digest}: cannot record its progress: {error}",
                digest=digest,
                error=failure.getErrorMessage(),
            )

        def write(state: PartialState) -> Deferred[None]:
            written = self._partial.run(self._partial.write_state, state).addErrback(failed)
            return written.addBoth(lambda _: self._partial.close())

        self._last = self.lock.run(write, self._partial.state())

    def drained(self) -> Deferred[None]:
        """Fires once no record is being written any more."""
        return DeferredList([self.lock.run(succeed, None), self._last]).addCallback(lambda _: None)
