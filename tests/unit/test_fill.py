"""The Fill on a fake clock, with an upstream the test drives byte by byte."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from ollama_mirror.cache.store import PartialState, Store
from ollama_mirror.events import Events
from ollama_mirror.fill.coordinator import Fill
from ollama_mirror.fill.errors import DigestMismatch, DiskFull, FillFailed
from ollama_mirror.fill.follow import FOLLOW_INTERVAL, WANTS_INTERVAL
from ollama_mirror.runner import InlineRunner
from ollama_mirror.upstream.errors import UpstreamError
from ollama_mirror.upstream.retry import RetryPolicy

CHUNK = 1000


class FakeTransport:
    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.stopped = False

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.response.lose(ResponseFailed([Failure(ConnectionError("aborted"))]))


@dataclass
class FakeResponse:
    """An upstream response whose body the test sends piece by piece."""

    code: int
    start: int
    end: int | None
    headers: Headers = field(default_factory=Headers)
    protocol: Any = None
    transport: FakeTransport | None = None
    ended: bool = False

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        self.transport = FakeTransport(self)
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.lose(ResponseDone())

    def lose(self, reason: Exception) -> None:
        if not self.ended:
            self.ended = True
            self.protocol.connectionLost(Failure(reason))


@dataclass
class Request:
    start: int
    end: int | None
    answer: Deferred[Any]


class FakeSource:
    """Records each ranged request; the test answers it."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.requests: list[Request] = []

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> Any:
        request = Request(start, end, Deferred())
        self.requests.append(request)
        return await request.answer

    def pending(self) -> list[Request]:
        return [r for r in self.requests if not r.answer.called]

    def respond(
        self, request: Request, *, code: int = 206, send: bool = True, body: bytes | None = None
    ) -> FakeResponse:
        last = len(self.blob) - 1 if request.end is None else request.end
        response = FakeResponse(code, request.start, request.end)
        if code == 206:
            response.headers.setRawHeaders(
                b"content-range", [f"bytes {request.start}-{last}/{len(self.blob)}".encode()]
            )
        request.answer.callback(response)
        if send:
            data = (
                body
                if body is not None
                else (self.blob if code == 200 else self.blob[request.start : last + 1])
            )
            response.send(data)
            response.finish()
        return response

    def serve_all(self, limit: int = 1000) -> None:
        for _ in range(limit):
            pending = self.pending()
            if not pending:
                return
            self.respond(pending[0])
        raise AssertionError("the fill kept asking")


class HeardDiskFull(Events):
    def __init__(self) -> None:
        self.full: list[str] = []

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        self.full.append(path)


def make_fill(tmp_path: Path, blob: bytes, source: FakeSource, clock: Clock, **kwargs: Any) -> Fill:
    store = Store(str(tmp_path / "cache"))
    store.create()
    settings: dict[str, Any] = {
        "chunk_size": CHUNK,
        "connections": 2,
        "idle_timeout": 10.0,
    }
    attempts = kwargs.pop("retry_attempts", 2)
    settings["retry"] = RetryPolicy(clock, attempts, 1.0, jitter=lambda: 1.0)  # whole delays: 1 s, 2 s
    settings.update(kwargs)
    return Fill(
        hexdigest=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        repository="library/tiny",
        source=source,
        store=store,
        clock=clock,
        runner=InlineRunner(),
        **settings,
    )


@pytest.fixture
def blob() -> bytes:
    return os.urandom(4500)  # five chunks, the last one short


def published(fill: Fill) -> bytes:
    with open(fill.store.blob_path(fill.hexdigest), "rb") as f:
        return f.read()


def test_ranged_download_over_several_connections_is_verified_and_published(
    tmp_path: Path, blob: bytes
) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock)
    done = fill.when_done()
    fill.start()
    assert [(r.start, r.end) for r in source.requests] == [(0, 999)]  # one probe until ranges are known
    source.respond(source.requests[0])
    assert len(source.pending()) == 2  # ranges work: now both connections
    source.serve_all()
    assert done.called and fill.complete
    assert published(fill) == blob
    assert sorted((r.start, r.end) for r in source.requests) == [
        (i, min(i + 999, 4499)) for i in range(0, 4500, 1000)
    ]
    assert not os.path.exists(fill.store.partial_path(fill.hexdigest))
    assert not os.path.exists(fill.store.state_path(fill.hexdigest))


