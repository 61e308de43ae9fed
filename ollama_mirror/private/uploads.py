"""Blobs being pushed: one upload session per blob, written to a file of its own as the bytes arrive.

A push starts a session (``POST .../blobs/uploads/``), sends the blob in parts (``PATCH`` with a
``Content-Range``, one after another) and commits it (``PUT ...?digest=``).  Each part is streamed into
the session's file as it arrives, never spooled (:class:`PartWriter` is the request's body), through a
sha256 in the same pass: a worker thread writes and hashes, in order; the connection stops reading
while more than :data:`MAX_PENDING` bytes wait.  A commit publishes the file into ``blobs/`` only if its
sha256 is the digest named (``DIGEST_INVALID`` otherwise, and nothing is kept); a session idle for
``private.upload_timeout`` is removed, and so is every session file left at start (a daemon killed
mid-upload publishes nothing).

With ``server.workers``, a session's requests may reach any worker process: the session is its file
(``uploads/<id>``) and a note of its repository (``uploads/<id>.repo``), so any worker takes it up.  The
worker that received every byte so far hashes as they come; one that finds bytes it did not write (another
worker's) hashes the file at the commit instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cache.store import Store
from ..names import PrivateNamespaces
from ..registryerror import RegistryError
from ..runner import Runner

log = Logger(namespace="ollama_mirror.private")

MAX_PENDING = 8 * 2**20  # bytes of a part waiting for the disk before the connection stops reading
NOTE = ".repo"  # beside a session's file: the repository it pushes to (any worker process takes it up)


class UploadError(RegistryError):
    """A push request that cannot be done: the registry status and error code, and why."""


@dataclass
class Upload:
    """One blob being pushed: its file, how much of it is written (and hashed), who writes now."""

    id: str
    repository: str
    path: str
    fd: int
    touched: float
    size: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)  # None: another worker wrote too (hashed at commit)
    written_end: int = 0  # the file's end as this process left it (another size: another worker wrote)
    writer: PartWriter | None = None  # the part being received, if any
    failure: str | None = None  # why the session cannot go on (a write failed)
    starts: dict[int, Any] = field(default_factory=dict)  # where each part began -> the hash there

    def rewind(self, offset: int) -> None:
        """Go back to the start of a part taken before (the client sends it again: its answer was lost);
        what follows it is written over, and cut at the commit."""
        self.size = offset
        known = self.starts.get(offset)
        self.hasher = known.copy() if known is not None else None

    def catch_up(self) -> None:
        """Take in what other worker processes wrote to the session's file since this one did."""
        end = os.fstat(self.fd).st_size
        if end != self.written_end:
            self.size = self.written_end = end
            self.hasher = None
            self.starts = {}


