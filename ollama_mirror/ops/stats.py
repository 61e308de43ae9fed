"""``/mirror/stats``: what the mirror holds, what it saves, and what it is downloading.

Three parts: :class:`CacheSurvey` walks the cache in a worker thread (on demand and on a timer, so
that the metrics' cache gauges stay fresh without a scrape touching the disk); :class:`TrafficTally`
counts what was served from where, from request records and events; :class:`StatsReport` puts
them together with the running fills into the seed's JSON document, extended.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client.registry import Collector
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import __version__
from ..cache.catalog import Catalog
from ..cache.space import free_bytes
from ..cache.store import Store
from ..events import Events, FillView
from ..runner import Runner
from .accesslog import RequestRecord

log = Logger(namespace="ollama_mirror.stats")  # pinned: log names are public

T = TypeVar("T")

SURVEY_INTERVAL = 60.0


class SharedRun(Generic[T]):
    """A blocking call run in the runner at most once at a time; callers who come while it runs
    share its result.

    Each caller gets a Deferred of its own, so a caller that gives up (a client hanging up, a
    timeout) cancels only its wait, never the shared run, and a slow disk cannot fill the thread
    pool with copies of the same check.
    """

    def __init__(self, runner: Runner, call: Callable[[], T]) -> None:
        self._runner = runner
        self._call = call
        self._waiters: list[Deferred[T]] = []
        self._running = False

    def __call__(self) -> Deferred[T]:
        waiter: Deferred[T] = Deferred(self._forget)
        self._waiters.append(waiter)
        if not self._running:
            self._running = True
            self._runner.run(self._call).addBoth(self._done)
        return waiter

    def _forget(self, waiter: Deferred[T]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _done(self, result: T | Failure) -> None:
        self._running = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


# --- what the cache holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    name: str
    cached_at: str
    size: int


@dataclass(frozen=True)
class CacheSummary:
    models: tuple[ModelEntry, ...]
    total_size: int  # bytes of complete blobs
    blob_count: int
    partial_size: int  # bytes of downloads in progress or interrupted (allocated at full size)
    free_bytes: int  # free space on the cache's filesystem, for unprivileged users


def _directory_size(path: str, suffix: str = "") -> tuple[int, int]:
    """(total bytes, file count) of the regular files directly in *path* (ending in *suffix*)."""
    total = count = 0
    try:
        entries = os.scandir(path)
    except FileNotFoundError:
        return 0, 0
    with entries:
        for entry in entries:
            if entry.name.endswith(suffix) and not entry.name.startswith("."):
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                        count += 1
                except FileNotFoundError:  # removed while we looked
                    continue
    return total, count


class CacheSurvey:
    """Walks the cache (in a thread) and keeps the latest :class:`CacheSummary`."""

    def __init__(self, store: Store, catalog: Catalog, runner: Runner, clock: IReactorTime) -> None:
        self._store = store
        self._catalog = catalog
        self._clock = clock
        self._shared: SharedRun[CacheSummary] = SharedRun(runner, self._walk)
        self.latest: CacheSummary | None = None

    def _walk(self) -> CacheSummary:
        models = tuple(
            ModelEntry(model.name.display(), model.modified_at, model.size)
            for model in self._catalog.models()
        )
        total, count = _directory_size(self._store.blobs_dir)
        partial, _ = _directory_size(self._store.partial_dir, ".part")
        return CacheSummary(models, total, count, partial, free_bytes(self._store.root))

    async def refresh(self) -> CacheSummary:
        """Walk the cache now (sharing a walk already running)."""
        summary = await self._shared()
        self.latest = summary
        return summary

    async def refresh_logging_errors(self) -> None:
        """The periodic refresh: never raises, so its TimerService keeps running."""
        try:
            await self.refresh()
        except Exception:
            log.failure("surveying the cache failed")

    def tick(self) -> None:
        """The timer's call.  It does not wait for the walk (walks never overlap: see SharedRun), so
        stopping the daemon never waits on a slow disk; the thread pool's own stop does that."""
        Deferred.fromCoroutine(self.refresh_logging_errors())

    def service(self, interval: float = SURVEY_INTERVAL) -> TimerService:
        timer = TimerService(interval, self.tick)
        timer.clock = self._clock
        return timer


# --- what went where -------------------------------------------------------------------------------


