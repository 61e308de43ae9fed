"""The Fill: the single owner of one blob's download, and what its readers wait on.

A Fill creates the partial file at full size (:mod:`.partial`), splits it into chunks (:mod:`.chunks`),
and lets a few upstream workers fetch one chunk at a time with ``Range`` (:mod:`.fetch`); the chunk a
reader waits on goes first.  What is on disk is recorded durably as it arrives (finished chunks, and how
far each other chunk got), so a restarted daemon resumes where it was, to within a few hundred KiB.  The
sha256 advances over the finished prefix in a worker thread (:mod:`.verify`; after a restart it hashes
again what is on disk, never fetches it again); at the end the digest is checked and the file is
published by atomic rename.  Under ``server.workers`` a Fill may instead follow the download another
process holds (:mod:`.follow`).

Readers never talk to upstream: they ask :meth:`Fill.available` how many bytes at an offset are on disk
and :meth:`Fill.wait` for more, each getting a Deferred of its own, so a reader hanging up can never
cancel the download.  This class decides who waits and when the download is done; its parts do the rest.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.internet.defer import fail as failed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cache.blobs import BlobSource
from ..cache.space import NoSpace, is_no_space
from ..cache.store import PartialState, Store
from ..events import Events, FillView
from ..runner import Runner
from ..upstream.retry import RetryPolicy
from .chunks import ChunkMap
from .errors import DigestMismatch, DiskFull, FillFailed, disk_full
from .fetch import RangeFetcher
from .follow import HolderLink
from .partial import PartialFile
from .progress import PROGRESS_SAVE_BYTES, ProgressRecord
from .verify import PrefixHasher
from .waiters import Waiters

log = Logger(namespace="ollama_mirror.fill")  # pinned: log names are public

Admission = Callable[[FillView], Awaitable[None]]  # may refuse a download (no room), in words


class Fill:
    """One blob being downloaded into the cache; see the module docstring."""

    def __init__(
        self,
        *,
        hexdigest: str,
        size: int,
        repository: str,
        source: BlobSource,
        store: Store,
        clock: IReactorTime,
        runner: Runner,
        chunk_size: int,
        connections: int,
        retry: RetryPolicy,
        idle_timeout: float,
        gate: DeferredSemaphore | None = None,
        events: Events | None = None,
        admit: Admission | None = None,
        max_connections: int | None = None,
        progress_bytes: int = PROGRESS_SAVE_BYTES,
    ) -> None:
        """*retry* is the upstream retry policy (a body that breaks off resumes under it); *admit* may
        refuse the download (no room) before anything is written; *gate* caps how many Fills download at
        once; *progress_bytes* is how much may arrive before the record of progress follows."""
        self.hexdigest = hexdigest
        self.digest = "sha256:" + hexdigest
        self.size = size
        self.repository = repository
        self.store = store
        self.clock = clock
        self.runner = runner
        self.gate = gate
        self.events = events or Events()
        self.admit = admit
        self.chunks = ChunkMap(size, chunk_size)
        self.partial = PartialFile(store, hexdigest, self.chunks, runner)
        self.link = HolderLink(self, self.partial, runner, clock)
        self.fetcher = RangeFetcher(
            source=source,
            repository=repository,
            chunks=self.chunks,
            sink=self,
            clock=clock,
            events=self.events,
            connections=connections,
            max_connections=max_connections or connections,
            retry=retry,
            idle_timeout=idle_timeout,
            may_fetch=self._may_fetch,
            wanted=lambda: self.waiters.chunks() | self.link.remote_wants,
            fail=self.fail,
        )
        self.hasher = PrefixHasher(self.chunks, self.partial, lambda: not self.ended, self._finish, self.fail)
        self.complete = False
        self.failure: Failure | None = None
        self.resumed_bytes = 0
        self.allocated_bytes = 0
        self.received_bytes = 0
        self.started_at: float | None = None
        self._stopping = False
        self.waiters = Waiters(self.available)
        self.progress = ProgressRecord(
            self.partial, clock, running=lambda: not self.ended, fail=self.fail, every_bytes=progress_bytes
        )

    # --- what readers use ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Stopped by the daemon shutting down (what is on disk is kept for the next start)."""
        return self._stopping

    @property
    def following(self) -> bool:
        """Another worker process downloads this blob; this Fill serves the chunks it records."""
        return self.link.following

    @property
    def followed(self) -> bool:
        """This Fill followed another process's download (for its log line)."""
        return self.link.followed

    @property
    def ended(self) -> bool:
        return self.complete or self.failure is not None

    @property
    def origin(self) -> str:
        """Where the bytes come from (a cluster's source says; else the upstream)."""
        origin: str = getattr(self.fetcher.source, "origin", "upstream")
        return origin

    @property
    def path(self) -> str:
        """The partial file the download writes."""
        return self.partial.path

    def open_reader(self) -> int:
        """A file descriptor of the blob's data for one reader: the partial file while the Fill runs
        (see :meth:`PartialFile.reader`), else the published blob.  A failed Fill has nothing to read."""
        if self.failure is not None and not self.complete:
            raise FileNotFoundError(errno.ENOENT, f"the download of {self.digest} failed")
        fd = self.partial.reader()
        return fd if fd is not None else os.open(self.store.blob_path(self.hexdigest), os.O_RDONLY)

    def available(self, offset: int) -> int:
        """How many bytes from *offset* on are on disk, contiguous."""
        return max(0, self.size - offset) if self.complete else self.chunks.available(offset)

    def completed_bytes(self) -> int:
        """Bytes on disk, for progress reports."""
        return self.size if self.complete else self.chunks.completed_bytes()

    def wait(self, offset: int) -> Deferred[None]:
        """A Deferred (the caller's own) that fires when bytes at *offset* are on disk, or fails with
        :class:`FillFailed` when the download fails."""
        if self.failure is not None:
            return failed(self.failure)
        if self.available(offset) > 0 or self.complete:
            return succeed(None)
        d = self.waiters.reader(self.chunks.index_of(offset), offset)
        self.fetcher.schedule()
        return d

    def when_done(self) -> Deferred[None]:
        """A Deferred of the caller's own that fires when the blob is published (or fails)."""
        if self.complete:
            return succeed(None)
        if self.failure is not None:
            return failed(self.failure)
        return self.waiters.finished()

    # --- running -------------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Begin (or resume) the download; the Deferred fires when it has ended either way."""
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        if self.gate is not None:
            await self.gate.acquire()
        try:
            if not self._stopping:
                self.started_at = self.clock.seconds()
                await self._open()
                if not self.ended:  # (the blob may have been published by another worker meanwhile)
                    self.events.fill_started(self)
                    log.debug(
                        "fill {digest}: {size} bytes, {resumed} already on disk",
                        digest=self.digest,
                        size=self.size,
                        resumed=self.resumed_bytes,
                    )
                    self.hold()
        except Exception as e:
            self.fail(Failure(e))
        if not self.ended:
            await self.when_done().addErrback(lambda _: None)
        if self.gate is not None:
            self.gate.release()

    async def _open(self) -> None:
        """Take the download's lock and resume the partial file recorded on disk, or create one at
        full size (in a thread); or, when another process holds the lock, follow its download."""
        opened = await self.runner.run(self.partial.open)
        if self.ended:  # stopped meanwhile
            if opened.fd >= 0:
                os.close(opened.fd)
            return
        if opened.fd < 0:
            self.completed()  # published by another process meanwhile
            return
        if not opened.held:
            self.partial.fd = opened.fd
            self.link.follow(opened.state)
            return
        fd, state = opened.fd, opened.state
        resumed = sorted(i for i in (state.done if state else ()) if 0 <= i < self.chunks.count)
        marks = {i: m for i, m in (state.filled if state else {}).items() if i not in resumed}
        self.resumed_bytes = self.chunks.bytes_of(resumed) + sum(marks.values())
        self.allocated_bytes = opened.allocated
        # The descriptor stays unset until the file is ready: readers arriving meanwhile may schedule
        # upstream requests, whose bytes a reservation (which truncates) would otherwise wipe out.
        try:
            await self._admitted()
            if state is None and not self.ended:
                await self.runner.run(self.partial.reserve, fd)
        except BaseException:
            if opened.created or state is None:  # nothing in it to keep: leave the cache as it was
                self.store.discard_partial(self.hexdigest, fd)
            os.close(fd)
            raise
        if self.ended:  # stopped meanwhile: nothing was written; the lock goes with the descriptor
            os.close(fd)
            return
        self.partial.fd = fd
        self.chunks.resume(resumed, marks)  # only now: "available" must mean "readable through the file"
        if self.size == 0:
            self.chunks.done[0] = True  # nothing to fetch: hash the empty string and publish
        self.waiters.wake()

    async def _admitted(self) -> None:
        """Ask *admit* for room (it may sweep the cache first); a refusal fails the Fill in its words."""
        if self.admit is None:
            return
        try:
            await self.admit(self)
        except FillFailed:
            raise
        except NoSpace as e:
            raise DiskFull(e.message, e.path, e.free) from e
        except Exception as e:
            raise FillFailed(str(e)) from e

    def _may_fetch(self) -> bool:
        return self.partial.fd >= 0 and not self.link.following and not self.ended and not self._stopping

    # --- what the parts call -------------------------------------------------------------------

    def hold(self) -> None:
        """This process holds the download (from the start, or after taking it over): fetch, hash, and
        listen to what followers' readers wait on."""
        self.fetcher.schedule()
        self._advance_hash()
        self.link.watch_wants()

    def schedule(self) -> None:
        self.fetcher.schedule()

    def apply(self, state: PartialState | None) -> None:
        """What the holder recorded (finished chunks, how far the others got) is readable here too."""
        if state is None:
            return
        self.chunks.resume(state.done, state.filled)
        for index in {*state.done, *state.filled}:
            if 0 <= index < self.chunks.count:
                self.waiters.wake(index)

    def waited_chunks(self) -> frozenset[int]:
        """The unfinished chunks this process's readers wait on."""
        return frozenset(i for i in self.waiters.chunks() if not self.chunks.done[i])

    def write_unfinished(self, data: bytes, offset: int) -> None:
        self.partial.write_unfinished(data, offset)

    def wrote(self, start: int, end: int) -> None:
        """Bytes [start, end) are on disk: advance chunk marks, wake readers, finish chunks, and now and
        then record how far the chunks got (a restart resumes from there)."""
        self.received_bytes += end - start
        kind = getattr(self.fetcher.source, "kind", "upstream")
        if kind == "upstream":
            self.events.upstream_bytes(end - start)
        else:
            self.events.cluster_bytes(kind, end - start)
        self.progress.count(end - start)
        for index, finished in self.chunks.record(start, end):
            if finished:
                self._chunk_done(index)
            self.waiters.wake(index)
        self.progress.keep_up()

    def _chunk_done(self, index: int) -> None:
        self.chunks.done[index] = True
        self.progress.save()
        self._advance_hash()

    # --- verifying and publishing --------------------------------------------------------------

    def _advance_hash(self) -> None:
        if not (self.ended or self.partial.fd < 0 or self.link.following):
            self.hasher.advance()

    async def _finish(self, actual: str) -> None:
        await self.progress.lock.acquire()  # no record of progress may be written after this
        try:
            if self.ended:  # stopped or failed while waiting for the lock
                return
            if actual != self.hexdigest:
                self.events.digest_mismatch(self)
                await self.partial.run(self.partial.discard)
                message = f"blob {self.digest} arrived with digest sha256:{actual}; discarded"
                self.fail(Failure(DigestMismatch(message)))
                return
            await self.partial.run(self.partial.publish)
        finally:
            self.progress.lock.release()
        if self.ended:  # failed (shutdown) during the publish: the published blob is verified and stays
            return
        elapsed = self.clock.seconds() - (self.started_at or self.clock.seconds())
        log.debug(
            "fill {digest}: complete and verified, {received} bytes from upstream in {elapsed:.1f} s",
            digest=self.digest,
            received=self.received_bytes,
            elapsed=elapsed,
        )
        self.completed()

    def completed(self) -> None:
        """The verified blob is in ``blobs/`` (published here or by the worker this Fill followed)."""
        self.complete = True
        self.link.following = False
        self.link.end()
        self.partial.close()
        self.events.fill_ended(self, None)
        self.waiters.succeed()

    # --- ending --------------------------------------------------------------------------------

    def fail(self, failure: Failure) -> None:
        if self.ended:
            return
        error = failure.value
        if error is not None and is_no_space(error) and not isinstance(error, DiskFull):  # (a record, say)
            failure = Failure(disk_full(self.digest, getattr(error, "filename", None) or self.path))
        elif not failure.check(FillFailed):
            failure = Failure(FillFailed(f"download of {self.digest} failed: {failure.getErrorMessage()}"))
        self.failure = failure
        self.link.end()
        log.debug("fill {digest}: {error}", digest=self.digest, error=failure.getErrorMessage())
        self.events.fill_ended(self, failure.getErrorMessage())
        if isinstance(failure.value, NoSpace):  # (what was written stays, with its record, for a retry)
            self.events.disk_full(failure.value.message, failure.value.path, failure.value.free)
        self.fetcher.stop_transfers()
        keeping = self._stopping or isinstance(failure.value, NoSpace)
        if keeping and self.partial.fd >= 0 and not self.link.following:
            # Shutting down, or out of space: record exactly what is on disk (after any save still
            # running; on a full disk this small write may fail too: the last record stands), then close.
            self.progress.last(self.digest)
        else:
            self.partial.close()
        self.waiters.fail(failure)

    def stop(self) -> Deferred[None]:
        """Stop downloading (daemon shutdown); what is on disk stays for the next start."""
        self._stopping = True
        if not self.ended:  # fail also cuts the transfers in flight
            self.fail(Failure(FillFailed(f"download of {self.digest} stopped (shutting down)")))
        drained = [self.progress.drained(), self.link.drained()]
        return DeferredList(drained).addCallback(lambda _: None)
