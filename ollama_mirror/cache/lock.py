"""Who may change a cache directory at the same time: daemons share it, maintenance commands own it.

Daemons (and ``ollama-mirror import``, which only adds complete files by atomic renames) hold a
shared ``flock`` on ``.mirror/lock``; commands that download into the cache or delete from it
outside a daemon (``prefetch --cache-dir``, ``gc``, ``rm``) need it exclusively, because two
processes must never run a Fill of the same blob or sweep what the other is serving.  The kernel
drops the lock when its process dies, so a crash never leaves a cache locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re


class CacheBusy(Exception):
    """Another process holds the cache in a way that excludes what was asked."""


class CacheLock:
    def __init__(self, work_dir: str) -> None:
        self.path = os.path.join(work_dir, "lock")
        self._fd = -1

    def acquire(self, exclusive: bool) -> None:
        """Take the lock now or raise :class:`CacheBusy` (never waits)."""
        if self._fd >= 0:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheBusy(
                "a running ollama-mirror daemon or import is using this cache"
                if exclusive
                else "an ollama-mirror maintenance command (prefetch --cache-dir, gc, rm) is using this cache"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


_STAGING = re.compile(r"import-([0-9a-f]{8,32})(?:-[0-9a-f]{64}\.part|\.lock)")


class StagingLock:
    """An import's claim on its staging files ``import-<token>-*`` in ``.mirror/partial/``.

    The sweeper removes temporary files there that nobody touched for an hour; an import reading a
    slow or stalled source may leave a staged blob untouched that long, so it holds an ``flock`` on
    ``import-<token>.lock`` while it runs and the sweeper leaves the files of a held token alone
    (:func:`staging_in_use`).  A killed import's lock is free: its files are swept as usual.
    """

    def __init__(self, partial_dir: str, token: str) -> None:
        self.path = os.path.join(partial_dir, f"import-{token}.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # a fresh name: nobody else can hold it

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


def staging_in_use(partial_dir: str, name: str) -> bool:
    """Whether the file *name* of the partial directory belongs to an import that is still running."""
    match = _STAGING.fullmatch(name)
    if match is None:
        return False
    try:
        fd = os.open(os.path.join(partial_dir, f"import-{match.group(1)}.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
