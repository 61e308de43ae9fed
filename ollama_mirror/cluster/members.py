"""Which nodes make up the cluster, and what each is doing: heartbeats in the cluster's Redis.

Every node stores a small JSON document about itself (its URL, version, running fills, traffic totals
and cache size) every third of ``cluster.lease_seconds``, under a key that lives twice that long, and
lists its URL in a set.  Reading the roster returns the documents whose keys are still alive (a node
whose key expired leaves the set at that moment), so a node that is killed drops out within twice the
lease time, and one that stops cleanly leaves at once.

From the roster come ``GET /mirror/cluster``, the ``cluster`` part of ``/mirror/stats`` and the
``ollama_mirror_cluster_*`` metrics: totals over the live nodes (:func:`cluster_totals`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="ollama_mirror.cluster")


class Roster(Protocol):
    """The Redis operations of :class:`Membership` (each one command or script)."""

    def heartbeat(
        self, roster: str, member: str, key: str, document: str, ttl_ms: int
    ) -> Awaitable[None]: ...

    def roster(self, roster: str, key_prefix: str) -> Awaitable[list[str]]: ...

    def leave(self, roster: str, member: str, key: str) -> Awaitable[None]: ...


class Membership:
    def __init__(
        self,
        store: Roster,
        clock: IReactorTime,
        node: str,
        lease_seconds: float,
        namespace: str,
        report: Callable[[], dict[str, Any]],
    ) -> None:
        """*node* is this node's URL; *report* says what this node is doing (its part of the roster:
        fills, traffic, cache), asked at each heartbeat."""
        self._store = store
        self._clock = clock
        self.node = node
        self.interval = lease_seconds / 3
        self.ttl_ms = int(2 * lease_seconds * 1000)
        self._roster_key = f"{namespace}:nodes"
        self._prefix = f"{namespace}:node:"
        self._report = report
        self.nodes: list[dict[str, Any]] = []  # the roster as of the latest heartbeat
        self._beating: Deferred[None] | None = None

    async def beat(self) -> None:
        """Say this node is alive (with what it is doing), then read who else is."""
        document = {
            **self._report(),
            "url": self.node,
            "heartbeat_at": datetime.fromtimestamp(self._clock.seconds(), tz=UTC).isoformat(
                timespec="seconds"
            ),
        }
        await self._store.heartbeat(
            self._roster_key, self.node, self._prefix + self.node, json.dumps(document), self.ttl_ms
        )
        self.nodes = await self.read()

    async def refresh(self) -> None:
        """Read who is alive, without a heartbeat (the other worker processes of a node)."""
        self.nodes = await self.read()

    async def read(self) -> list[dict[str, Any]]:
        """The live nodes, sorted by URL, each marked ``alive`` (raises when Redis fails)."""
        nodes = []
        for text in await self._store.roster(self._roster_key, self._prefix):
            try:
                document = json.loads(text)
            except ValueError:
                continue
            if isinstance(document, dict) and isinstance(document.get("url"), str):
                nodes.append({**document, "alive": True, "self": document["url"] == self.node})
        return sorted(nodes, key=lambda node: str(node["url"]))

    async def leave(self) -> None:
        """At shutdown: leave the roster at once (the key would expire by itself)."""
        try:
            await self._store.leave(self._roster_key, self.node, self._prefix + self.node)
        except Exception as e:
            log.warn("could not leave the cluster's roster: {error}", error=e)

    def tick(self, heartbeat: bool = True) -> None:
        """The timer's call: one heartbeat at a time; a failed one is logged, the next tries again."""
        if self._beating is None:
            self._beating = Deferred.fromCoroutine(self.beat() if heartbeat else self.refresh())
            self._beating.addErrback(self._failed).addBoth(self._beaten)

    def _beaten(self, _: object) -> None:
        self._beating = None

    def _failed(self, failure: Any) -> None:
        log.warn("heartbeat to the cluster failed: {error}", error=failure.getErrorMessage())

    def service(self, heartbeat: bool = True) -> TimerService:
        """The heartbeats (one process of a node beats; its other workers only read the roster)."""
        return _Heartbeats(self, heartbeat)


class _Heartbeats(TimerService):
    def __init__(self, membership: Membership, heartbeat: bool) -> None:
        super().__init__(membership.interval, membership.tick, heartbeat)
        self.clock = membership._clock
        self._membership = membership
        self._heartbeat = heartbeat

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        if not self._heartbeat:
            return stopped
        return stopped.addCallback(lambda _: Deferred.fromCoroutine(self._membership.leave()))


# --- the whole cluster --------------------------------------------------------------------------------


