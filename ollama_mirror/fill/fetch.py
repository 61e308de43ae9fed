"""Ranged upstream requests for one Fill: a few workers, each fetching one chunk at a time.

Each worker takes the next chunk (one a reader waits on first), asks the source for it with ``Range``
and writes what arrives at its offset through a :class:`ChunkWriter`.  A short last chunk (at most a
quarter of a chunk) comes with the chunk before it, in the same request: fetched alone it would cost a
request of its own at the very end, when every reader is waiting for it.  An upstream that answers a range
with 200 means "no ranges": one worker then streams the whole body from the start; so one request probes
first, unless the source can tell at once that it honours ranges (the cluster's shared store), when all
workers start together.  Transient upstream
errors are retried with exponential backoff; a worker that got no bytes for ``idle_timeout`` seconds
gives its chunk up and retries it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TxProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from ..cache.blobs import BlobSource
from ..cache.space import is_no_space
from ..events import Events
from ..upstream.client import content_range_start, discard
from ..upstream.errors import UpstreamError
from ..upstream.retry import RetryPolicy
from .chunks import ChunkMap
from .errors import FillFailed, disk_full

log = Logger(namespace="ollama_mirror.fill")  # pinned: log names are public
UPSTREAM_READ_SIZE = 2**20  # bytes per read from an upstream socket (Twisted's default is 64 KiB)
SHORT_TAIL = 4  # a last chunk of at most 1/SHORT_TAIL of a chunk is fetched with the one before it


class ChunkSink(Protocol):
    """Where a fetched body goes (the Fill): written at its offset, then announced."""

    digest: str

    @property
    def path(self) -> str:
        """The file written (for the operator's log line when the disk is full)."""

    def write_unfinished(self, data: bytes, offset: int) -> None: ...

    def wrote(self, start: int, end: int) -> None: ...


class ChunkWriter(TxProtocol):
    """Receives one upstream body and writes it into the sink from *offset* on, up to *end*."""

    def __init__(
        self, sink: ChunkSink, offset: int, end: int, clock: IReactorTime, idle_timeout: float
    ) -> None:
        self.sink = sink
        self.offset = offset
        self.end = end  # exclusive
        self.clock = clock
        self.idle_timeout = idle_timeout
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
            self.timer.reset(self.idle_timeout)
        else:
            self.timer = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        self._abort(UpstreamError(f"upstream sent nothing for {self.idle_timeout:g} s", kind="idle"))

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
                self.sink.write_unfinished(data, self.offset)
            except OSError as e:
                self._abort(
                    disk_full(self.sink.digest, self.sink.path)
                    if is_no_space(e)
                    else FillFailed(f"cannot write blob {self.sink.digest}: {e.strerror}")
                )
                return
            start, self.offset = self.offset, self.offset + len(data)
            self.sink.wrote(start, self.offset)
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
            self.done.errback(UpstreamError(f"{self._source()} body ended early", kind="protocol"))
        else:
            self.done.errback(UpstreamError(f"{self._source()} connection lost: {reason.getErrorMessage()}"))

    def _source(self) -> str:
        """Where the body came from, for errors: ``upstream``, or in a cluster the store or another node."""
        origin = str(getattr(self.sink, "origin", "upstream"))
        return "upstream" if origin == "upstream" else f"{origin}:"

    def stop(self) -> None:
        self._abort(FillFailed("download stopped"))


class RangeFetcher:
    """The upstream side of one Fill (see the module docstring).

    *may_fetch* says whether workers may run now (the file is ready, this process holds the download,
    it is neither ended nor stopping); *wanted* lists the chunks readers wait on; *fail* ends the Fill.
    """

    def __init__(
        self,
        *,
        source: BlobSource,
        repository: str,
        chunks: ChunkMap,
        sink: ChunkSink,
        clock: IReactorTime,
        events: Events,
        connections: int,
        max_connections: int,
        retry: RetryPolicy,
        idle_timeout: float,
        may_fetch: Callable[[], bool],
        wanted: Callable[[], set[int]],
        fail: Callable[[Failure], None],
    ) -> None:
        self.source = source
        self.repository = repository
        self.chunks = chunks
        self.sink = sink
        self.clock = clock
        self.events = events
        self.connections = connections
        # More connections while readers wait on more distinct chunks (a Go client's 16 parts).
        self.max_connections = max(connections, max_connections)
        self.retry = retry
        self.idle_timeout = idle_timeout
        self._may_fetch = may_fetch
        self._wanted = wanted
        self._fail = fail
        self.ranged: bool | None = None  # unknown until the first upstream answer
        self.workers = 0
        self.writers: set[ChunkWriter] = set()

    def schedule(self) -> None:
        """Start workers up to the allowed number (one until we know the upstream does ranges)."""
        # Re-checked each round: a worker can run to its end (even fail the Fill) inside fromCoroutine.
        while (
            self._may_fetch()
            and self.workers < self.allowed_workers()
            and self.chunks.next_chunk(self._wanted()) is not None
        ):
            self.workers += 1
            Deferred.fromCoroutine(self._worker()).addErrback(self._fail)

    def allowed_workers(self) -> int:
        """One until the upstream is known to do ranges; then ``connections``, or more while readers
        wait on chunks nobody fetches yet: one per chunk being fetched or waited on, up to
        ``max_connections``."""
        if not self.ranged:
            return 1
        wanted = self.chunks.inflight | self.chunks.unfinished(self._wanted())
        return max(self.connections, min(self.max_connections, len(wanted)))

    def stop_transfers(self) -> None:
        """Cut every transfer in flight (the Fill ended)."""
        for writer in list(self.writers):
            writer.stop()

    async def _worker(self) -> None:
        try:
            while self._may_fetch():
                if self.workers > self.allowed_workers():
                    return  # readers went away: back to the usual number of connections
                index = self.chunks.next_chunk(self._wanted())
                if index is None:
                    return
                last = self._short_tail(index) or index
                taken = set(range(index, last + 1))
                self.chunks.inflight.update(taken)
                try:
                    await self._fetch_with_retries(index, last)
                finally:
                    self.chunks.inflight.difference_update(taken)
        finally:
            self.workers -= 1

    async def _honours_ranges(self) -> bool:
        """Whether the source says it answers ranges with 206 (a store holding the blob); a source that
        cannot tell is probed with the first request."""
        honours = getattr(self.source, "honours_ranges", None)
        return honours is not None and bool(await honours(self.sink.digest))

    def _short_tail(self, index: int) -> int | None:
        """The last chunk, when it is short and follows *index* and nobody has fetched any of it yet."""
        chunks = self.chunks
        tail = index + 1
        if (
            tail != chunks.count - 1
            or chunks.length(tail) * SHORT_TAIL > chunks.chunk_size
            or chunks.done[tail]
            or chunks.filled[tail]
            or tail in chunks.inflight
        ):
            return None
        return tail

    async def _fetch_with_retries(self, index: int, last: int) -> None:
        """Fetch chunks *index* to *last* (one request), resuming from the bytes they have when the body
        breaks off (a cut, a stall) under the upstream retry policy; an answer the upstream's own retries
        gave up on is final."""
        failures = 0
        while True:
            try:
                await self._fetch(index, last)
                return
            except UpstreamError as e:
                if not self._may_fetch():
                    return
                self.events.upstream_error(e.kind)
                failures += 1
                if e.final or not e.transient or failures > self.retry.attempts:
                    raise FillFailed(f"download of {self.sink.digest} failed: {e.message}") from None
                delay = self.retry.wait_before(failures, e.retry_after)
                log.warn(
                    "fill {digest}: chunk {index}: {error}; retry {n} of {max} in {delay:.1f} s",
                    digest=self.sink.digest,
                    index=index,
                    error=e.message,
                    n=failures,
                    max=self.retry.attempts,
                    delay=delay,
                )
                await deferLater(self.clock, delay)

    async def _fetch(self, index: int, last: int) -> None:
        first = next((i for i in range(index, last + 1) if not self.chunks.done[i]), None)
        if first is None:
            return  # (finished by a whole-body stream meanwhile)
        start = self.chunks.bounds(first)[0] + self.chunks.filled[first]
        chunk_end = self.chunks.bounds(last)[1]
        if self.ranged is False:
            start, chunk_end = 0, self.chunks.size  # the upstream ignores ranges: one stream, from the start
        if self.ranged is None and await self._honours_ranges():
            self.ranged = True  # (before this probe's answer: every worker starts now)
            self.schedule()
        response = await self.source.open_range(self.repository, self.sink.digest, start, chunk_end - 1)
        if response.code == 200:
            if self.ranged is None or start == 0:
                self.ranged = False
                start, chunk_end = 0, self.chunks.size
            else:
                await discard(response)
                raise UpstreamError("upstream stopped honouring Range", 502, kind="protocol")
        else:
            if content_range_start(response) != start:
                await discard(response)
                raise UpstreamError("upstream sent the wrong range", 502, kind="protocol")
            if self.ranged is None:
                self.ranged = True
                self.schedule()
        writer = ChunkWriter(self.sink, start, chunk_end, self.clock, self.idle_timeout)
        self.writers.add(writer)
        try:
            response.deliverBody(writer)
            await writer.done
        finally:
            self.writers.discard(writer)