class Uploads:
    def __init__(
        self,
        store: Store,
        runner: Runner,
        clock: IReactorTime,
        timeout: float,
        quota: int = 0,
        usage: Callable[[], int] = lambda: 0,
    ) -> None:
        """*quota*: bytes the pushed models may take (``private.max_size_gb``; 0: no cap); *usage*
        (blocking: runs in a thread) says how many they take now."""
        self._store = store
        self._runner = runner
        self._clock = clock
        self._timeout = timeout
        self._quota = quota
        self._usage = usage
        self.used = 0  # bytes of the pushed models, as of the latest session started
        self._sessions: dict[str, Upload] = {}
        self._committed: dict[str, tuple[str, str, float]] = {}  # id -> (repository, hex digest, when)

    def clear_leftovers(self, idle: float = 0.0) -> int:
        """(thread) Remove the files of sessions no process of this daemon uses: at start, those a previous
        run left (they can never be committed); with several workers, only those idle for *idle* seconds
        (another worker may be receiving the rest).  How many sessions went."""
        removed = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError), os.scandir(self._store.uploads_dir) as entries:
            for entry in entries:
                upload_id = entry.name.removesuffix(NOTE)
                if not entry.is_file(follow_symlinks=False) or upload_id in self._sessions:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime >= idle:
                        os.unlink(entry.path)
                        removed += entry.name == upload_id
        return removed

    async def start(self, repository: str) -> Upload:
        """A new session (its id is random: knowing it is what lets the parts in), if the pushed models
        are under ``private.max_size_gb``; its files are made in a worker thread."""
        if self._quota:
            self.used = await self._runner.run(self._usage)
            self._check_room(0)
        upload_id = uuid.uuid4().hex
        path = self._store.upload_path(upload_id)
        fd = await self._runner.run(_create, path, repository)
        upload = Upload(upload_id, repository, path, fd, self._clock.seconds())
        self._sessions[upload_id] = upload
        return upload

    def _check_room(self, incoming: int) -> None:
        if not self._quota:
            return
        total = self.used + sum(upload.size for upload in self._sessions.values()) + incoming
        if total > self._quota:
            raise UploadError(
                403,
                "DENIED",
                f"the pushed models would take {total / 1e9:.2f} GB, over private.max_size_gb "
                f"({self._quota / 1e9:g} GB): remove some first (ollama-mirror rm)",
            )

    def committed(self, upload_id: str, repository: str, hexdigest: str) -> bool:
        """Whether this session was committed with this digest already (Ollama retries a commit whose
        answer it did not get: it is answered again, not refused)."""
        found = self._committed.get(upload_id)
        return found is not None and found[:2] == (repository, hexdigest)

    def gone(self, upload_id: str) -> bool:
        """Whether no process of this daemon holds the session (committed, cancelled or expired)."""
        try:
            return upload_id not in self._sessions and not os.path.exists(self._store.upload_path(upload_id))
        except ValueError:
            return True

    def find(self, upload_id: str, repository: str) -> Upload:
        upload = self._sessions.get(upload_id) or self._take_up(upload_id)
        if upload is None or upload.repository != repository:
            raise UploadError(404, "BLOB_UPLOAD_UNKNOWN", f"upload {upload_id} is unknown (or expired)")
        upload.touched = self._clock.seconds()
        if upload.writer is None:
            upload.catch_up()
        return upload

    def _take_up(self, upload_id: str) -> Upload | None:
        """A session another worker process started (its file and its note are in ``uploads/``)."""
        try:
            path = self._store.upload_path(upload_id)
            with open(path + NOTE, encoding="utf-8") as note:
                repository = note.read(1000)
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except (OSError, ValueError):
            return None
        upload = Upload(upload_id, repository, path, fd, self._clock.seconds(), hasher=None, written_end=-1)
        upload.catch_up()
        self._sessions[upload_id] = upload
        return upload

    def part(
        self,
        upload: Upload,
        start: int | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
        length: int = 0,
    ) -> PartWriter:
        """The writer of the next part (*length* bytes), which must start where the file ends."""
        if upload.failure is not None:
            raise UploadError(500, "BLOB_UPLOAD_INVALID", upload.failure)
        previous = upload.writer
        if previous is not None and not previous.abandoned:
            raise UploadError(409, "BLOB_UPLOAD_INVALID", "a part of this upload is still arriving")
        if previous is None and start is not None and start != upload.size:
            if start not in upload.starts:
                raise _misplaced(start, upload.size)
            upload.rewind(start)
        self._check_room(length)
        # (a part sent again right after its connection died waits until the cut-off one is undone)
        after = previous.released() if previous is not None else None
        upload.writer = PartWriter(upload, self._runner, pause, resume, start, after)
        return upload.writer

    async def commit(self, upload: Upload, hexdigest: str) -> int:
        """Publish the blob if its bytes hash to *hexdigest* (its size); else nothing is kept."""
        if upload.writer is not None:
            await upload.writer.finished()
        self._forget(upload)
        if upload.hasher is None and upload.failure is None:  # (other workers wrote parts of it)
            upload.hasher = await self._runner.run(_hash_file, upload.path, upload.size)
        if upload.failure is not None or upload.hasher.hexdigest() != hexdigest:
            await self._runner.run(_discard, upload)
            raise UploadError(
                400,
                "DIGEST_INVALID",
                upload.failure or f"the {upload.size} bytes pushed do not hash to sha256:{hexdigest}",
            )
        try:
            await self._runner.run(os.ftruncate, upload.fd, upload.size)  # (a part sent again was shorter)
            await self._runner.run(self._store.publish_upload, hexdigest, upload.id, upload.fd)
        finally:
            await self._runner.run(_discard, upload)
        now = self._clock.seconds()
        self._committed = {k: v for k, v in self._committed.items() if now - v[2] < self._timeout}
        self._committed[upload.id] = (upload.repository, hexdigest, now)
        log.info("pushed blob sha256:{hexdigest} ({size} bytes)", hexdigest=hexdigest, size=upload.size)
        return upload.size

    async def cancel(self, upload: Upload) -> None:
        self._forget(upload)
        if upload.writer is not None:
            upload.writer.abandon()
        await self._runner.run(_discard, upload)

    def _forget(self, upload: Upload) -> None:
        self._sessions.pop(upload.id, None)

    def expire(self, files: bool = False) -> None:
        """Remove the sessions idle for longer than ``private.upload_timeout`` (none receiving now); with
        *files* (one process of the daemon), also the files of sessions no process touched for as long."""
        if files:
            self._runner.run(self.clear_leftovers, self._timeout).addErrback(_not_cleared)
        now = self._clock.seconds()
        for upload in list(self._sessions.values()):
            if upload.writer is None and now - upload.touched > self._timeout:
                log.info("removed upload {id} to {repo}: idle too long", id=upload.id, repo=upload.repository)
                Deferred.fromCoroutine(self.cancel(upload))

    def service(self, clear_leftovers: bool = True, leftovers_idle: float = 0.0) -> TimerService:
        """The expiry timer; with *clear_leftovers* (one process of a daemon), the files a previous run
        left (idle for *leftovers_idle* seconds: with several workers, others may be in use) are removed
        at start, and idle sessions' files on every round."""
        return _Expiry(self, clear_leftovers, leftovers_idle)

    def __len__(self) -> int:
        return len(self._sessions)


