"""Upload sessions of pushes, with real files and a runner the test steps by hand: parts are written and
hashed in order, the connection is paused while writes lag, a part cut off is undone, and only a blob
whose bytes hash to the digest named is published."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollama_mirror.cache.store import Store
from ollama_mirror.private.uploads import MAX_PENDING, UploadError, Uploads


class StepRunner:
    """Runs each call when the test says so (``step``), as a worker thread would, later."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def step(self) -> None:
        f, args, d = self.calls.pop(0)
        try:
            d.callback(f(*args))
        except Exception:
            d.errback(Failure())

    def drain(self) -> None:
        while self.calls:
            self.step()


class Transport:
    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False


def started(uploads: Uploads) -> Any:
    """A new session (its files are made in the runner: stepped at once here)."""
    d = ensureDeferred(uploads.start("team/mine"))
    uploads._runner.drain()  # type: ignore[attr-defined]
    return result(d)


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Store, StepRunner, Uploads]:
    store = Store(str(tmp_path / "cache"))
    store.create()
    runner = StepRunner()
    return store, runner, Uploads(store, runner, Clock(), timeout=60)  # type: ignore[arg-type]


def test_parts_are_written_in_order_and_the_connection_waits_while_writes_lag(
    setup: tuple[Store, StepRunner, Uploads],
) -> None:
    store, runner, uploads = setup
    upload = started(uploads)
    transport = Transport()
    writer = uploads.part(upload, 0, transport.pause, transport.resume)
    writer.write(b"a" * 10)  # the first write goes to the thread at once
    writer.write(b"b" * MAX_PENDING)
    writer.write(b"c")  # more than MAX_PENDING waits: stop reading
    assert transport.paused and len(runner.calls) == 1
    runner.step()  # "a" written; "b…c" go together
    runner.step()
    assert not transport.paused
    done = writer.finished()
    assert result(done) == 10 + MAX_PENDING + 1
    data = b"a" * 10 + b"b" * MAX_PENDING + b"c"
    assert Path(upload.path).read_bytes() == data
    committed = ensureDeferred(uploads.commit(upload, hashlib.sha256(data).hexdigest()))
    runner.drain()
    assert result(committed) == len(data)
    assert Path(store.blob_path(hashlib.sha256(data).hexdigest())).read_bytes() == data
    assert not os.path.exists(upload.path) and len(uploads) == 0


def test_a_part_cut_off_is_undone_and_a_part_that_starts_elsewhere_is_refused(
    setup: tuple[Store, StepRunner, Uploads],
) -> None:
    _, runner, uploads = setup
    upload = started(uploads)
    transport = Transport()
    first = uploads.part(upload, 0, transport.pause, transport.resume)
    first.write(b"x" * 100)
    runner.drain()
    assert result(first.finished()) == 100
    cut = uploads.part(upload, 100, transport.pause, transport.resume)
    cut.write(b"y" * 50)
    cut.abandon()  # the connection died mid-part, while its write was in flight
    again = uploads.part(upload, 100, transport.pause, transport.resume)  # sent again at once
    again.write(b"z" * 60)
    runner.drain()
    assert result(again.finished()) == 160
    assert Path(upload.path).read_bytes() == b"x" * 100 + b"z" * 60
    assert upload.hasher.hexdigest() == hashlib.sha256(b"x" * 100 + b"z" * 60).hexdigest()
    with pytest.raises(UploadError) as misplaced:
        uploads.part(upload, 120, transport.pause, transport.resume)  # (not where a part began)
    assert misplaced.value.status == 416


def test_bytes_that_do_not_hash_to_the_digest_are_not_kept(setup: tuple[Store, StepRunner, Uploads]) -> None:
    store, runner, uploads = setup
    upload = started(uploads)
    writer = uploads.part(upload, 0, lambda: None, lambda: None)
    writer.write(b"payload")
    runner.drain()
    committed = ensureDeferred(uploads.commit(upload, "0" * 64))
    runner.drain()
    with pytest.raises(UploadError) as refused:
        result(committed)
    assert refused.value.code == "DIGEST_INVALID"
    assert not os.listdir(store.uploads_dir) and not os.path.exists(store.blob_path("0" * 64))


