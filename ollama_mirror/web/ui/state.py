"""What the page shows, as one JSON document, and what its actions do.

The parts come in as small protocols, so that the page depends on what it reads and not on how the
daemon is wired: the cache survey and traffic totals (``/mirror/stats``), the history of samples, the
health report, the cluster's nodes, and the models table (catalog, index and pins, read in a worker
thread: they are files and SQLite).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from ... import __version__
from ...cache.catalog import Catalog
from ...cache.index import ModelUsage
from ...cache.pins import Pins
from ...names import ModelName, PrivateNamespaces
from ...ops.stats import iso_time
from ...runner import Runner
from .live import FillFeed


class Survey(Protocol):
    async def refresh(self) -> Any: ...


class Tally(Protocol):
    def document(self) -> dict[str, Any]: ...


class History(Protocol):
    interval: float

    def document(self, live: bool = False) -> list[dict[str, Any]]: ...


class HealthReport(Protocol):
    def document(self) -> dict[str, Any]: ...


class Health(Protocol):
    async def report(self) -> HealthReport: ...


class ClusterReport(Protocol):
    async def document(self) -> dict[str, Any]: ...


class Usage(Protocol):
    def model_usage(self) -> dict[str, ModelUsage]: ...


class Puller(Protocol):
    async def pull(self, name: ModelName, emit: Callable[[dict[str, Any]], None]) -> list[str]: ...


@dataclass(frozen=True)
class Upstream:
    host: str
    url: str


@dataclass
class PageParts:
    """Everything the page reads and acts on."""

    clock: IReactorTime
    runner: Runner
    survey: Survey
    tally: Tally
    history: History
    health: Health
    feed: FillFeed
    catalog: Catalog
    usage: Usage
    pins: Pins
    private: PrivateNamespaces
    cache_cap: int
    upstreams: Iterable[Upstream]
    delete_model: Callable[[ModelName], Awaitable[list[str] | None]]
    puller: Puller
    expire_manifest: Callable[[ModelName], None]
    model_refused: Callable[[ModelName], str | None]
    cluster: ClusterReport | None = None


class PageState:
    """Builds the page's document and carries out its actions."""

    def __init__(self, parts: PageParts) -> None:
        self.parts = parts
        self.started_at = parts.clock.seconds()

    async def document(self) -> dict[str, Any]:
        p = self.parts
        summary = await p.survey.refresh()
        models = await p.runner.run(self._models)
        health = (await p.health.report()).document()
        nodes: Any = None
        if p.cluster is not None:
            try:
                nodes = await p.cluster.document()
            except Exception as e:  # the page still shows this node when Redis does not answer
                nodes = {"error": f"the cluster's Redis does not answer: {e}"}
        traffic = p.tally.document()
        now = p.clock.seconds()
        return {
            "version": __version__,
            "uptime_seconds": round(now - self.started_at),
            "cache": {
                "used": summary.total_size,
                "cap": p.cache_cap,
                "free": summary.free_bytes,
                "partial": summary.partial_size,
                "models": len(models),
            },
            "traffic": {
                "hit_ratio": traffic["hit_ratio"],
                "byte_hit_ratio": traffic["byte_hit_ratio"],
                "served": traffic["bytes_served"]["total"],
                "from_cache": traffic["bytes_from_cache"],
                "from_upstream": traffic["bytes_from_upstream"],
                "saved": traffic["bytes_saved"],
                "requests": traffic["requests"],
            },
            "history": {"interval": p.history.interval, "points": p.history.document(live=True)},
            "health": health,
            "upstreams": [{"host": u.host, "url": u.url} for u in p.upstreams],
            "cluster": nodes,
            "models": models,
            **p.feed.snapshot(),
        }

    def _models(self) -> list[dict[str, Any]]:
        """(thread) The models table: the files say what is cached, the index how it is used."""
        p = self.parts
        usage = p.usage.model_usage()
        pinned = p.pins.names()
        rows = []
        for model in p.catalog.models():
            key = str(model.name)
            used = usage.get(key)
            rows.append(
                {
                    "name": model.name.display(),
                    "id": key,
                    "size": model.size,
                    "last_used": iso_time(used.last_used if used else model.modified),
                    "cached_at": iso_time(used.cached_at if used else model.modified),
                    "pulls": used.pull_count if used else 0,
                    "pinned": key in pinned,
                    "private": p.private.holds(model.name),
                }
            )
        rows.sort(key=lambda row: str(row["last_used"]), reverse=True)
        return rows

    # --- actions -------------------------------------------------------------------------------

    async def delete(self, name: ModelName) -> bool:
        return await self.parts.delete_model(name) is not None

    async def pin(self, name: ModelName, pinned: bool) -> bool:
        """Pin or unpin; ``False`` when it already was (or was not)."""
        change = self.parts.pins.pin if pinned else self.parts.pins.unpin
        changed: bool = await self.parts.runner.run(change, name)
        return changed

    def pull(self, name: ModelName, refresh: bool) -> str | None:
        """Start caching *name* (with *refresh*: ask the upstream for the tag again, even if the cached one
        is fresh) and return at once; why it may not be pulled, else ``None``.  The page follows the
        downloads live; a failure goes to the last errors."""
        refused = self.parts.model_refused(name)
        if refused:
            return refused
        if refresh:
            self.parts.expire_manifest(name)
        work = Deferred.fromCoroutine(self.parts.puller.pull(name, lambda _: None))
        work.addErrback(lambda failure: self.parts.feed.error("pull", str(failure.value), name.display()))
        return None