class BodySink:
    """What a request's ``content`` must also answer (Twisted seeks and tells it once the body is in):
    a body that went elsewhere as it arrived has nothing to read back."""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class PartWriter(BodySink):
    """The body of one ``PATCH``: written to the upload's file and hashed, in order, in a worker thread.

    It is what the request's ``content`` is (``write`` as the bytes arrive); *pause* and *resume* stop
    and restart reading from the connection while more than :data:`MAX_PENDING` bytes wait.
    """

    def __init__(
        self,
        upload: Upload,
        runner: Runner,
        pause: Callable[[], None],
        resume: Callable[[], None],
        expected_start: int | None = None,
        after: Deferred[None] | None = None,
    ) -> None:
        """*after*: the part cut off before this one, being undone (this one writes once it is)."""
        self._upload = upload
        self._runner = runner
        self._pause = pause
        self._resume = resume
        self._expected_start = expected_start
        self._start = upload.size  # where this part began, and the hash there: a part cut off is undone
        self._hash_at_start = _copy(upload.hasher)
        if after is None and self._hash_at_start is not None:
            upload.starts.setdefault(self._start, self._hash_at_start)
        self.abandoned = False
        self.refusal: UploadError | None = None  # why the part was not taken (it started elsewhere)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing = False
        self._waiting = after is not None
        self._paused = False
        self._ended = False
        self._waiters: list[Deferred[int]] = []
        self._released: list[Deferred[None]] = []
        self.received = 0
        if after is not None:
            after.addCallback(self._go)

    def _go(self, _: object) -> None:
        """The part before, cut off, is undone: this one starts where the upload ends now."""
        self._waiting = False
        upload = self._upload
        if self.abandoned:  # (cut off too, before it began)
            self._release()
            return
        start = self._expected_start
        if start is not None and start != upload.size:
            if start in upload.starts:
                upload.rewind(start)
            else:
                self.refusal = _misplaced(start, upload.size)
                self.abandoned = True
                self._pending, self._pending_bytes = [], 0
        self._start, self._hash_at_start = upload.size, _copy(upload.hasher)
        if self._hash_at_start is not None:
            upload.starts.setdefault(self._start, self._hash_at_start)
        self._next()

    # --- the file-like side the request writes to ---

    def write(self, data: bytes) -> None:
        if self._upload.failure is not None or self.abandoned or not data:
            return  # (the part is refused when it ends)
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.received += len(data)
        if self._pending_bytes > MAX_PENDING and not self._paused:
            self._paused = True
            self._pause()
        self._next()

    # --- the route's side ---

    def finished(self) -> Deferred[int]:
        """Fires with the upload's size once every byte received is written (the body has ended)."""
        self._ended = True
        waiter = Deferred[int]()
        self._waiters.append(waiter)
        self._next()
        return waiter

    def abandon(self) -> None:
        """The part was cut off (the client went away mid-part): undo what it wrote, so that the client
        can send it again from its start."""
        if self.abandoned or (self._ended and not self._writing and not self._pending):
            return
        self.abandoned = True
        self._pending, self._pending_bytes = [], 0
        if self._waiting:
            return  # (nothing written yet: it ends when the part before it is undone)
        if not self._writing:
            self._roll_back()

    # --- writing ---

    def released(self) -> Deferred[None]:
        """Fires when this part is over (written, or undone)."""
        waiter = Deferred[None]()
        self._released.append(waiter)
        return waiter

    def _next(self) -> None:
        if self._writing or self._waiting:
            return
        if not self._pending:
            if self._ended:
                self._release()
            return
        data = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._writing = True
        upload = self._upload  # (one write at a time: the upload's size is where this one goes)
        self._runner.run(_write, upload.fd, upload.hasher, data, upload.size).addCallbacks(
            self._written, self._failed
        )

    def _written(self, count: int) -> None:
        self._writing = False
        self._upload.size += count
        self._upload.written_end = max(self._upload.written_end, self._upload.size)
        if self.abandoned:
            self._roll_back()
            return
        if self._paused and self._pending_bytes <= MAX_PENDING // 2:
            self._paused = False
            self._resume()
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._writing = False
        if self.abandoned:
            self._roll_back()
            return
        self._upload.failure = f"writing the upload failed: {failure.getErrorMessage()}"
        log.warn("upload {id}: {why}", id=self._upload.id, why=self._upload.failure)
        self._pending, self._pending_bytes = [], 0
        if self._paused:
            self._paused = False
            self._resume()
        self._next()

    def _roll_back(self) -> None:
        upload = self._upload
        upload.size, upload.hasher = self._start, _copy(self._hash_at_start)
        upload.written_end = self._start
        truncated = self._runner.run(os.ftruncate, upload.fd, self._start)
        truncated.addErrback(lambda failure: setattr(upload, "failure", failure.getErrorMessage()))
        truncated.addBoth(lambda _: self._release())

    def _release(self) -> None:
        """The part is over: the upload takes its next part; whoever waits learns its size."""
        if self._upload.writer is self:
            self._upload.writer = None
        if self._paused:
            self._paused = False
            self._resume()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._upload.size)
        released, self._released = self._released, []
        for done in released:
            done.callback(None)