def test_the_quota_refuses_a_part_that_would_go_over(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "cache"))
    store.create()
    runner = StepRunner()
    uploads = Uploads(store, runner, Clock(), timeout=60, quota=1000, usage=lambda: 900)  # type: ignore[arg-type]
    started = ensureDeferred(uploads.start("team/mine"))
    runner.drain()
    upload = result(started)
    uploads.part(upload, 0, lambda: None, lambda: None, length=50)  # 950: fits
    upload.writer = None
    with pytest.raises(UploadError) as over:
        uploads.part(upload, 0, lambda: None, lambda: None, length=200)
    assert over.value.status == 403 and "private.max_size_gb" in over.value.message


def test_idle_sessions_expire_and_files_of_a_previous_run_go_at_start(
    setup: tuple[Store, StepRunner, Uploads],
) -> None:
    store, runner, uploads = setup
    leftover = Path(store.uploads_dir) / ("f" * 32)
    leftover.write_bytes(b"from before a crash")
    upload = started(uploads)
    assert uploads.clear_leftovers() == 1 and os.path.exists(upload.path)
    uploads._clock.advance(61)  # type: ignore[attr-defined]
    uploads.expire()
    runner.drain()
    assert len(uploads) == 0 and not os.listdir(store.uploads_dir)


def test_a_part_sent_again_after_its_answer_was_lost_is_written_over(
    setup: tuple[Store, StepRunner, Uploads],
) -> None:
    """Ollama resends a part with the same Content-Range to the same URL on any failure, also when the
    mirror had taken it (its 202 got lost): the upload goes back to that part's start."""
    store, runner, uploads = setup
    upload = started(uploads)
    for start, data in ((0, b"a" * 100), (100, b"b" * 100), (100, b"c" * 100)):  # the second part twice
        writer = uploads.part(upload, start, lambda: None, lambda: None)
        writer.write(data)
        runner.drain()
        assert result(writer.finished()) == start + 100
    expected = b"a" * 100 + b"c" * 100
    assert upload.hasher.hexdigest() == hashlib.sha256(expected).hexdigest()
    committed = ensureDeferred(uploads.commit(upload, hashlib.sha256(expected).hexdigest()))
    runner.drain()
    assert result(committed) == 200
    assert Path(store.blob_path(hashlib.sha256(expected).hexdigest())).read_bytes() == expected
    assert uploads.committed(upload.id, "team/mine", hashlib.sha256(expected).hexdigest())  # a retried commit
    with pytest.raises(UploadError):
        uploads.part(upload, 50, lambda: None, lambda: None)  # (not where a part began)


def test_parts_reaching_different_worker_processes_make_one_blob(tmp_path: Path) -> None:
    """With server.workers, each request may reach another process: the session is its file and note."""
    store = Store(str(tmp_path / "cache"))
    store.create()
    runner = StepRunner()
    first, second = (Uploads(store, runner, Clock(), timeout=60) for _ in range(2))  # type: ignore[arg-type]
    upload = started(first)
    pieces = [b"a" * 100, b"b" * 100, b"c" * 100]
    for index, piece in enumerate(pieces):
        uploads = (first, second, first)[index]
        session = uploads.find(upload.id, "team/mine")
        writer = uploads.part(session, index * 100, lambda: None, lambda: None)
        writer.write(piece)
        runner.drain()
        assert result(writer.finished()) == (index + 1) * 100
    with pytest.raises(UploadError):
        second.find(upload.id, "team/other")  # (the note says whose session it is)
    data = b"".join(pieces)
    session = second.find(upload.id, "team/mine")
    committed = ensureDeferred(second.commit(session, hashlib.sha256(data).hexdigest()))
    runner.drain()
    assert result(committed) == 300
    assert Path(store.blob_path(hashlib.sha256(data).hexdigest())).read_bytes() == data
    assert not os.listdir(store.uploads_dir) and second.gone(upload.id)
