"""The partial file of one blob: its descriptor, its download lock, and the record of finished chunks.

The file lives in ``.mirror/partial/`` (Ollama deletes odd names in ``blobs/``), is created at full
size, and is published into ``blobs/`` by an atomic rename once verified.  The download's lock is an
exclusive ``flock`` on the file itself, so that worker processes sharing the cache run one download per
blob: the holder downloads; the others follow its record and take over if it goes away (its lock goes
with it).  Methods marked "(thread)" block and run in the runner's threads; :meth:`PartialFile.run`
keeps the descriptor open until such a job returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from ..cache.space import is_no_space
from ..cache.store import PartialState, Store, same_file
from ..runner import Runner
from .chunks import ChunkMap
from .errors import FillFailed, disk_full

OPEN_ATTEMPTS = 10  # tries to lock the partial file while other processes keep replacing it


@dataclass(frozen=True)
class Opened:
    """The partial file as :meth:`PartialFile.open` found it."""

    fd: int  # -1 when the blob was published meanwhile
    held: bool  # this process holds the download's lock: it downloads; else it follows
    created: bool = False
    state: PartialState | None = None
    allocated: int = 0  # bytes of disk the file already takes


class PartialFile:
    def __init__(self, store: Store, hexdigest: str, chunks: ChunkMap, runner: Runner) -> None:
        self.store = store
        self.hexdigest = hexdigest
        self.digest = "sha256:" + hexdigest
        self.chunks = chunks
        self.runner = runner
        self.fd = -1  # set once the file is ready: "available" always means "readable through fd"
        self._users = 0  # jobs in threads using fd; it is closed only when none is left
        self._close_wanted = False

    @property
    def path(self) -> str:
        return self.store.partial_path(self.hexdigest)

    # --- the descriptor's life -----------------------------------------------------------------

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run a job that uses the descriptor in a thread, keeping it open until the job returns."""
        self._users += 1

        def release(result: object) -> object:
            self._users -= 1
            if self._close_wanted and self._users == 0:
                self.close()
            return result

        return self.runner.run(f, *args).addBoth(release)

    def close(self) -> None:
        """Close the descriptor now, or as soon as no job in a thread uses it."""
        if self._users:
            self._close_wanted = True
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reader(self) -> int | None:
        """A descriptor for one reader while the file is open (``None`` once it is closed): a new open
        of the same file, not a ``dup``, which would share the open file description and with it the
        download's ``flock`` (a slow reader would keep the lock after the Fill ended).  It stays valid
        when the file is renamed into ``blobs/``, so a reader never races the publish."""
        if self.fd < 0 or self._close_wanted:
            return None
        return reopen(self.fd, self.path, self.store.blob_path(self.hexdigest))

    # --- opening (thread) ----------------------------------------------------------------------

    def open(self) -> Opened:
        """(thread) Open the partial file and try to take the download's lock.

        Having the lock counts only while the path still names the locked file: a holder that failed
        may have removed it between our open and our lock (then we try again).
        """
        path = self.path
        for _ in range(OPEN_ATTEMPTS):
            try:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return Opened(fd, False, created, self.read_state(fd))
                if not self.store.partial_is(self.hexdigest, fd):  # removed or replaced meanwhile
                    os.close(fd)
                    continue
                if self.store.blob_size(self.hexdigest) is not None:  # the holder published and left
                    if created:
                        _unlink_quietly(path)
                    os.close(fd)
                    return Opened(-1, True)
                state = self.read_state(fd, unbound_ok=not created)
                if state is None:  # starting afresh: no record may speak for this file's bytes
                    self.store.forget_partial_state(self.hexdigest)
                allocated = min(self.chunks.size, os.fstat(fd).st_blocks * 512)
                return Opened(fd, True, created, state, allocated)
            except BaseException:
                os.close(fd)
                raise
        raise FillFailed(f"the partial file of {self.digest} keeps being replaced")

    def read_state(self, fd: int, unbound_ok: bool = False) -> PartialState | None:
        return self.store.read_partial_state(
            self.hexdigest, self.chunks.size, self.chunks.chunk_size, fd, unbound_ok=unbound_ok
        )

    def reserve(self, fd: int) -> None:
        """(thread) A fresh partial file gets its whole size reserved, so that a full disk shows now.

        It truncates first: only ever before any byte of this download is written (at the start, and
        at a takeover, which happens while nothing is scheduled).
        """
        os.ftruncate(fd, 0)
        try:
            if self.chunks.size:
                os.posix_fallocate(fd, 0, self.chunks.size)
        except OSError as e:
            if is_no_space(e):
                raise disk_full(self.digest, self.path) from None
            os.ftruncate(fd, self.chunks.size)  # a filesystem that cannot reserve space: sparse file

    # --- writing -------------------------------------------------------------------------------

    def write_unfinished(self, data: bytes, offset: int) -> None:
        """Write *data* at *offset*, skipping chunks already finished: their bytes may have been hashed
        (a retry that streams the whole body again must not change them)."""
        position, end = offset, offset + len(data)
        chunk_size = self.chunks.chunk_size
        while position < end:
            index = position // chunk_size
            piece_end = min(end, (index + 1) * chunk_size)
            if not self.chunks.done[index]:
                os.pwrite(self.fd, data[position - offset : piece_end - offset], position)
            position = piece_end

    def state(self) -> PartialState:
        """The record of what is on disk now: finished chunks, and how far the others got (made on the
        reactor thread, whose writes are already in the file; written in a thread, after the data)."""
        chunks = self.chunks
        return PartialState(chunks.size, chunks.chunk_size, chunks.finished(), chunks.marks())

    def write_state(self, state: PartialState) -> None:
        """(thread) Record *state*, bound to this file."""
        self.store.write_partial_state(self.hexdigest, self.fd, state)

    def discard(self) -> None:
        """Remove the partial file and its record (a mismatch, a full disk)."""
        self.store.discard_partial(self.hexdigest, self.fd if self.fd >= 0 else None)

    def publish(self) -> None:
        """(thread) The verified file becomes ``blobs/sha256-<hex>``."""
        self.store.publish_blob(self.hexdigest, self.fd)

    # --- another process's download (thread) ---------------------------------------------------

    def look_at_holder(self) -> tuple[str, PartialState | None]:
        """(thread) What the holder did since the last look: published, failed, went away, or progressed.

        Only what concerns our own file counts: its record (bound to its inode), and a published
        blob that is this very file (a rename keeps the inode).  Anything else means the download
        we followed is gone, and what we served from it cannot be vouched for: "lost".
        """
        seen = self.published()
        if seen is not None:
            return seen, None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.store.partial_is(self.hexdigest, self.fd):
                return "following", self.read_state(self.fd)
            return self.published() or "lost", None  # (published between the two looks, or gone)
        seen = self.published()
        if seen is not None:
            return seen, None
        if not self.store.partial_is(self.hexdigest, self.fd):
            return "lost", None  # the holder failed and discarded its data
        state = self.read_state(self.fd)
        if state is None:  # nothing recorded: start from scratch
            if any(self.chunks.done):
                return "lost", None  # its record went away: what was served here cannot be vouched for
            self.store.forget_partial_state(self.hexdigest)
            self.reserve(self.fd)
        return "taken over", state

    def published(self) -> str | None:
        """(thread) "published" if ``blobs/`` has our file, "lost" if it has another, else None."""
        if self.store.blob_size(self.hexdigest) is None:
            return None
        return "published" if same_file(self.store.blob_path(self.hexdigest), self.fd) else "lost"


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