def test_readers_see_bytes_as_they_arrive_and_their_chunk_goes_first(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    waiting = fill.wait(3500)  # a reader wants chunk 3
    response = source.respond(source.requests[0], send=False)
    response.send(blob[:300])
    assert fill.available(0) == 300 and fill.available(100) == 200
    assert not waiting.called
    response.send(blob[300:1000])
    response.finish()
    assert [(r.start, r.end) for r in source.pending()] == [(3000, 3999)]  # the reader's chunk, not chunk 1
    source.respond(source.pending()[0])
    assert waiting.called
    assert fill.available(3500) == 500 and fill.available(1000) == 0


def test_an_upstream_ignoring_range_is_read_as_one_stream(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock)
    fill.start()
    source.respond(source.requests[0], code=200)
    assert fill.complete and published(fill) == blob
    assert len(source.requests) == 1


def test_a_cut_connection_is_retried_from_where_it_stopped(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    response = source.respond(source.requests[0], send=False)
    response.send(blob[:400])
    response.lose(ResponseFailed([Failure(ConnectionError("reset"))]))
    assert source.pending() == []
    clock.advance(1.0)  # retry_delay
    assert (source.requests[-1].start, source.requests[-1].end) == (400, 999)
    source.serve_all()
    assert fill.complete and published(fill) == blob


def test_retries_back_off_and_then_fail_keeping_the_partial_for_later(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1, retry_attempts=2)
    done = fill.when_done()
    fill.start()
    source.respond(source.requests[0])  # chunk 0 arrives
    for delay in (None, 1.0, 2.0):  # first try, then retries after 1 s and 2 s
        if delay is not None:
            clock.advance(delay - 0.01)
            assert source.pending() == []
            clock.advance(0.01)
        source.pending()[0].answer.errback(UpstreamError("upstream answered 503", 503))
    failure = []
    done.addErrback(failure.append)
    assert failure and failure[0].check(FillFailed)
    assert "503" in failure[0].getErrorMessage()
    state = json.loads(Path(fill.store.state_path(fill.hexdigest)).read_text())
    assert state["done"] == [0]  # chunk 0 stays on disk for the next attempt
    assert not os.path.exists(fill.store.blob_path(fill.hexdigest))


def test_a_404_is_not_retried(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock)
    reader = fill.wait(0)
    fill.start()
    source.requests[0].answer.errback(UpstreamError("upstream answered 404", 404))
    assert len(source.requests) == 1
    errors: list[Failure] = []
    reader.addErrback(errors.append)
    assert errors and errors[0].check(FillFailed)


def test_a_silent_body_is_dropped_after_the_idle_timeout_and_retried(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1, idle_timeout=5.0)
    fill.start()
    response = source.respond(source.requests[0], send=False)
    response.send(blob[:10])
    clock.advance(4.9)
    response.send(blob[10:20])  # activity resets the timer
    clock.advance(4.9)
    assert response.transport is not None and not response.transport.stopped
    clock.advance(0.2)
    assert response.transport.stopped
    clock.advance(1.0)
    assert source.pending()[0].start == 20
    source.serve_all()
    assert fill.complete and published(fill) == blob


def test_a_digest_mismatch_discards_everything_and_fails_readers(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    done = fill.when_done()
    fill.start()
    source.respond(source.requests[0], body=b"X" * 1000)  # corrupt chunk 0
    source.serve_all()
    errors: list[Failure] = []
    done.addErrback(errors.append)
    assert errors and errors[0].check(DigestMismatch)
    assert fill.failure is not None and fill.failure.check(DigestMismatch)
    assert not os.path.exists(fill.store.blob_path(fill.hexdigest))
    assert not os.path.exists(fill.store.partial_path(fill.hexdigest))
    assert not os.path.exists(fill.store.state_path(fill.hexdigest))


def test_a_new_fill_resumes_from_the_recorded_chunks(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    first = make_fill(tmp_path, blob, source, clock, connections=1)
    first.start()
    source.respond(source.requests[0])
    source.respond(source.pending()[0])  # chunks 0 and 1 done
    first.stop()
    assert json.loads(Path(first.store.state_path(first.hexdigest)).read_text())["done"] == [0, 1]

    source2 = FakeSource(blob)
    second = make_fill(tmp_path, blob, source2, clock, connections=1)
    second.start()
    assert second.resumed_bytes == 2000
    assert second.available(0) == 2000
    source2.serve_all()
    assert second.complete and published(second) == blob
    assert all(r.start >= 2000 for r in source2.requests)


def test_the_wrong_range_from_upstream_is_not_written(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1, retry_attempts=0)
    done = fill.when_done()
    fill.start()
    request = source.requests[0]
    response = FakeResponse(206, 0, 999)
    response.headers.setRawHeaders(b"content-range", [b"bytes 500-1499/4500"])
    request.answer.callback(response)
    response.send(blob[500:1500])  # the mirror reads it away (to reuse the connection) and gives up
    response.finish()
    errors: list[Failure] = []
    done.addErrback(errors.append)
    assert errors and "wrong range" in errors[0].getErrorMessage()


def test_stop_aborts_transfers_and_keeps_what_is_on_disk(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    source.respond(source.requests[0])
    response = source.respond(source.pending()[0], send=False)
    response.send(blob[1000:1100])
    stopped = fill.stop()
    assert stopped.called
    assert response.transport is not None and response.transport.stopped
    assert fill.failure is not None and "shutting down" in fill.failure.getErrorMessage()
    assert os.path.exists(fill.store.partial_path(fill.hexdigest))
    record = json.loads(Path(fill.store.state_path(fill.hexdigest)).read_text())
    assert record["done"] == [0] and record["filled"] == {"1": 100}  # every byte it had, to the last


def test_progress_within_a_chunk_is_recorded_as_it_arrives_and_survives_a_crash(
    tmp_path: Path, blob: bytes
) -> None:
    clock, source = Clock(), FakeSource(blob)
    first = make_fill(tmp_path, blob, source, clock, connections=1, progress_bytes=300)
    first.start()
    source.respond(source.requests[0])
    clock.advance(1)
    response = source.respond(source.pending()[0], send=False)
    response.send(blob[1000:1200])  # not yet worth a record
    state_path = Path(first.store.state_path(first.hexdigest))
    assert json.loads(state_path.read_text())["filled"] == {}
    response.send(blob[1200:1400])  # 400 bytes since the last record: it follows the data
    assert json.loads(state_path.read_text())["filled"] == {"1": 400}
    response.send(blob[1400:1450])
    os.close(first.partial.fd)  # killed: no goodbye, its lock goes with its descriptors

    source2 = FakeSource(blob)
    second = make_fill(tmp_path, blob, source2, clock, connections=1)
    second.start()
    assert second.resumed_bytes == 1400 and second.available(0) == 1400
    assert source2.requests[0].start == 1400  # the rest of chunk 1 only
    source2.serve_all()
    assert second.complete and published(second) == blob
    assert sum((r.end or len(blob) - 1) + 1 - r.start for r in source2.requests) == len(blob) - 1400


def test_a_follower_serves_the_holders_progress_within_a_chunk(tmp_path: Path, blob: bytes) -> None:
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1, progress_bytes=100)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    waiting = follower.wait(0)
    clock.advance(1)
    response = source_a.respond(source_a.requests[0], send=False)
    response.send(blob[:600])
    clock.advance(FOLLOW_INTERVAL)
    assert waiting.called and follower.available(0) == 600 and follower.available(600) == 0
    holder.stop()  # the holder goes away mid-chunk: the follower takes over from its last byte
    clock.advance(FOLLOW_INTERVAL)
    assert not follower.following
    assert source_b.requests[0].start == 600
    source_b.serve_all()
    assert follower.complete and published(follower) == blob and source_b.requests[0].start == 600


def test_a_full_disk_mid_write_keeps_what_it_had_and_resumes_once_space_returns(
    tmp_path: Path, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, source = Clock(), FakeSource(blob)
    heard = HeardDiskFull()
    fill = make_fill(tmp_path, blob, source, clock, connections=1, events=heard)
    done = fill.when_done()
    fill.start()
    source.respond(source.requests[0])  # chunk 0 is written fine

    def no_space(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as full:
        full.setattr(os, "pwrite", no_space)
        response = source.respond(source.pending()[0], send=False)
        response.send(blob[1000:1100])
    assert response.transport is not None and response.transport.stopped
    response.lose(ResponseFailed([Failure(ConnectionError("aborted"))]))
    errors: list[Failure] = []
    done.addErrback(errors.append)
    assert errors and errors[0].check(DiskFull)
    assert errors[0].getErrorMessage().startswith("the mirror's disk is full: no space left to store blob")
    assert str(tmp_path) not in errors[0].getErrorMessage()  # clients are not told where the cache is
    assert heard.full == [fill.store.partial_path(fill.hexdigest)]  # the operator is
    assert not os.path.exists(fill.store.blob_path(fill.hexdigest))
    assert json.loads(Path(fill.store.state_path(fill.hexdigest)).read_text())["done"] == [0]  # kept

    source2 = FakeSource(blob)  # space is back: the same blob, asked again, resumes
    again = make_fill(tmp_path, blob, source2, clock, connections=1)
    again.start()
    source2.serve_all()
    assert again.complete and published(again) == blob
    assert min(r.start for r in source2.requests) == CHUNK


def test_a_full_disk_for_the_record_of_progress_stops_the_download_the_same_way(
    tmp_path: Path, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, source = Clock(), FakeSource(blob)
    heard = HeardDiskFull()
    fill = make_fill(tmp_path, blob, source, clock, connections=1, events=heard)
    done = fill.when_done()
    fill.start()

    def no_space(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", fill.store.state_path(fill.hexdigest))

    monkeypatch.setattr(fill.store, "write_partial_state", no_space)
    source.respond(source.requests[0])  # chunk 0 finished: its record cannot be written
    errors: list[Failure] = []
    done.addErrback(errors.append)
    assert errors and errors[0].check(DiskFull)
    assert heard.full == [fill.store.state_path(fill.hexdigest)]
    assert os.path.exists(fill.store.partial_path(fill.hexdigest))  # (a retry starts from its last record)


def test_a_whole_body_retry_never_rewrites_chunks_already_finished(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    first = source.respond(source.requests[0], code=200, send=False)  # the upstream ignores Range
    first.send(blob[:2500])  # chunks 0 and 1 finished (and hashed), then the connection breaks
    first.lose(ResponseFailed([Failure(ConnectionError("reset"))]))
    clock.advance(1.0)
    tampered = b"X" * 2000 + blob[2000:]  # the retry's first 2000 bytes differ from the first attempt's
    source.respond(source.pending()[0], code=200, body=tampered)
    assert fill.complete
    assert published(fill) == blob  # what was hashed is what was published


def test_a_zero_byte_blob_is_published_without_asking_upstream(tmp_path: Path) -> None:
    clock, source = Clock(), FakeSource(b"")
    fill = make_fill(tmp_path, b"", source, clock)
    done = fill.when_done()
    fill.start()
    assert done.called and fill.complete
    assert source.requests == []
    assert published(fill) == b""


def test_readers_waiting_on_many_parts_get_a_connection_each_up_to_the_cap(tmp_path: Path) -> None:
    blob = os.urandom(10 * CHUNK)
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=2, max_connections=4)
    fill.start()
    source.respond(source.requests[0])  # the probe: ranges work (chunk 0 done)
    assert len(source.pending()) == 2  # the usual two connections, lowest chunks first
    waits = [fill.wait(offset) for offset in (5 * CHUNK, 7 * CHUNK + 10, 9 * CHUNK)]
    pending = source.pending()
    assert len(pending) == 4  # readers on three more chunks: grown to the cap, their chunks first
    assert {r.start for r in pending[2:]} == {5 * CHUNK, 7 * CHUNK}
    for request in pending:
        source.respond(request)
    assert all(w.called for w in waits[:2]) and not waits[2].called
    source.serve_all()
    assert all(w.called for w in waits) and fill.complete
    assert published(fill) == blob
    assert len(source.requests) == 10  # every chunk fetched once


def test_a_reader_is_woken_only_when_its_own_bytes_arrive(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    late, early = fill.wait(2500), fill.wait(100)
    response = source.respond(source.requests[0], send=False)
    response.send(blob[:100])
    assert not early.called  # byte 100 is not there yet
    response.send(blob[100:101])
    assert early.called and not late.called
    late.cancel()  # a reader hanging up leaves the download alone
    response.send(blob[101:1000])
    response.finish()
    source.serve_all()
    assert fill.complete and published(fill) == blob


# --- worker processes sharing one cache: one download per blob (the partial file's flock) ---------
# Two Fills with descriptors of their own conflict on flock as two processes do.


def test_a_second_worker_follows_the_download_instead_of_fetching_it_again(
    tmp_path: Path, blob: bytes
) -> None:
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    assert follower.following and not holder.following
    waiting, done = follower.wait(1500), follower.when_done()
    source_a.respond(source_a.requests[0])
    source_a.respond(source_a.pending()[0])  # chunks 0 and 1 finished and recorded
    assert not waiting.called  # not until the follower looks at the record
    clock.advance(FOLLOW_INTERVAL)
    assert waiting.called and follower.available(1500) == 500
    source_a.serve_all()
    assert holder.complete and not done.called
    clock.advance(FOLLOW_INTERVAL)
    assert done.called and follower.complete
    assert source_b.requests == []  # one upstream download for both
    with os.fdopen(follower.open_reader(), "rb") as f:
        assert f.read() == blob


def test_a_follower_takes_over_when_the_downloading_worker_stops(tmp_path: Path, blob: bytes) -> None:
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    done = follower.when_done()
    source_a.respond(source_a.requests[0])
    source_a.respond(source_a.pending()[0])
    holder.stop()  # the worker goes away: its lock with it
    clock.advance(FOLLOW_INTERVAL)
    assert not follower.following
    source_b.serve_all()
    assert done.called and follower.complete and published(follower) == blob
    assert min(r.start for r in source_b.requests) == 2 * CHUNK  # the recorded chunks were not fetched again


def test_a_follower_fails_when_the_downloading_worker_discards_a_corrupt_blob(
    tmp_path: Path, blob: bytes
) -> None:
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    done = follower.when_done()
    for _ in range(5):
        request = source_a.pending()[0]
        source_a.respond(request, body=b"x" * ((request.end or len(blob) - 1) - request.start + 1))
    assert isinstance(holder.failure.value if holder.failure else None, DigestMismatch)
    clock.advance(FOLLOW_INTERVAL)
    assert follower.failure is not None and source_b.requests == []
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(FillFailed)


def test_readers_arriving_while_the_download_is_admitted_wait_for_the_file(
    tmp_path: Path, blob: bytes
) -> None:
    """Nothing is fetched before the partial file is reserved (the reservation truncates it)."""
    clock, source = Clock(), FakeSource(blob)
    admitted: Deferred[None] = Deferred()

    async def admit(fill: Fill) -> None:
        await admitted

    fill = make_fill(tmp_path, blob, source, clock, admit=admit)
    fill.start()
    waiters = [fill.wait(0), fill.wait(2500)]  # readers ask while the admission is pending
    assert source.requests == []
    admitted.callback(None)
    source.serve_all()
    assert all(w.called for w in waiters)
    assert fill.complete and published(fill) == blob


def test_a_reader_does_not_keep_the_download_lock_after_the_fill_failed(tmp_path: Path, blob: bytes) -> None:
    """Readers have open file descriptions of their own: the flock belongs to the Fill alone."""
    clock, source = Clock(), FakeSource(blob)
    first = make_fill(tmp_path, blob, source, clock, connections=1, retry_attempts=0)
    first.start()
    source.respond(source.requests[0])
    reader = first.open_reader()  # a slow client still reading chunk 0
    try:
        source.pending()[0].answer.errback(UpstreamError("upstream answered 404", 404))
        assert first.failure is not None
        with pytest.raises(FileNotFoundError):
            first.open_reader()  # a failed download has nothing more to give
        source2 = FakeSource(blob)
        second = make_fill(tmp_path, blob, source2, clock, connections=1)
        second.start()
        assert not second.following  # it holds the lock and downloads, not waiting for nobody
        source2.serve_all()
        assert second.complete and published(second) == blob
        assert os.pread(reader, 1000, 0) == blob[:1000]
    finally:
        os.close(reader)


def test_a_stale_record_never_vouches_for_a_new_partial_file(tmp_path: Path, blob: bytes) -> None:
    """A record that outlived its file (a crash between two unlinks) says nothing about a new file."""
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    store = holder.store
    fd = os.open(store.partial_path(holder.hexdigest), os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(blob))
    store.write_partial_state(holder.hexdigest, fd, PartialState(len(blob), CHUNK, frozenset(range(5))))
    os.close(fd)
    os.unlink(store.partial_path(holder.hexdigest))  # (its inode may well be the new file's)
    holder.start()
    assert not os.path.exists(store.state_path(holder.hexdigest))
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    follower.start()
    assert follower.following and follower.available(0) == 0
    clock.advance(FOLLOW_INTERVAL)
    assert follower.available(0) == 0  # nothing is on disk yet: no fallocated zeros served as data
    source_a.respond(source_a.requests[0])
    clock.advance(FOLLOW_INTERVAL)
    assert follower.available(0) == CHUNK
    source_a.serve_all()
    clock.advance(FOLLOW_INTERVAL)
    assert follower.complete and published(follower) == blob


def fail_with_mismatch(source: FakeSource, blob: bytes) -> None:
    for _ in range(5):
        request = source.pending()[0]
        source.respond(request, body=b"x" * ((request.end or len(blob) - 1) - request.start + 1))


def test_a_follower_does_not_take_another_file_published_meanwhile_for_its_own(
    tmp_path: Path, blob: bytes
) -> None:
    clock, source_a, source_b, source_c = Clock(), FakeSource(blob), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    done = follower.when_done()
    fail_with_mismatch(source_a, blob)  # the holder discards its file; the follower still has it open
    third = make_fill(tmp_path, blob, source_c, clock, connections=1)
    third.start()  # a new download in a third worker, published before the follower looks again
    source_c.serve_all()
    assert third.complete
    clock.advance(FOLLOW_INTERVAL)
    assert follower.failure is not None and not follower.complete
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(FillFailed)


def test_a_follower_ignores_the_record_of_a_file_that_is_not_its_own(tmp_path: Path, blob: bytes) -> None:
    clock, source_a, source_b, source_c = Clock(), FakeSource(blob), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1)
    holder.start()
    follower.start()
    fail_with_mismatch(source_a, blob)
    ghost = os.open(f"/proc/self/fd/{follower.partial.fd}", os.O_RDONLY)  # the old file's lock, still held
    fcntl.flock(ghost, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        third = make_fill(tmp_path, blob, source_c, clock, connections=1)
        third.start()
        source_c.respond(source_c.requests[0])
        source_c.respond(source_c.pending()[0])  # the new file's chunks 0 and 1 are recorded
        clock.advance(FOLLOW_INTERVAL)
        assert follower.available(0) == 0  # the old file's bytes are never served as the new one's
        assert follower.failure is not None
    finally:
        os.close(ghost)


def test_a_lock_taken_on_a_file_removed_meanwhile_is_not_a_download(
    tmp_path: Path, blob: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    first = make_fill(tmp_path, blob, source_a, clock, connections=1)
    first.start()
    source_a.respond(source_a.requests[0])
    first.stop()  # a partial file with chunk 0 recorded
    path = first.store.partial_path(first.hexdigest)
    real_flock = fcntl.flock
    calls: list[int] = []

    def racing_flock(fd: int, operation: int) -> None:
        if not calls:  # another worker discards the file between our open and our lock
            os.unlink(path)
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", racing_flock)
    second = make_fill(tmp_path, blob, source_b, clock, connections=1)
    second.start()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert len(calls) == 2 and not second.following
    assert second.store.partial_is(second.hexdigest, second.partial.fd)
    source_b.serve_all()
    assert second.complete and published(second) == blob


def test_the_holder_never_publishes_a_file_that_replaced_its_own(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    for _ in range(4):
        source.respond(source.pending()[0])
    path = Path(fill.store.partial_path(fill.hexdigest))
    other = path.with_name("other")
    other.write_bytes(b"y" * len(blob))
    os.replace(other, path)
    source.serve_all()
    assert fill.failure is not None and not fill.complete
    assert not os.path.exists(fill.store.blob_path(fill.hexdigest))
    assert path.read_bytes() == b"y" * len(blob)  # someone else's file is left alone


def test_the_holder_fetches_first_what_readers_in_a_following_worker_wait_on(tmp_path: Path) -> None:
    """A far range served by another worker is not starved by the holder's lowest-first order."""
    blob = os.urandom(10 * CHUNK)
    clock, source_a, source_b = Clock(), FakeSource(blob), FakeSource(blob)
    holder = make_fill(tmp_path, blob, source_a, clock, connections=1, max_connections=4)
    follower = make_fill(tmp_path, blob, source_b, clock, connections=1, max_connections=4)
    holder.start()
    follower.start()
    source_a.respond(source_a.requests[0])  # ranges work; chunk 1 is next
    assert [r.start for r in source_a.pending()] == [CHUNK]
    waiting = follower.wait(8 * CHUNK + 10)  # a client of the other worker wants chunk 8
    clock.advance(WANTS_INTERVAL)  # the follower lists it; the holder reads the list
    assert [r.start for r in source_a.pending()] == [CHUNK, 8 * CHUNK]  # a connection of its own, now
    source_a.respond(source_a.pending()[1])
    assert [r.start for r in source_a.pending()] == [CHUNK]  # back to one connection
    clock.advance(FOLLOW_INTERVAL)
    assert waiting.called and follower.available(8 * CHUNK) == CHUNK
    clock.advance(FOLLOW_INTERVAL)
    wants = [p for p in os.listdir(holder.store.partial_dir) if ".wants." in p]
    assert wants == []  # nothing waited on any more: the list went
    source_a.serve_all()
    clock.advance(FOLLOW_INTERVAL)
    assert follower.complete and published(follower) == blob
    assert source_b.requests == [] and len(source_a.requests) == 10  # every chunk fetched once


def test_a_record_of_progress_is_believed_only_where_it_makes_sense(tmp_path: Path, blob: bytes) -> None:
    store = Store(str(tmp_path / "cache"))
    store.create()
    hexdigest = hashlib.sha256(blob).hexdigest()
    fd = os.open(store.partial_path(hexdigest), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, len(blob))
        store.write_partial_state(hexdigest, fd, PartialState(len(blob), CHUNK, frozenset({0}), {1: 250}))
        assert store.read_partial_state(hexdigest, len(blob), CHUNK, fd) == PartialState(
            len(blob), CHUNK, frozenset({0}), {1: 250}
        )
        path = Path(store.state_path(hexdigest))
        record = json.loads(path.read_text())
        record["filled"] = {"1": 250, "2": CHUNK, "3": -5, "4": 499, "x": 3, "5": 10}
        path.write_text(json.dumps(record))  # a whole chunk, a negative, past the short last one, junk
        state = store.read_partial_state(hexdigest, len(blob), CHUNK, fd)
        assert state is not None and state.filled == {1: 250, 4: 499}
    finally:
        os.close(fd)


def test_a_short_last_chunk_comes_with_the_chunk_before_it(tmp_path: Path) -> None:
    blob = os.urandom(4 * CHUNK + 100)  # the last chunk is a tenth of a chunk
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock)
    fill.start()
    source.serve_all()
    assert fill.complete and published(fill) == blob
    assert sorted((r.start, r.end) for r in source.requests) == [
        (0, 999),
        (1000, 1999),
        (2000, 2999),
        (3000, 4099),  # chunks 3 and 4: no request of its own for the 100 bytes at the very end
    ]


def test_a_cut_in_the_short_last_chunk_resumes_there(tmp_path: Path) -> None:
    blob = os.urandom(2 * CHUNK + 100)
    clock, source = Clock(), FakeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=1)
    fill.start()
    source.respond(source.requests[0])  # the probe: chunk 0
    assert (source.requests[1].start, source.requests[1].end) == (1000, 2099)
    reader = fill.wait(2 * CHUNK + 50)
    response = source.respond(source.requests[1], send=False)
    response.send(blob[1000:2040])  # chunk 1 and 40 bytes of the last one
    assert fill.chunks.done[1] and fill.available(2000) == 40 and not reader.called
    response.lose(ResponseFailed([Failure(ConnectionError("reset"))]))
    clock.advance(1.0)
    assert (source.requests[-1].start, source.requests[-1].end) == (2040, 2099)
    source.serve_all()
    assert reader.called and fill.complete and published(fill) == blob


class StoreLikeSource(FakeSource):
    """A source that can tell before any range that it answers ranges (the cluster's shared store)."""

    def __init__(self, blob: bytes) -> None:
        super().__init__(blob)
        self.asked: list[str] = []

    async def honours_ranges(self, digest: str) -> bool:
        self.asked.append(digest)
        return True


def test_a_source_known_to_honour_ranges_gets_every_connection_at_once(tmp_path: Path, blob: bytes) -> None:
    clock, source = Clock(), StoreLikeSource(blob)
    fill = make_fill(tmp_path, blob, source, clock, connections=3)
    fill.start()
    no_probe = [(0, 999), (1000, 1999), (2000, 2999)]  # every connection at once
    assert sorted((r.start, r.end) for r in source.pending()) == no_probe
    assert source.asked == [fill.digest]  # asked once, by the first worker
    source.serve_all()
    assert fill.complete and published(fill) == blob
