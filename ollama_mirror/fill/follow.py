"""Two worker processes, one download: following a Fill that another process holds.

Under ``server.workers``, the process that takes a blob's lock downloads it (the holder); a worker
asked for the same blob follows: it serves the chunks the holder records as finished, looks at the
holder every ``FOLLOW_INTERVAL`` seconds (published, failed, still going), and takes the download over
if the holder goes away.  A follower also lists the chunks its own readers wait on beside the partial
file; the holder reads those lists every ``WANTS_INTERVAL`` seconds and fetches them first, as it does
for its own readers.
"""

from __future__ import annotations

import itertools
import os
from typing import Protocol

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cache.store import PartialState
from ..runner import Runner
from .errors import FillFailed
from .partial import PartialFile

log = Logger(namespace="ollama_mirror.fill")  # pinned: log names are public
FOLLOW_INTERVAL = 0.1  # seconds between looks at a download another process runs
WANTS_INTERVAL = 0.25  # seconds between the holder's looks at what followers' readers wait on
_serial = itertools.count(1)  # tells apart the Fills of one process in the names of their files


class LinkedFill(Protocol):
    """What a :class:`HolderLink` needs of its Fill."""

    digest: str

    @property
    def ended(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    def apply(self, state: PartialState | None) -> None: ...

    def waited_chunks(self) -> frozenset[int]: ...

    def hold(self) -> None: ...

    def schedule(self) -> None: ...

    def completed(self) -> None: ...

    def fail(self, failure: Failure) -> None: ...


class HolderLink:
    def __init__(self, fill: LinkedFill, partial: PartialFile, runner: Runner, clock: IReactorTime) -> None:
        self._fill = fill
        self._partial = partial
        self._runner = runner
        self._clock = clock
        self.following = False  # another process holds the download: we read its record
        self.followed = False  # this Fill followed another process's download (for its log line)
        self._follow_timer: IDelayedCall | None = None
        self._wants_tag = f"{os.getpid()}-{next(_serial)}"
        self._wants_published: frozenset[int] = frozenset()  # (as a follower) last listed
        self._wants_lock = DeferredLock()  # one write of that list at a time, in order
        self.remote_wants: frozenset[int] = frozenset()  # (as the holder) what followers wait on
        self._wants_timer: IDelayedCall | None = None

    # --- as a follower -------------------------------------------------------------------------

    def follow(self, state: PartialState | None) -> None:
        """Another process holds the download: serve what it recorded, and keep looking."""
        self.following = self.followed = True
        log.debug("fill {digest}: another worker downloads it; following", digest=self._fill.digest)
        self._fill.apply(state)
        self._follow_timer = self._clock.callLater(FOLLOW_INTERVAL, self._look)

    def _look(self) -> None:
        self._follow_timer = None
        if not self._fill.ended:
            self._publish_wants(self._fill.waited_chunks())
            self._partial.run(self._partial.look_at_holder).addCallbacks(self._looked, self._fill.fail)

    def _looked(self, result: tuple[str, PartialState | None]) -> None:
        what, state = result
        if self._fill.ended:
            return
        if what == "published":
            self._fill.completed()
        elif what == "lost":
            self._fill.fail(
                Failure(FillFailed(f"the download of {self._fill.digest} in another worker failed"))
            )
        else:
            self._fill.apply(state)
            if what == "taken over":
                self.following = False
                log.info(
                    "fill {digest}: taking over the download of a worker that stopped",
                    digest=self._fill.digest,
                )
                self._publish_wants(frozenset())
                self._fill.hold()
            else:
                self._follow_timer = self._clock.callLater(FOLLOW_INTERVAL, self._look)

    def _publish_wants(self, wanted: frozenset[int]) -> None:
        """Tell the holder which chunks our readers wait on, when that changed: it fetches them first."""
        if wanted == self._wants_published:
            return
        self._wants_published = wanted
        store, hexdigest = self._partial.store, self._partial.hexdigest
        d = self._wants_lock.run(self._runner.run, store.write_wants, hexdigest, self._wants_tag, wanted)
        d.addErrback(self._wants_error)

    # --- as the holder -------------------------------------------------------------------------

    def watch_wants(self) -> None:
        """Look at what followers' readers wait on, now and every WANTS_INTERVAL."""
        self._wants_timer = None
        if self._fill.ended or self.following or self._fill.stopping:
            return
        d = self._runner.run(self._partial.store.read_wants, self._partial.hexdigest)
        d.addCallbacks(self._got_wants, self._wants_unread)

    def _got_wants(self, wanted: frozenset[int]) -> None:
        if self._fill.ended:
            return
        count = self._partial.chunks.count
        self.remote_wants = frozenset(i for i in wanted if 0 <= i < count)
        self._fill.schedule()
        self._wants_timer = self._clock.callLater(WANTS_INTERVAL, self.watch_wants)

    def _wants_unread(self, failure: Failure) -> None:
        self._wants_error(failure)
        self._got_wants(self.remote_wants)  # (and look again later)

    def _wants_error(self, failure: Failure) -> None:
        log.warn(
            "fill {digest}: wanted chunks: {error}", digest=self._fill.digest, error=failure.getErrorMessage()
        )

    # --- ending --------------------------------------------------------------------------------

    def end(self) -> None:
        """No more looks at the holder or at followers; our own list of wanted chunks goes."""
        for timer in (self._follow_timer, self._wants_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._follow_timer = self._wants_timer = None
        self._publish_wants(frozenset())

    def drained(self) -> Deferred[None]:
        """Fires once the last write of our wanted chunks is done (the daemon stops after it)."""
        return self._wants_lock.run(_nothing)


def _nothing() -> Deferred[None]:
    return Deferred.fromCoroutine(_none())


async def _none() -> None:
    return None
