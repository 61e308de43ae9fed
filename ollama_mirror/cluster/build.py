"""A node's cluster parts, built from ``cluster.*``: the shared copy, and with Redis the leases, the
roster of nodes, node-to-node reads and removals, and the health checks of the cluster's services."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent

from ..cache.catalog import Catalog
from ..cache.store import Store
from ..config import Config
from ..events import Events
from ..names import ModelName
from ..ops.health import CallProbe, Probe
from ..runner import Reactor, Runner
from ..upstream.retry import RetryPolicy
from .leases import Leases
from .members import ClusterReport, Membership
from .peers import PeerSigner, PeerSource
from .redis import RedisKeyValue, describe_redis
from .removal import ClusterRemoval
from .s3 import S3Client, Storage
from .shared import SharedStore
from .sweep import SharedSweep

log = Logger(namespace="ollama_mirror.cluster")


@dataclass
class ClusterParts:
    """What ``cluster.*`` adds to a node: the shared copy, the connection pools to close with the daemon,
    the health checks of the cluster's services; with Redis, the signer of node-to-node requests, the
    roster of nodes, and the services that keep it and give leases up at shutdown."""

    shared: SharedStore
    pools: list[HTTPConnectionPool] = field(default_factory=list)
    signer: PeerSigner | None = None
    services: list[IService] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    report: ClusterReport | None = None
    removal: ClusterRemoval | None = None
    listeners: list[Events] = field(default_factory=list)
    maintenance: list[IService] = field(default_factory=list)  # (one process of a node runs them)
    membership: Membership | None = None

    def services_of(self, maintenance: bool) -> list[IService]:
        """What a process runs: every one the leases' release and the health checks; the one that runs
        maintenance the heartbeats, the sweep and the sharing at start; the others read the roster."""
        if maintenance:
            return [*self.services, *self.maintenance]
        reading = [self.membership.service(heartbeat=False)] if self.membership is not None else []
        return [*self.services, *reading]

    counters: RedisKeyValue | None = None
    namespace: str = ""


class _ShareAtStart(Service):
    """Once the daemon runs: add what this node holds and the shared copy lacks (in the background)."""

    def __init__(self, shared: SharedStore, catalog: Catalog, runner: Runner) -> None:
        self._shared = shared
        self._catalog = catalog
        self._runner = runner

    def startService(self) -> None:
        super().startService()
        Deferred.fromCoroutine(self._share()).addErrback(
            lambda failure: log.warn("sharing this node's models failed: {e}", e=failure.getErrorMessage())
        )

    async def _share(self) -> None:
        models = await self._runner.run(self._catalog.models)
        added = await self._shared.share([model.name for model in models])
        if added:
            log.info("shared {n} models this node held and the shared storage lacked", n=added)


class _LeasesAtShutdown(Service):
    """Gives every lease up when the daemon stops, so that other nodes take over at once."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._leases.release_all()


def build_cluster(
    config: Config,
    reactor: Reactor,
    runner: Runner,
    store: Store,
    retry: RetryPolicy,
    secret: bytes,
    agent: IAgent | None = None,
    report: Callable[[], dict[str, Any]] = dict,
    delete_here: Callable[[ModelName], Awaitable[list[str] | None]] | None = None,
    catalog: Catalog | None = None,
) -> ClusterParts:
    """The shared copy ``cluster.*`` describes, with leases, node-to-node reads and the roster of nodes
    when ``cluster.redis_url`` is set (*agent*: tests and embedding applications bring their own HTTP
    client; then no pool is made; *report*: what this node tells the others at each heartbeat;
    *delete_here* removes a model from this node's cache, for removals that span the cluster; with
    *catalog*, what this node holds is shared at start)."""
    cluster = config.cluster
    pools: list[HTTPConnectionPool] = []
    s3_agent = agent or _pooled_agent(reactor, pools, connect_timeout=10)
    s3 = S3Client(Storage.from_config(cluster), cluster, s3_agent, reactor, runner, retry)
    parts = ClusterParts(SharedStore(s3, store, reactor, runner), pools)
    parts.listeners.append(parts.shared)
    if catalog is not None:
        parts.maintenance.append(_ShareAtStart(parts.shared, catalog, runner))
    parts.probes.append(CallProbe("shared_storage", s3.storage.describe(), s3.ping, reactor))
    if cluster.redis_url:
        node = config.node_url()
        namespace = f"ollama-mirror:{s3.storage.bucket}/{s3.storage.prefix}"
        redis = RedisKeyValue(cluster.redis_url, reactor)
        parts.probes.append(CallProbe("redis", describe_redis(cluster.redis_url), redis.ping, reactor))
        membership = Membership(redis, reactor, node, cluster.lease_seconds, namespace, report)
        parts.report = ClusterReport(membership, s3.storage.describe())
        parts.counters, parts.namespace = redis, namespace
        leases = Leases(redis, reactor, node, cluster.lease_seconds, namespace)
        signer = PeerSigner(secret, node, reactor)
        peer_agent = agent or _pooled_agent(reactor, pools, connect_timeout=5)  # connections of their own
        parts.shared.leases = leases
        parts.shared.peer = lambda url: PeerSource(peer_agent, signer, url)
        parts.signer = signer
        sweep = SharedSweep(
            s3, redis, reactor, node, namespace, config.cache.retention_days, config.cache.cleanup_interval
        )
        parts.listeners.append(sweep)
        parts.membership = membership
        parts.services.append(_LeasesAtShutdown(leases))
        parts.maintenance += [membership.service(), sweep.service()]
        if delete_here is not None:
            parts.removal = ClusterRemoval(parts.shared, delete_here, membership, peer_agent, signer)
    elif delete_here is not None:
        parts.removal = ClusterRemoval(parts.shared, delete_here)
    parts.services += [probe.service(cluster.lease_seconds) for probe in parts.probes]
    return parts


def _pooled_agent(reactor: Reactor, pools: list[HTTPConnectionPool], connect_timeout: float) -> IAgent:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pools.append(pool)
    return Agent(reactor, pool=pool, connectTimeout=connect_timeout)