@dataclass
class TrafficTally(Events):
    """Totals since start: answers from the cache or not, bytes by source, bytes from upstream."""

    hits: dict[str, int] = field(default_factory=lambda: {"blob": 0, "manifest": 0})
    misses: dict[str, int] = field(default_factory=lambda: {"blob": 0, "manifest": 0})
    served: dict[str, int] = field(default_factory=lambda: {"cache": 0, "fill": 0, "upstream": 0})
    upstream_received: int = 0
    cluster_received: dict[str, int] = field(default_factory=lambda: {"storage": 0, "node": 0})
    requests: int = 0

    def request_finished(self, record: RequestRecord) -> None:
        self.requests += 1
        source, kind = record.source, record.kind
        if source is None or kind is None:
            return
        self.served[source] += record.sent
        (self.hits if record.hit else self.misses)[kind] += 1

    def upstream_bytes(self, count: int) -> None:
        self.upstream_received += count

    def cluster_bytes(self, source: str, count: int) -> None:
        self.cluster_received[source] = self.cluster_received.get(source, 0) + count

    def document(self) -> dict[str, Any]:
        answers = sum(self.hits.values()) + sum(self.misses.values())
        served = sum(self.served.values())
        return {
            "requests": self.requests,
            "hit_ratio": round(sum(self.hits.values()) / answers, 4) if answers else None,
            "byte_hit_ratio": round(self.served["cache"] / served, 4) if served else None,
            "cache_hits": dict(self.hits),
            "cache_misses": dict(self.misses),
            "bytes_served": {**self.served, "total": served},
            "bytes_from_cache": self.served["cache"],
            "bytes_from_upstream": self.upstream_received,
            "bytes_from_cluster": dict(self.cluster_received),
            # Bytes clients got that did not cross the upstream link: what was served from the cache
            # and from downloads, less what those downloads fetched (so the first reader of a blob
            # saves nothing, every other one saves all of it; never negative).
            "bytes_saved": max(0, self.served["cache"] + self.served["fill"] - self.upstream_received),
        }


# --- the document ----------------------------------------------------------------------------------


class ClusterReport(Protocol):
    """The cluster's nodes and totals (:mod:`ollama_mirror.cluster.members`)."""

    async def summary(self) -> dict[str, Any]: ...

    def collector(self) -> Collector: ...


def iso_time(timestamp: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def fill_progress(fill: FillView, now: float) -> dict[str, Any]:
    """One download as an operator wants to see it."""
    completed = fill.completed_bytes()
    running = fill.started_at is not None
    elapsed = max(0.0, now - fill.started_at) if fill.started_at is not None else 0.0
    rate = fill.received_bytes / elapsed if elapsed > 0 else 0.0
    return {
        "digest": fill.digest,
        "repository": fill.repository,
        "state": "running" if running else "queued",
        "size": fill.size,
        "completed": completed,
        "progress": round(completed / fill.size, 4) if fill.size else 1.0,
        "received": fill.received_bytes,
        "resumed": fill.resumed_bytes,
        "started_at": iso_time(fill.started_at) if fill.started_at is not None else None,
        "elapsed_seconds": round(elapsed, 3),
        "rate_bytes_per_second": round(rate),
        "eta_seconds": round((fill.size - completed) / rate) if rate > 0 else None,
    }


class StatsReport:
    """Builds ``/mirror/stats``."""

    def __init__(
        self,
        *,
        survey: CacheSurvey,
        tally: TrafficTally,
        fills: Callable[[], Iterable[FillView]],
        clock: IReactorTime,
        cache_directory: str,
        upstream_url: str,
        cluster: ClusterReport | None = None,
    ) -> None:
        """*cluster*, for a node of a cluster, adds the cluster's totals and nodes."""
        self._survey = survey
        self._cluster = cluster
        self._tally = tally
        self._fills = fills
        self._clock = clock
        self._cache_directory = os.path.abspath(cache_directory)
        self._upstream_url = upstream_url
        self.started_at = clock.seconds()

    async def document(self) -> dict[str, Any]:
        summary = await self._survey.refresh()
        now = self._clock.seconds()
        fills = [fill_progress(fill, now) for fill in self._fills() if not fill.ended]
        return {
            "cached_models": len(summary.models),
            "total_cache_size": summary.total_size,
            "cache_directory": self._cache_directory,
            "upstream_url": self._upstream_url,
            "models": [
                {"name": model.name, "cached_at": model.cached_at, "size": model.size}
                for model in summary.models
            ],
            "cached_blobs": summary.blob_count,
            "partial_size": summary.partial_size,
            "disk_free": summary.free_bytes,
            **self._tally.document(),
            "active_fills": fills,
            "version": __version__,
            "started_at": iso_time(self.started_at),
            "uptime_seconds": round(now - self.started_at, 3),
            **({} if self._cluster is None else {"cluster": await self._cluster.summary()}),
        }
