"""The Fill: the single owner of one blob's download.

A Fill creates the partial file at full size, splits it into chunks, and runs a few upstream
workers that each fetch one chunk at a time with ``Range`` and write what arrives at its offset.
The chunk some reader is waiting on goes first.  Finished chunks are recorded durably, so a
restarted daemon resumes where it was.  The sha256 advances over the finished prefix in a worker
thread; at the end the digest is checked and the file is published by atomic rename.

Readers never talk to upstream: they ask :meth:`Fill.available` how many bytes at an offset are
on disk and :meth:`Fill.wait` for more, each getting a Deferred of its own, so a reader hanging
up can never cancel the download.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol as TxProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from ..cache.store import PartialState, Store, same_file
from ..events import Events
from ..runner import Runner
from ..upstream.client import UpstreamError, content_range_start, discard

log = Logger(namespace="ollama_mirror.fill")  # pinned: log names are public
_serial = itertools.count(1)  # tells apart the Fills of one process in the names of their files

# Bytes per read of the hash thread: a larger object, freed in a pool thread, stays in that thread's malloc
# arena (4 MiB reads kept ~20 MB more resident during a fill; sha256 is no faster with them).
HASH_READ_SIZE = 2**20
UPSTREAM_READ_SIZE = 2**20  # bytes per read from an upstream socket (Twisted's default is 64 KiB)
FOLLOW_INTERVAL = 0.1  # seconds between looks at a download another process runs
WANTS_INTERVAL = 0.25  # seconds between the holder's looks at what followers' readers wait on
OPEN_ATTEMPTS = 10  # tries to lock the partial file while other processes keep replacing it


class BlobSource(Protocol):
    """Where a Fill gets bytes from (the upstream registry now; a shared tier later)."""

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse: ...


class FillFailed(Exception):
    """The download could not be completed; readers of the partial data must not end cleanly."""


class DigestMismatch(FillFailed):
    """The bytes received do not hash to the digest: they were discarded."""


class DiskFull(FillFailed):
    """The cache's disk ran out of space: the partial file is discarded."""


@dataclass(frozen=True)
class _Opened:
    """The partial file as :meth:`Fill._open_partial` found it."""

    fd: int  # -1 when the blob was published meanwhile
    held: bool  # this process holds the download's lock: it downloads; else it follows
    created: bool = False
    state: PartialState | None = None