def cluster_totals(nodes: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """What the live nodes did together, from their heartbeats: fills, answers, bytes, cache sizes."""
    nodes = list(nodes)
    hits: dict[str, int] = {}
    misses: dict[str, int] = {}
    served: dict[str, int] = {}
    requests = upstream = cache_size = fills = shared_uploaded = 0
    from_cluster: dict[str, int] = {}
    for node in nodes:
        traffic = node.get("traffic") or {}
        requests += int(traffic.get("requests") or 0)
        for kind, count in (traffic.get("cache_hits") or {}).items():
            hits[kind] = hits.get(kind, 0) + int(count)
        for kind, count in (traffic.get("cache_misses") or {}).items():
            misses[kind] = misses.get(kind, 0) + int(count)
        for source, count in (traffic.get("bytes_served") or {}).items():
            if source != "total":
                served[source] = served.get(source, 0) + int(count)
        upstream += int(traffic.get("bytes_from_upstream") or 0)
        for source, count in (traffic.get("bytes_from_cluster") or {}).items():
            from_cluster[source] = from_cluster.get(source, 0) + int(count)
        cache_size += int((node.get("cache") or {}).get("size") or 0)
        fills += len(node.get("fills") or [])
        shared_uploaded += int((node.get("shared") or {}).get("uploaded_bytes") or 0)
    answers = sum(hits.values()) + sum(misses.values())
    total_served = sum(served.values())
    from_cache = served.get("cache", 0)
    return {
        "nodes": len(nodes),
        "active_fills": fills,
        "requests": requests,
        "hit_ratio": round(sum(hits.values()) / answers, 4) if answers else None,
        "byte_hit_ratio": round(from_cache / total_served, 4) if total_served else None,
        "cache_hits": hits,
        "cache_misses": misses,
        "bytes_served": {**served, "total": total_served},
        "bytes_from_upstream": upstream,
        "bytes_from_cluster": from_cluster,
        "bytes_saved": max(0, from_cache + served.get("fill", 0) - upstream),
        "cache_size": cache_size,
        "shared_uploaded_bytes": shared_uploaded,
    }


class ClusterCollector:
    """The ``ollama_mirror_cluster_*`` gauges, from the roster of the latest heartbeat (a scrape never
    waits on Redis): any node's ``/metrics`` tells about the whole cluster."""

    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    def collect(self) -> Iterator[Metric]:
        nodes = self._membership.nodes
        totals = cluster_totals(nodes)
        prefix = "ollama_mirror_cluster_"

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(prefix + name, doc, value=value)

        yield gauge("nodes", "Live nodes in the cluster (as of this node's latest heartbeat).", len(nodes))
        yield gauge("active_fills", "Blob downloads running on all nodes.", totals["active_fills"])
        yield gauge(
            "upstream_received_bytes",
            "Blob bytes the live nodes received from upstream registries since each started.",
            totals["bytes_from_upstream"],
        )
        yield gauge(
            "cache_size_bytes", "Bytes of complete blobs in the live nodes' caches.", totals["cache_size"]
        )
        served = GaugeMetricFamily(
            prefix + "served_bytes",
            "Model bytes the live nodes sent to clients since each started, by source.",
            labels=["source"],
        )
        for source, count in totals["bytes_served"].items():
            if source != "total":
                served.add_metric([source], count)
        yield served
        for name, counts, doc in (
            ("cache_hits", totals["cache_hits"], "Answers from the live nodes' caches, by kind."),
            ("cache_misses", totals["cache_misses"], "Answers of the live nodes that needed upstream."),
        ):
            family = GaugeMetricFamily(prefix + name, doc, labels=["kind"])
            for kind, count in counts.items():
                family.add_metric([kind], count)
            yield family
        up = GaugeMetricFamily(prefix + "node_up", "1 for each live node, by its URL.", labels=["node"])
        for node in nodes:
            up.add_metric([str(node["url"])], 1)
        yield up


class ClusterReport:
    """``GET /mirror/cluster`` and the ``cluster`` part of ``/mirror/stats``: the live nodes, read from
    Redis when asked, and their totals."""

    def __init__(self, membership: Membership, storage: str) -> None:
        """*storage* describes the shared storage (no credentials)."""
        self.membership = membership
        self._storage = storage

    def collector(self) -> ClusterCollector:
        return ClusterCollector(self.membership)

    async def document(self) -> dict[str, Any]:
        nodes = await self.membership.read()
        return {
            "node": self.membership.node,
            "storage": self._storage,
            "nodes": nodes,
            "totals": cluster_totals(nodes),
        }

    async def summary(self) -> dict[str, Any]:
        """The totals and the nodes' URLs (the roster of the latest heartbeat when Redis fails now)."""
        try:
            nodes = await self.membership.read()
            error = None
        except Exception as e:
            nodes, error = (
                self.membership.nodes,
                f"the cluster's Redis failed ({e}): as of the last heartbeat",
            )
        summary = {**cluster_totals(nodes), "node_urls": [node["url"] for node in nodes]}
        return summary if error is None else {**summary, "error": error}
