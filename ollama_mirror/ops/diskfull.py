"""The cache's disk ran full: one log line for the operator, and a health check that says so until
space is back.

Every place that writes into the cache reports a full disk as a ``disk_full`` event (a blob's data, the
record of its progress, a manifest, a refused download).  The first one logs an error with where and how
much is free, and later ones stay quiet until the episode ends: a download completes, or the free space
rises above both ``cache.min_free_gb`` and what it was when the write failed.  Meanwhile the health
check ``disk_space`` is ``degraded`` (what is cached is still served) and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..events import Events, FillView
from ..units import human_size

log = Logger(namespace="ollama_mirror.cache")  # pinned: log names are public


@dataclass(frozen=True)
class DiskFullEpisode:
    message: str
    path: str
    free: int | None  # bytes free just after the failed write, when known
    since: float


class DiskFullWatch(Events):
    def __init__(self, clock: IReactorTime, min_free_bytes: int) -> None:
        self._clock = clock
        self._min_free = min_free_bytes
        self.episode: DiskFullEpisode | None = None

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        if self.episode is not None:
            return
        self.episode = DiskFullEpisode(message, path, free, self._clock.seconds())
        log.error(
            "cache disk full: {message} (at {path}, {free} free); downloads stop there, keeping what they "
            "fetched, and resume when asked again once space is freed",
            message=message,
            path=path,
            free="unknown" if free is None else human_size(free),
        )

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        if error is None and self.episode is not None:
            self._over(f"blob {fill.digest} was stored")

    def free_space_seen(self, free: int) -> None:
        """The free space, as the health check measured it: enough again ends the episode."""
        episode = self.episode
        if episode is not None and free >= self._min_free and free > (episode.free or 0):
            self._over(f"{human_size(free)} free")

    def _over(self, why: str) -> None:
        self.episode = None
        log.info("cache disk: space is back ({why})", why=why)

    def health(self) -> dict[str, Any] | None:
        """The ``disk_space`` check while the disk is full (``None`` otherwise)."""
        episode = self.episode
        if episode is None:
            return None
        return {
            "status": "degraded",
            "since": episode.since,
            "path": episode.path,
            "free_bytes": episode.free,
            "detail": f"{episode.message}; free space, then pull again",
        }