class _ChunkWriter(TxProtocol):
    """Receives one upstream body and writes it into the partial file from *offset* on."""

    def __init__(self, fill: Fill, offset: int, end: int) -> None:
        self.fill = fill
        self.offset = offset
        self.end = end  # exclusive
        self.done: Deferred[int] = Deferred()
        self.timer: IDelayedCall | None = None
        self.failure: Exception | None = None

    def connectionMade(self) -> None:
        # Larger socket reads: each read costs a trip through the HTTP client's parser, this
        # protocol and the Fill's bookkeeping, so 1 MiB reads cost a sixteenth of 64 KiB ones.
        connection = getattr(self.transport, "_producer", None)  # the response's TCP connection
        if isinstance(connection, tcp.Connection) and connection.bufferSize < UPSTREAM_READ_SIZE:
            connection.bufferSize = UPSTREAM_READ_SIZE
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.fill.idle_timeout)
        else:
            self.timer = self.fill.clock.callLater(self.fill.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        self._abort(UpstreamError(f"upstream sent nothing for {self.fill.idle_timeout:g} s", kind="idle"))

    def _abort(self, error: Exception) -> None:
        if self.failure is None:
            self.failure = error
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        room = self.end - self.offset
        if len(data) > room:
            data = data[:room]
        if data:
            try:
                self.fill.write_unfinished(data, self.offset)
            except OSError as e:
                full = e.errno == errno.ENOSPC
                self._abort(
                    DiskFull(f"no space left on the cache's disk for blob {self.fill.digest}")
                    if full
                    else FillFailed(f"cannot write blob {self.fill.digest}: {e.strerror}")
                )
                return
            start, self.offset = self.offset, self.offset + len(data)
            self.fill.wrote(start, self.offset)
        if self.offset >= self.end:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
        else:
            self._arm()

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if self.offset >= self.end:
            self.done.callback(self.offset)
        elif self.failure is not None:
            self.done.errback(self.failure)
        elif reason.check(ResponseDone):
            self.done.errback(UpstreamError("upstream body ended early", kind="protocol"))
        else:
            self.done.errback(UpstreamError(f"upstream connection lost: {reason.getErrorMessage()}"))

    def stop(self) -> None:
        self._abort(FillFailed("download stopped"))


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
        clock: Any,
        runner: Runner,
        chunk_size: int,
        connections: int,
        retry_attempts: int,
        retry_delay: float,
        idle_timeout: float,
        gate: DeferredSemaphore | None = None,
        events: Events | None = None,
        admit: Callable[[Fill], Awaitable[None]] | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.hexdigest = hexdigest
        self.digest = "sha256:" + hexdigest
        self.size = size
        self.repository = repository
        self.source = source
        self.store = store
        self.clock = clock
        self.runner = runner
        self.chunk_size = chunk_size
        self.connections = connections
        # More connections while readers wait on more distinct chunks (a Go client's 16 parts).
        self.max_connections = max(connections, max_connections or connections)
        self.retry_attempts = retry_attempts
        self.retry_delay = retry_delay
        self.idle_timeout = idle_timeout
        self.gate = gate
        self.events = events or Events()
        self.admit = admit  # may refuse the download (no room) before anything is written
        self.nchunks = max(1, -(-size // chunk_size))
        self.done = [False] * self.nchunks
        self.filled = [0] * self.nchunks  # bytes on disk from each chunk's start
        self.inflight: set[int] = set()
        self.writers: set[_ChunkWriter] = set()
        self.fd = -1
        self.complete = False
        self.failure: Failure | None = None
        self.resumed_bytes = 0
        self.received_bytes = 0
        self.started_at: float | None = None
        self._stopping = False
        self._ranged: bool | None = None  # unknown until the first upstream answer
        self._waiters: dict[int, list[tuple[int, Deferred[None]]]] = {}  # chunk -> (offset, waiter)
        self._finished: list[Deferred[None]] = []
        self._hasher = hashlib.sha256()
        self._hashed_chunks = 0
        self._hashing = False
        self._state_lock = DeferredLock()
        self._save_queued = False
        self._workers = 0
        self._fd_users = 0  # jobs in threads using self.fd; it is closed only when none is left
        self._close_wanted = False
        self._following = False  # another process (worker) holds the download: we read its record
        self.followed = False  # this Fill followed another process's download (for its log line)
        self._follow_timer: IDelayedCall | None = None
        # Followers list the chunks their readers wait on in a small file; the holder reads them.
        self._wants_tag = f"{os.getpid()}-{next(_serial)}"
        self._wants_published: frozenset[int] = frozenset()  # (as a follower) last listed
        self._wants_lock = DeferredLock()  # one write of that list at a time, in order
        self._remote_wants: frozenset[int] = frozenset()  # (as the holder) what followers wait on
        self._wants_timer: IDelayedCall | None = None

    # --- what readers use ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """Stopped by the daemon shutting down (what is on disk is kept for the next start)."""
        return self._stopping

    @property
    def following(self) -> bool:
        """Another worker process downloads this blob; this Fill serves the chunks it records."""
        return self._following

    @property
    def ended(self) -> bool:
        return self.complete or self.failure is not None

    def open_reader(self) -> int:
        """A file descriptor of the blob's data for one reader.

        While the Fill runs, a new open of the Fill's own file (not a ``dup``: that would share the
        open file description and with it the download's ``flock``, so a slow reader would keep the
        lock after the Fill ended).  It stays valid when the partial file is renamed into
        ``blobs/``, so a reader never races the publish.  A failed Fill has nothing to read.
        """
        if self.failure is not None and not self.complete:
            raise FileNotFoundError(errno.ENOENT, f"the download of {self.digest} failed")
        if self.fd >= 0 and not self._close_wanted:
            return reopen(
                self.fd, self.store.partial_path(self.hexdigest), self.store.blob_path(self.hexdigest)
            )
        return os.open(self.store.blob_path(self.hexdigest), os.O_RDONLY)

    def available(self, offset: int) -> int:
        """How many bytes from *offset* on are on disk, contiguous."""
        if self.complete:
            return max(0, self.size - offset)
        total, position = 0, offset
        index = offset // self.chunk_size
        while index < self.nchunks:
            start = index * self.chunk_size
            end = min(self.size, start + self.chunk_size)
            ready_end = end if self.done[index] else start + self.filled[index]
            if ready_end <= position:
                break
            total += ready_end - position
            position = ready_end
            if ready_end < end:
                break
            index += 1
        return total

    def completed_bytes(self) -> int:
        """Bytes on disk, for progress reports."""
        if self.complete:
            return self.size
        return sum(
            min(self.size, (i + 1) * self.chunk_size) - i * self.chunk_size
            if self.done[i]
            else self.filled[i]
            for i in range(self.nchunks)
        )

    def wait(self, offset: int) -> Deferred[None]:
        """A Deferred (the caller's own) that fires when bytes at *offset* are on disk, or fails with
        :class:`FillFailed` when the download fails."""
        index = min(max(0, offset // self.chunk_size), self.nchunks - 1)
        d: Deferred[None] = Deferred(lambda d: self._forget(d, index))
        if self.failure is not None:
            d.errback(self.failure)
        elif self.available(offset) > 0 or self.complete:
            d.callback(None)
        else:
            self._waiters.setdefault(index, []).append((offset, d))
            self._schedule()
        return d

    def when_done(self) -> Deferred[None]:
        """A Deferred of the caller's own that fires when the blob is published (or fails)."""
        d: Deferred[None] = Deferred(lambda d: self._forget(d))
        if self.complete:
            d.callback(None)
        elif self.failure is not None:
            d.errback(self.failure)
        else:
            self._finished.append(d)
        return d

    def _forget(self, d: Deferred[None], index: int | None = None) -> None:
        waiting = self._waiters.get(index) if index is not None else None
        if waiting is not None:
            waiting[:] = [(o, w) for o, w in waiting if w is not d]
            if not waiting:
                del self._waiters[index]  # type: ignore[arg-type]
        if d in self._finished:
            self._finished.remove(d)

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
                    self._schedule()
                    self._advance_hash()
                    self._watch_wants()
        except Exception as e:
            self._fail(Failure(e))
        if not self.ended:
            await self.when_done().addErrback(lambda _: None)
        if self.gate is not None:
            self.gate.release()

    async def _open(self) -> None:
        """Take the download's lock and resume the partial file recorded on disk, or create one at
        full size (in a thread); or, when another process holds the lock, follow its download."""
        opened = await self.runner.run(self._open_partial)
        if self.ended:  # stopped meanwhile
            if opened.fd >= 0:
                os.close(opened.fd)
            return
        if opened.fd < 0:
            self._completed()  # published by another process meanwhile
            return
        fd = opened.fd
        if not opened.held:
            self.fd = fd
            self._following = self.followed = True
            log.debug("fill {digest}: another worker downloads it; following", digest=self.digest)
            self._apply(opened.state)
            self._follow_timer = self.clock.callLater(FOLLOW_INTERVAL, self._follow)
            return
        state = opened.state
        resumed = sorted(i for i in (state.done if state else ()) if 0 <= i < self.nchunks)
        self.resumed_bytes = sum(
            min(self.size, (i + 1) * self.chunk_size) - i * self.chunk_size for i in resumed
        )
        # self.fd stays unset until the file is ready: readers arriving meanwhile may schedule
        # upstream requests, whose bytes a reservation (which truncates) would otherwise wipe out.
        try:
            if self.admit is not None:
                await self.admit(self)
            if state is None and not self.ended:
                await self.runner.run(self._reserve, fd)
        except BaseException as e:
            if opened.created or isinstance(e, DiskFull):  # leave the cache as it was (we hold its lock)
                self.store.discard_partial(self.hexdigest, fd)
            os.close(fd)
            raise
        if self.ended:  # stopped meanwhile: nothing was written; the lock goes with the descriptor
            os.close(fd)
            return
        self.fd = fd
        for index in resumed:  # only now: "available" must always mean "readable through self.fd"
            self.done[index] = True
        if self.size == 0:
            self.done[0] = True  # nothing to fetch: hash the empty string and publish
        self._wake()

    def _open_partial(self) -> _Opened:
        """(thread) Open the partial file and try to take the download's lock.

        The lock is an exclusive ``flock`` on the partial file itself, so that worker processes
        sharing the cache run one download per blob: the holder downloads; the others follow the
        record of finished chunks and take over if the holder goes away (its lock goes with it).
        Having the lock counts only while the path still names the locked file: a holder that
        failed may have removed it between our open and our lock (then we try again).
        """
        path = self.store.partial_path(self.hexdigest)
        for _ in range(OPEN_ATTEMPTS):
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _Opened(fd, False, created, self._read_state(fd))
                if not self.store.partial_is(self.hexdigest, fd):  # removed or replaced meanwhile
                    os.close(fd)
                    continue
                if self.store.blob_size(self.hexdigest) is not None:  # the holder published and left
                    if created:
                        _unlink_quietly(path)
                    os.close(fd)
                    return _Opened(-1, True)
                state = self._read_state(fd, unbound_ok=not created)
                if state is None:  # starting afresh: no record may speak for this file's bytes
                    self.store.forget_partial_state(self.hexdigest)
                return _Opened(fd, True, created, state)
            except BaseException:
                os.close(fd)
                raise
        raise FillFailed(f"the partial file of {self.digest} keeps being replaced")

    def _read_state(self, fd: int, unbound_ok: bool = False) -> PartialState | None:
        return self.store.read_partial_state(
            self.hexdigest, self.size, self.chunk_size, fd, unbound_ok=unbound_ok
        )

    def _reserve(self, fd: int) -> None:
        """(thread) A fresh partial file gets its whole size reserved, so that a full disk shows now.

        It truncates first: only ever before any byte of this download is written (see ``_open``
        and the takeover in ``_look_at_holder``, which runs while nothing is scheduled).
        """
        os.ftruncate(fd, 0)
        try:
            if self.size:
                os.posix_fallocate(fd, 0, self.size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(f"no space left on the cache's disk for blob {self.digest}") from None
            os.ftruncate(fd, self.size)  # a filesystem that cannot reserve space: sparse file

    # --- following a download another process runs ---------------------------------------------

    def _apply(self, state: PartialState | None) -> None:
        """Chunks the holder recorded as finished are readable here too."""
        for index in state.done if state is not None else ():
            if 0 <= index < self.nchunks and not self.done[index]:
                self.done[index] = True
                self._wake(index)

    def _follow(self) -> None:
        self._follow_timer = None
        if not self.ended:
            self._publish_wants(frozenset(i for i in self._waiters if not self.done[i]))
            self._on_fd(self._look_at_holder).addCallbacks(self._looked, self._fail)

    def _publish_wants(self, wanted: frozenset[int]) -> None:
        """(as a follower) Tell the holder which chunks our readers wait on, when that changed: it
        fetches them first, as it does for its own readers."""
        if wanted == self._wants_published:
            return
        self._wants_published = wanted
        write = self.store.write_wants
        d = self._wants_lock.run(self.runner.run, write, self.hexdigest, self._wants_tag, wanted)
        d.addErrback(self._wants_error)

    def _watch_wants(self) -> None:
        """(as the holder) Look at what followers' readers wait on, now and every WANTS_INTERVAL."""
        self._wants_timer = None
        if self.ended or self._following or self._stopping:
            return
        d = self.runner.run(self.store.read_wants, self.hexdigest)
        d.addCallbacks(self._got_wants, self._wants_unread)

    def _got_wants(self, wanted: frozenset[int]) -> None:
        if self.ended:
            return
        self._remote_wants = frozenset(i for i in wanted if 0 <= i < self.nchunks)
        self._schedule()
        self._wants_timer = self.clock.callLater(WANTS_INTERVAL, self._watch_wants)

    def _wants_unread(self, failure: Failure) -> None:
        self._wants_error(failure)
        self._got_wants(self._remote_wants)  # (and look again later)

    def _wants_error(self, failure: Failure) -> None:
        log.warn("fill {digest}: wanted chunks: {error}", digest=self.digest, error=failure.getErrorMessage())

    def _look_at_holder(self) -> tuple[str, PartialState | None]:
        """(thread) What the holder did since the last look: published, failed, went away, or progressed.

        Only what concerns our own file counts: its record (bound to its inode), and a published
        blob that is this very file (a rename keeps the inode).  Anything else means the download
        we followed is gone, and what we served from it cannot be vouched for: "lost".
        """
        seen = self._published()
        if seen is not None:
            return seen, None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.store.partial_is(self.hexdigest, self.fd):
                return "following", self._read_state(self.fd)
            return self._published() or "lost", None  # (published between the two looks, or gone)
        seen = self._published()
        if seen is not None:
            return seen, None
        if not self.store.partial_is(self.hexdigest, self.fd):
            return "lost", None  # the holder failed and discarded its data
        state = self._read_state(self.fd)
        if state is None:  # nothing recorded: start from scratch
            if any(self.done):
                return "lost", None  # its record went away: what was served here cannot be vouched for
            self.store.forget_partial_state(self.hexdigest)
            self._reserve(self.fd)
        return "taken over", state

    def _published(self) -> str | None:
        """(thread) "published" if ``blobs/`` has our file, "lost" if it has another, else None."""
        if self.store.blob_size(self.hexdigest) is None:
            return None
        return "published" if same_file(self.store.blob_path(self.hexdigest), self.fd) else "lost"

    def _looked(self, result: tuple[str, PartialState | None]) -> None:
        what, state = result
        if self.ended:
            return
        if what == "published":
            self._completed()
        elif what == "lost":
            self._fail(Failure(FillFailed(f"the download of {self.digest} in another worker failed")))
        else:
            self._apply(state)
            if what == "taken over":
                self._following = False
                log.info(
                    "fill {digest}: taking over the download of a worker that stopped", digest=self.digest
                )
                self._publish_wants(frozenset())
                self._schedule()
                self._advance_hash()
                self._watch_wants()
            else:
                self._follow_timer = self.clock.callLater(FOLLOW_INTERVAL, self._follow)

    def _next_chunk(self) -> int | None:
        """The chunk a reader (here or in a follower) waits on first, else the lowest one nobody is
        fetching."""
        for index in sorted(self._waiters.keys() | self._remote_wants):
            if not self.done[index] and index not in self.inflight:
                return index
        for index in range(self.nchunks):
            if not self.done[index] and index not in self.inflight:
                return index
        return None

    def _schedule(self) -> None:
        """Start workers up to the allowed number (one until we know the upstream does ranges)."""
        # Re-checked each round: a worker can run to its end (even fail the Fill) inside fromCoroutine.
        while (
            self.fd >= 0
            and not self._following
            and not self.ended
            and not self._stopping
            and self._workers < self._allowed_workers()
            and self._next_chunk() is not None
        ):
            self._workers += 1
            Deferred.fromCoroutine(self._worker()).addErrback(self._fail)

    def _allowed_workers(self) -> int:
        """One until the upstream is known to do ranges; then ``connections``, or more while readers
        wait on chunks nobody fetches yet: one per chunk being fetched or waited on, up to
        ``max_connections``."""
        if not self._ranged:
            return 1
        wanted = self.inflight.union(i for i in self._waiters.keys() | self._remote_wants if not self.done[i])
        return max(self.connections, min(self.max_connections, len(wanted)))

    async def _worker(self) -> None:
        try:
            while not self.ended and not self._stopping:
                if self._workers > self._allowed_workers():
                    return  # readers went away: back to the usual number of connections
                index = self._next_chunk()
                if index is None:
                    return
                self.inflight.add(index)
                try:
                    await self._fetch_with_retries(index)
                finally:
                    self.inflight.discard(index)
        finally:
            self._workers -= 1

    async def _fetch_with_retries(self, index: int) -> None:
        failures = 0
        while True:
            try:
                await self._fetch(index)
                return
            except UpstreamError as e:
                if self._stopping or self.ended:
                    return
                self.events.upstream_error(e.kind)
                failures += 1
                if failures > self.retry_attempts or not e.transient:
                    raise FillFailed(f"download of {self.digest} failed: {e.message}") from None
                delay = self.retry_delay * 2 ** (failures - 1)
                log.warn(
                    "fill {digest}: chunk {index}: {error}; retry {n} of {max} in {delay:g} s",
                    digest=self.digest,
                    index=index,
                    error=e.message,
                    n=failures,
                    max=self.retry_attempts,
                    delay=delay,
                )
                await deferLater(self.clock, delay)

    async def _fetch(self, index: int) -> None:
        chunk_start = index * self.chunk_size
        chunk_end = min(self.size, chunk_start + self.chunk_size)
        start = chunk_start + self.filled[index]
        if self._ranged is False:
            start, chunk_end = 0, self.size  # the upstream ignores ranges: one stream, from the start
        response = await self.source.open_range(self.repository, self.digest, start, chunk_end - 1)
        if response.code == 200:
            if self._ranged is None or start == 0:
                self._ranged = False
                start, chunk_end = 0, self.size
            else:
                await discard(response)
                raise UpstreamError("upstream stopped honouring Range", 502, kind="protocol")
        else:
            if content_range_start(response) != start:
                await discard(response)
                raise UpstreamError("upstream sent the wrong range", 502, kind="protocol")
            if self._ranged is None:
                self._ranged = True
                self._schedule()
        writer = _ChunkWriter(self, start, chunk_end)
        self.writers.add(writer)
        try:
            response.deliverBody(writer)
            await writer.done
        finally:
            self.writers.discard(writer)

    def write_unfinished(self, data: bytes, offset: int) -> None:
        """Write *data* at *offset*, skipping chunks already finished: their bytes may have been hashed
        (a retry that streams the whole body again must not change them)."""
        position, end = offset, offset + len(data)
        while position < end:
            index = position // self.chunk_size
            piece_end = min(end, (index + 1) * self.chunk_size)
            if not self.done[index]:
                os.pwrite(self.fd, data[position - offset : piece_end - offset], position)
            position = piece_end

    def wrote(self, start: int, end: int) -> None:
        """Bytes [start, end) are on disk: advance chunk marks, wake readers, finish chunks."""
        self.received_bytes += end - start
        self.events.upstream_bytes(end - start)
        index = start // self.chunk_size
        while index < self.nchunks and index * self.chunk_size < end:
            chunk_start = index * self.chunk_size
            chunk_end = min(self.size, chunk_start + self.chunk_size)
            if not self.done[index] and chunk_start + self.filled[index] >= start:
                self.filled[index] = max(self.filled[index], min(end, chunk_end) - chunk_start)
                if chunk_start + self.filled[index] >= chunk_end:
                    self._chunk_done(index)
                self._wake(index)
            index += 1

    def _chunk_done(self, index: int) -> None:
        self.done[index] = True
        if not self._save_queued:  # a save already waiting records this chunk too
            self._save_queued = True
            self._state_lock.run(self._save_state).addErrback(self._fail)
        self._advance_hash()

    def _save_state(self) -> Deferred[None]:
        self._save_queued = False  # chunks finished from now on need a save of their own
        if self.ended:
            return Deferred.fromCoroutine(_nothing())
        state = PartialState(
            self.size, self.chunk_size, frozenset(i for i in range(self.nchunks) if self.done[i])
        )
        return self._on_fd(self._write_state, state)

    def _write_state(self, state: PartialState) -> None:
        if not self.ended:  # (thread) a failed Fill's partial may already be gone or someone else's
            self.store.write_partial_state(self.hexdigest, self.fd, state)

    def _on_fd(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run a job that uses ``self.fd`` in a thread, keeping the fd open until it returns."""
        self._fd_users += 1

        def release(result: object) -> object:
            self._fd_users -= 1
            if self._close_wanted and self._fd_users == 0:
                self._close_fd()
            return result

        return self.runner.run(f, *args).addBoth(release)

    def _wake(self, index: int | None = None) -> None:
        """Fire the waiters whose bytes are on disk: those of chunk *index*, or all of them.

        Waiters are kept by chunk, so that each write looks only at the readers of its own chunk.
        """
        for chunk in list(self._waiters) if index is None else [index]:
            waiting = self._waiters.get(chunk)
            if not waiting:
                continue
            ready = [d for o, d in waiting if self.available(o) > 0]
            if not ready:
                continue
            left = [(o, d) for o, d in waiting if self.available(o) <= 0]
            if left:
                self._waiters[chunk] = left
            else:
                del self._waiters[chunk]
            for d in ready:
                d.callback(None)

    # --- hashing and publishing ----------------------------------------------------------------

    def _advance_hash(self) -> None:
        if self._hashing or self.ended or self.fd < 0 or self._following:
            return
        self._hashing = True
        Deferred.fromCoroutine(self._hash_prefix()).addErrback(self._fail)

    async def _hash_prefix(self) -> None:
        try:
            while self._hashed_chunks < self.nchunks and self.done[self._hashed_chunks] and not self.ended:
                start = self._hashed_chunks * self.chunk_size
                end = min(self.size, start + self.chunk_size)
                await self._on_fd(_hash_range, self._hasher, self.fd, start, end)
                self._hashed_chunks += 1
        finally:
            self._hashing = False
        if self._hashed_chunks == self.nchunks and not self.ended:
            await self._finish()

    async def _finish(self) -> None:
        actual = self._hasher.hexdigest()
        await self._state_lock.acquire()  # no state record may be written after this
        try:
            if self.ended:  # stopped or failed while waiting for the lock
                return
            if actual != self.hexdigest:
                self.events.digest_mismatch(self)
                await self._on_fd(self.store.discard_partial, self.hexdigest, self.fd)
                self._fail(
                    Failure(
                        DigestMismatch(f"blob {self.digest} arrived with digest sha256:{actual}; discarded")
                    )
                )
                return
            await self._on_fd(self.store.publish_blob, self.hexdigest, self.fd)
        finally:
            self._state_lock.release()
        if self.ended:  # failed (shutdown) during the publish: the published blob is verified and stays
            return
        elapsed = self.clock.seconds() - (self.started_at or self.clock.seconds())
        log.debug(
            "fill {digest}: complete and verified, {received} bytes from upstream in {elapsed:.1f} s",
            digest=self.digest,
            received=self.received_bytes,
            elapsed=elapsed,
        )
        self._completed()

    def _completed(self) -> None:
        """The verified blob is in ``blobs/`` (published here or by the worker this Fill followed)."""
        self.complete = True
        self._following = False
        self._end_timers()
        self._close_fd()
        self.events.fill_ended(self, None)
        self._wake()
        finished, self._finished = self._finished, []
        for d in finished:
            d.callback(None)

    # --- ending --------------------------------------------------------------------------------

    def _fail(self, failure: Failure) -> None:
        if self.ended:
            return
        if not failure.check(FillFailed):
            failure = Failure(FillFailed(f"download of {self.digest} failed: {failure.getErrorMessage()}"))
        self.failure = failure
        self._end_timers()
        log.debug("fill {digest}: {error}", digest=self.digest, error=failure.getErrorMessage())
        self.events.fill_ended(self, failure.getErrorMessage())
        if failure.check(DiskFull) and not self._following:  # leave the cache as it was, now
            self.store.discard_partial(self.hexdigest, self.fd if self.fd >= 0 else None)
        for writer in list(self.writers):
            writer.stop()
        self._close_fd()
        waiters, self._waiters = self._waiters, {}
        finished, self._finished = self._finished, []
        for d in [d for waiting in waiters.values() for _, d in waiting] + finished:
            d.errback(failure)

    def _end_timers(self) -> None:
        """No more looks at the holder or at followers; our own list of wanted chunks goes."""
        for timer in (self._follow_timer, self._wants_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._follow_timer = self._wants_timer = None
        self._publish_wants(frozenset())

    def stop(self) -> Deferred[None]:
        """Stop downloading (daemon shutdown); what is on disk stays for the next start."""
        self._stopping = True
        if not self.ended:  # _fail also cuts the transfers in flight
            self._fail(Failure(FillFailed(f"download of {self.digest} stopped (shutting down)")))
        return DeferredList(
            [self._state_lock.run(_nothing_deferred), self._wants_lock.run(_nothing_deferred)]
        ).addCallback(lambda _: None)

    def _close_fd(self) -> None:
        if self._fd_users:
            self._close_wanted = True
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reopen(fd: int, *paths: str) -> int:
    """A read-only descriptor of *fd*'s file with an open file description of its own.

    Through ``/proc/self/fd`` (which works even once the file is renamed or unlinked); where there
    is no ``/proc``, through whichever of *paths* still names the same file.
    """
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        pass
    wanted = os.fstat(fd)
    for path in paths:
        try:
            other = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        st = os.fstat(other)
        if (st.st_dev, st.st_ino) == (wanted.st_dev, wanted.st_ino):
            return other
        os.close(other)
    raise FileNotFoundError(errno.ENOENT, "the blob's file is gone")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _hash_range(hasher: Any, fd: int, start: int, end: int) -> None:
    """Feed bytes [start, end) of the file to the hasher (runs in a thread; hashlib drops the GIL)."""
    position = start
    while position < end:
        data = os.pread(fd, min(HASH_READ_SIZE, end - position), position)
        if not data:
            raise FillFailed("partial file is shorter than expected")
        hasher.update(data)
        position += len(data)


async def _nothing() -> None:
    return None


def _nothing_deferred() -> Deferred[None]:
    return Deferred.fromCoroutine(_nothing())
