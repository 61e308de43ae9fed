"""The sha256 of a blob, advanced over its finished prefix as chunks finish, in a thread.

Hashing overlaps the download: each time the next chunk in order is finished, its bytes are read back
from the partial file and fed to the hash in a worker thread (hashlib releases the GIL), so the reactor
never hashes and the digest is ready moments after the last byte arrives.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .chunks import ChunkMap
from .errors import FillFailed
from .partial import PartialFile

# Bytes per read of the hash thread: a larger object, freed in a pool thread, stays in that thread's malloc
# arena (4 MiB reads kept ~20 MB more resident during a fill; sha256 is no faster with them).
HASH_READ_SIZE = 2**20


class PrefixHasher:
    """Hashes *chunks* in order as they finish; calls *complete* with the hex digest of them all."""

    def __init__(
        self,
        chunks: ChunkMap,
        partial: PartialFile,
        running: Callable[[], bool],
        complete: Callable[[str], Awaitable[None]],
        fail: Callable[[Failure], None],
    ) -> None:
        self._chunks = chunks
        self._partial = partial
        self._running = running
        self._complete = complete
        self._fail = fail
        self._hasher = hashlib.sha256()
        self._hashed = 0  # chunks hashed, from the first
        self._hashing = False

    def advance(self) -> None:
        """Hash what is finished and not hashed yet (one job at a time; it keeps going while it can)."""
        if self._hashing:
            return
        self._hashing = True
        Deferred.fromCoroutine(self._hash_prefix()).addErrback(self._fail)

    async def _hash_prefix(self) -> None:
        chunks = self._chunks
        try:
            while self._hashed < chunks.count and chunks.done[self._hashed] and self._running():
                start, end = chunks.bounds(self._hashed)
                await self._partial.run(_hash_range, self._hasher, self._partial.fd, start, end)
                self._hashed += 1
        finally:
            self._hashing = False
        if self._hashed == chunks.count and self._running():
            await self._complete(self._hasher.hexdigest())


def _hash_range(hasher: Any, fd: int, start: int, end: int) -> None:
    """Feed bytes [start, end) of the file to the hasher (runs in a thread; hashlib drops the GIL)."""
    position = start
    while position < end:
        data = os.pread(fd, min(HASH_READ_SIZE, end - position), position)
        if not data:
            raise FillFailed("partial file is shorter than expected")
        hasher.update(data)
        position += len(data)
