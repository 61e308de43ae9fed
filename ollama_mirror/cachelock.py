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