def _misplaced(start: int, size: int) -> UploadError:
    return UploadError(416, "BLOB_UPLOAD_INVALID", f"the part starts at {start}; the upload has {size} bytes")


def _write(fd: int, hasher: Any, data: bytes, offset: int) -> int:
    """(thread) Write *data* at *offset* of the file, and add it to the hash."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    if hasher is not None:
        hasher.update(data)
    return len(data)


def _create(path: str, repository: str) -> int:
    """(thread) A session's file, open for writing, and the note of its repository beside it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    with open(path + NOTE, "w", encoding="utf-8") as note:
        note.write(repository)
    return fd


def _discard(upload: Upload) -> None:
    """(thread) Close the session's file and remove it and its note if they are still there."""
    with contextlib.suppress(OSError):
        os.close(upload.fd)
    for path in (upload.path, upload.path + NOTE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _copy(hasher: Any) -> Any:
    return hasher.copy() if hasher is not None else None


def _hash_file(path: str, size: int) -> Any:
    """(thread) The sha256 of the first *size* bytes of *path* (a session other workers wrote to)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            data = f.read(min(2**20, left))
            if not data:
                break
            hasher.update(data)
            left -= len(data)
    return hasher


class _Expiry(TimerService):
    def __init__(self, uploads: Uploads, clear_leftovers: bool, leftovers_idle: float) -> None:
        super().__init__(min(60.0, uploads._timeout), uploads.expire, clear_leftovers)
        self.clock = uploads._clock
        self._uploads = uploads
        self._clear = clear_leftovers
        self._idle = leftovers_idle

    def startService(self) -> None:
        super().startService()
        if self._clear:
            cleared = self._uploads._runner.run(self._uploads.clear_leftovers, self._idle)
            cleared.addCallbacks(_cleared, _not_cleared)


def _cleared(count: int) -> None:
    if count:
        log.info("removed {n} unfinished uploads of a previous run", n=count)


def _not_cleared(failure: Failure) -> None:
    log.warn("could not remove the unfinished uploads of a previous run: {e}", e=failure.getErrorMessage())


def private_usage(models: Callable[[], list[Any]], private: PrivateNamespaces) -> int:
    """(thread) Bytes of the distinct blobs the pushed models use (what ``private.max_size_gb`` caps)."""
    sizes: dict[str, int] = {}
    for model in models():
        if private.holds(model.name):
            sizes.update(model.blobs)
    return sum(sizes.values())
