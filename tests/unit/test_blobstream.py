"""The per-client producer: backpressure, following a download, aborting, and hang-ups."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from ollama_mirror.fill.errors import FillFailed
from ollama_mirror.web.blobstream import READ_SIZE, BlobProducer


class FakeRequest:
    """Just what a producer touches of a twisted.web Request; pauses after *pause_after* writes."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.aborted = False
        self.pause_after = pause_after
        self.gone: Deferred[None] = Deferred()
        self.channel = self
        self.transport = self

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.pause_after is not None and len(self.written) % self.pause_after == 0:
            self.producer.pauseProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        return self.gone

    def abortConnection(self) -> None:
        self.aborted = True

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


class GrowingFill:
    """A download in progress: *ready* bytes are on disk."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.ready = 0
        self.complete = False
        self.failure: Failure | None = None
        self.waiters: list[Deferred[None]] = []
        self.finished: list[Deferred[None]] = []

    def path(self) -> str:
        return str(self._path)

    def available(self, offset: int) -> int:
        return max(0, self.ready - offset)

    def wait(self, offset: int) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self.waiters.remove(d))
        self.waiters.append(d)
        return d

    def when_done(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self.finished.remove(d))
        self.finished.append(d)
        return d

    def grow(self, ready: int) -> None:
        self.ready = ready
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)

    def verified(self) -> None:
        self.complete = True
        finished, self.finished = self.finished, []
        for d in finished:
            d.callback(None)


def blob_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_range_of_a_complete_blob_is_written_and_finished(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 3 * READ_SIZE + 17)
    request = FakeRequest()
    before = open_fds()
    BlobProducer(request, os.open(path, os.O_RDONLY), 5, len(data) - 3, None).start()  # type: ignore[arg-type]
    assert request.body == data[5 : len(data) - 2]
    assert request.finished and request.producer is None
    assert open_fds() == before


def test_nothing_more_is_read_while_the_client_is_paused(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 4 * READ_SIZE)
    request = FakeRequest(pause_after=1)
    producer = BlobProducer(request, os.open(path, os.O_RDONLY), 0, len(data) - 1, None)  # type: ignore[arg-type]
    producer.start()
    assert len(request.written) == 1 and not request.finished
    producer.resumeProducing()
    assert len(request.written) == 2
    for _ in range(2):
        producer.resumeProducing()
    assert request.body == data and request.finished


def test_bytes_of_a_download_are_sent_as_they_arrive(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 1000)
    fill = GrowingFill(path)
    request = FakeRequest()
    BlobProducer(request, os.open(path, os.O_RDONLY), 0, 999, fill).start()  # type: ignore[arg-type]
    assert request.body == b"" and len(fill.waiters) == 1
    fill.grow(300)
    assert request.body == data[:300]
    fill.grow(1000)
    assert request.body == data and request.finished


def test_a_failed_download_aborts_the_connection_instead_of_ending_cleanly(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 1000)
    fill = GrowingFill(path)
    request = FakeRequest()
    BlobProducer(request, os.open(path, os.O_RDONLY), 0, 999, fill).start()  # type: ignore[arg-type]
    fill.grow(400)
    fill.waiters.pop().errback(FillFailed("digest mismatch"))
    assert request.aborted and not request.finished
    assert request.body == data[:400]


def test_a_client_hanging_up_stops_reading_and_drops_its_wait(tmp_path: Path) -> None:
    path, _ = blob_file(tmp_path, 1000)
    fill = GrowingFill(path)
    request = FakeRequest()
    before = open_fds()
    producer = BlobProducer(request, os.open(path, os.O_RDONLY), 0, 999, fill)  # type: ignore[arg-type]
    producer.start()
    assert len(fill.waiters) == 1
    request.gone.errback(Failure(CancelledError()))
    assert fill.waiters == []  # only its own waiter went; the download itself is untouched
    assert open_fds() == before
    fill.grow(1000)
    assert request.body == b"" and not request.finished


def test_a_whole_body_from_a_download_ends_only_once_the_digest_is_verified(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 1000)
    fill = GrowingFill(path)
    request = FakeRequest()
    BlobProducer(request, os.open(path, os.O_RDONLY), 0, 999, fill, hold_last=True).start()  # type: ignore[arg-type]
    fill.grow(1000)
    assert request.body == data[:999] and not request.finished  # everything but the last byte
    fill.verified()
    assert request.body == data and request.finished


def test_a_whole_body_of_a_corrupt_download_never_ends_cleanly(tmp_path: Path) -> None:
    path, _ = blob_file(tmp_path, 1000)
    fill = GrowingFill(path)
    request = FakeRequest()
    BlobProducer(request, os.open(path, os.O_RDONLY), 0, 999, fill, hold_last=True).start()  # type: ignore[arg-type]
    fill.grow(1000)
    fill.finished.pop().errback(FillFailed("digest mismatch"))
    assert request.aborted and not request.finished
    assert len(request.body) == 999


def test_a_reader_of_a_failed_download_stops_instead_of_streaming_what_is_on_disk(tmp_path: Path) -> None:
    path, data = blob_file(tmp_path, 4 * READ_SIZE)
    fill = GrowingFill(path)
    fill.grow(len(data) - 1)
    request = FakeRequest(pause_after=1)
    producer = BlobProducer(request, os.open(path, os.O_RDONLY), 0, len(data) - 1, fill)  # type: ignore[arg-type]
    producer.start()
    assert request.body == data[:READ_SIZE]
    fill.failure = Failure(FillFailed("upstream failed"))

    def failing_wait(offset: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.errback(FillFailed("upstream failed"))
        return d

    fill.wait = failing_wait  # type: ignore[method-assign]
    producer.resumeProducing()
    assert request.aborted and not request.finished
    assert request.body == data[:READ_SIZE]  # nothing more was read from the failed download
