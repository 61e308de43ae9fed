"""The mirror's parts wired together: the cache, the upstreams, the downloads and the HTTP tree.

Each part gets its collaborators at construction, in the order the layers go (the cache, then the
upstreams and the downloads, then the web layer and its guards, then what operators see); nothing is
patched on afterwards.  Collaborators that tests and embedding applications replace (the HTTP client
towards upstream, the backend's, the blocking-work runner, the metrics registry) are parameters;
everything else is built from the :class:`Config`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorThreads
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from ..cache.blobs import SharedTier
from ..cache.catalog import Catalog
from ..cache.eviction import CacheLifecycle, Sweeper
from ..cache.files import cache_marker
from ..cache.index import CacheIndex
from ..cache.manifests import ManifestCache
from ..cache.pins import Pins
from ..cache.staging import ManifestPublisher
from ..cache.store import Store
from ..cluster.peers import PeerSigner
from ..cluster.ratelimit import SharedRateLimiter

if TYPE_CHECKING:
    from ..cluster.build import ClusterParts
from ..config import Config, ConfigError
from ..events import EventHub
from ..fill.manager import FillManager
from ..fill.pulling import ModelPuller
from ..names import PrivateNamespaces
from ..ops.history import TrafficHistory
from ..ops.observability import Observability
from ..private.uploads import Uploads, private_usage
from ..runner import InlineRunner, Reactor, Runner, ThreadRunner
from ..security.access import AccessControl
from ..security.connections import ConnectionLimits, automatic_total, descriptor_limit
from ..security.ratelimit import RateLimiter
from ..security.registryauth import load_secret
from ..upstream.hosts import build_upstreams
from ..upstream.retry import RetryPolicy
from ..web.admin import AdminApi
from ..web.loop import LoopGuard
from ..web.ollama_api import OllamaApi
from ..web.proxy import InferenceProxy
from ..web.push import PushApi, StreamingBodies
from ..web.registry import FreshManifests, RegistryApi
from ..web.root import RootApi
from ..web.routes import ROUTES, route_of
from ..web.ui.live import FillFeed
from ..web.ui.page import WebUi
from ..web.ui.session import Sessions
from ..web.ui.state import PageParts, PageState
from ..web.ui.state import Upstream as UiUpstream
from .holdings import CacheHoldings
from .prefetch import PrefetchService


class Mirror:
    def __init__(
        self,
        config: Config,
        reactor: Reactor,
        agent: IAgent | None = None,
        runner: Runner | None = None,
        backend_agent: IAgent | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        """*reactor* is the clock of every timer and, when it runs threads, the runner's reactor;
        *agent* replaces the HTTP client towards upstreams, *backend_agent* the inference proxy's,
        *runner* the thread pool, *metrics_registry* where the metrics live."""
        self.config = config
        self.reactor = reactor
        self._thread_runner: ThreadRunner | None = None
        self.runner = self._runner(runner)
        self._build_cache()
        self._build_downloads(agent)
        self._build_web(backend_agent)
        self._build_pushes()
        self.observability = Observability(
            config,
            reactor,
            store=self.store,
            catalog=self.catalog,
            runner=self.runner,
            events=self.events,
            fills=lambda: self.fills.fills.values(),
            marker=self.marker,
            route_of=route_of,
            routes=ROUTES,
            agent=agent or self.upstream.agent,
            backend_agent=self._backend_agent,
            backend_asked=lambda: self.proxy.asked,
            registry=metrics_registry,
            dependencies=self.cluster.probes if self.cluster else (),
            cluster=self.cluster.report if self.cluster else None,
        )
        self._build_ui()
        self.admin = AdminApi(
            self.observability.stats,
            self.observability.health,
            self.sweeper,
            trusted=self.access.trusted,
            cluster=self.cluster.report if self.cluster else None,
            removal=self.cluster.removal if self.cluster else None,
            ui=self.ui.resource() if self.ui is not None else None,
        )
        self.root = RootApi(
            registry=self.registry.resource(),
            api=self.api.resource(),
            openai=self.proxy.resource(),
            admin=self.admin.resource(),
            metrics=self.observability.metrics_on_main_site(),
            push=self.push.resource() if self.push is not None else None,
        )

    def _build_ui(self) -> None:
        """The operators' web page (``features.enable_web_ui``), its traffic history and live feed."""
        self.ui: WebUi | None = None
        self.history = TrafficHistory(self.observability.tally, self.reactor)
        if not self.config.features.enable_web_ui:
            return
        feed = FillFeed(
            self.reactor,
            lambda: self.fills.fills.values(),
            lambda hexdigest: self.registry.reading.get(hexdigest, 0),
        )
        self.events.listen(feed)
        parts = PageParts(
            clock=self.reactor,
            runner=self.runner,
            survey=self.observability.survey,
            tally=self.observability.tally,
            history=self.history,
            health=self.observability.health,
            feed=feed,
            catalog=self.catalog,
            usage=self.index,
            pins=self.pins,
            private=self.private,
            cache_cap=self.sweeper.cap,
            upstreams=[UiUpstream(u.host, u.url) for u in self.upstreams],
            delete_model=self.cluster.removal.delete
            if self.cluster and self.cluster.removal
            else self.sweeper.delete_model,
            puller=self.puller,
            expire_manifest=self.manifests.expire,
            model_refused=self.access.rules.check,
            cluster=self.cluster.report if self.cluster else None,
        )
        try:
            secret = load_secret(self.config.security.signing_secret, self.store.work_dir)
        except (ValueError, OSError) as e:
            raise ConfigError(f"security.signing_secret: {e}") from None
        sessions = Sessions(secret, self.access.api_keys, self.reactor)
        self.ui = WebUi(PageState(parts), sessions, self.access, self.reactor)

    def _runner(self, runner: Runner | None) -> Runner:
        if runner is not None:
            return runner
        if IReactorThreads.providedBy(self.reactor):
            self._thread_runner = ThreadRunner(self.reactor)
            return self._thread_runner
        return InlineRunner()  # a fake reactor (tests) has no threads to hand results back with

    def _build_cache(self) -> None:
        """The models directory, what it holds, its index and its limits."""
        config, reactor = self.config, self.reactor
        self.store = Store(config.cache.directory)
        self.store.create()
        self.marker = cache_marker(
            self.store.work_dir
        )  # the Via of our upstream requests: one back is a loop
        self.events = EventHub()
        self.private = PrivateNamespaces(config.private.namespaces)
        self.catalog = Catalog(self.store)
        self.publisher = ManifestPublisher(
            self.catalog, self.runner, self.events
        )  # staged tags, as blobs come
        self.events.listen(self.publisher)
        self.index = CacheIndex(os.path.join(self.store.work_dir, "index.sqlite3"), reactor)
        self.events.listen(self.index)
        self.pins = Pins(self.store.work_dir)
        self.sweeper = Sweeper(
            self.store,
            self.catalog,
            self.index,
            config.cache,
            self.runner,
            reactor,
            self.events,
            protected=self._busy_blobs,
            private=self.private,
            pins=self.pins,
        )
        self.events.listen(self.sweeper)

    def _build_downloads(self, agent: IAgent | None) -> None:
        """The upstreams, the manifest cache, one download per blob, and whole-model pulls."""
        config, reactor = self.config, self.reactor
        self.retry = RetryPolicy(reactor, config.upstream.retry_attempts, config.upstream.retry_delay)
        self.upstreams, self._pools = build_upstreams(
            config, reactor, self.marker, agent, retry=self.retry, retried=self.events.upstream_error
        )
        self.upstream = self.upstreams.default
        self.shared = self._shared_store(agent)
        self.manifests = ManifestCache(
            self.store,
            self.upstreams,
            self.runner,
            reactor,
            config.cache.manifest_ttl,
            self.events,
            shared=self.shared,
            private=self.private,
        )
        self.fills = FillManager(
            self.store,
            self.upstream,
            reactor,
            self.runner,
            config.upstream,
            self.events,
            admit=self.sweeper.admit,
            retry=self.retry,
            shared=self.shared,
        )
        self.puller = ModelPuller(
            self.store, self.manifests, self.fills, self.upstreams, reactor, self.events
        )

    def _shared_store(self, agent: IAgent | None) -> SharedTier | None:
        """The cluster's shared copy (``cluster.storage_url``), listening to what this node verifies."""
        self.peers: PeerSigner | None = None
        self.cluster: ClusterParts | None = None
        if not self.config.cluster.storage_url:
            return None
        from ..cluster import missing_extra

        try:
            from ..cluster.build import build_cluster
        except ImportError as e:
            raise missing_extra(e) from None
        secret = load_secret(self.config.security.signing_secret, self.store.work_dir)
        parts = build_cluster(
            self.config,
            self.reactor,
            self.runner,
            self.store,
            self.retry,
            secret,
            agent,
            report=lambda: self._node_report(),  # (asked at each heartbeat, once everything is built)
            delete_here=self.sweeper.delete_model,
            catalog=self.catalog,
        )
        self.cluster = parts
        self._pools.extend(parts.pools)
        self.peers = parts.signer
        for listener in parts.listeners:
            self.events.listen(listener)
        return parts.shared

    def _node_report(self) -> dict[str, Any]:
        """What this node tells the other nodes at each heartbeat (see ``GET /mirror/cluster``)."""
        report = self.observability.node_report()
        if self.cluster is not None:
            report["shared"] = {"uploaded_bytes": self.cluster.shared.uploaded_bytes}
        return report

    def _storage_redirect(self) -> Callable[[str], Awaitable[str | None]] | None:
        """``cluster.redirect_to_storage``: blob GETs go to the shared storage when it holds the blob."""
        if self.cluster is None or not self.config.cluster.redirect_to_storage:
            return None
        return self.cluster.shared.redirect

    def _build_pushes(self) -> None:
        """``ollama push`` to the private namespaces (``private.*``), when there are any."""
        self.uploads: Uploads | None = None
        self.push: PushApi | None = None
        self.bodies: StreamingBodies | None = None
        if not self.private:
            return
        private = self.config.private
        self.uploads = Uploads(
            self.store,
            self.runner,
            self.reactor,
            private.upload_timeout,
            quota=int(private.max_size_gb * 10**9),
            usage=lambda: private_usage(self.catalog.models, self.private),
        )
        self.push = PushApi(
            self.store,
            self.store,
            self.uploads,
            self.runner,
            host_of=lambda request: (
                self.upstreams.for_request_host((request.getHeader(b"host") or b"").decode("latin-1")).host
            ),
            events=self.events,
        )
        self.bodies = StreamingBodies(self.uploads, self.access.may_push)

    def _cluster_limiter(self) -> SharedRateLimiter | None:
        """In a cluster with Redis, the rate limit counts each client across every node."""
        security = self.config.security
        if self.cluster is None or self.cluster.counters is None or not security.rate_limit_requests:
            return None
        local = RateLimiter(self.reactor, security.rate_limit_requests, security.rate_limit_window)
        return SharedRateLimiter(local, self.cluster.counters, self.reactor, self.cluster.namespace)

    def _build_web(self, backend_agent: IAgent | None) -> None:
        """The guards and the routes: access control, the registry, the Ollama API, the proxy."""
        config, reactor = self.config, self.reactor
        self.access = AccessControl(
            config.security,
            reactor,
            self.store.work_dir,
            registry_host=lambda host_header: self.upstreams.for_request_host(host_header).host,
            holdings=CacheHoldings(self.store, self.manifests, self.fills),
            peers=self.peers,
            limiter=self._cluster_limiter(),
            private=config.private,
        )
        self.registry = RegistryApi(
            self.store,
            self.manifests,
            self.fills,
            self.upstreams,
            reactor,
            self.events,
            blob_location=self.access.blob_location,
            redirect=self._storage_redirect(),
            private=self.private,
        )
        server = config.server
        self.connections = ConnectionLimits(
            reactor,
            server.max_connections_per_client,
            server.max_connections or automatic_total(descriptor_limit()),
            self.events,
        )
        self._backend_pool: HTTPConnectionPool | None = None
        if backend_agent is None and config.features.enable_api_proxy:
            self._backend_pool = HTTPConnectionPool(reactor, persistent=True)
            backend_agent = Agent(reactor, pool=self._backend_pool, connectTimeout=10)
        self._backend_agent = backend_agent
        self.proxy = InferenceProxy(
            backend_agent,
            config.backend.url,
            config.features.enable_api_proxy,
            config.backend.timeout,
            reactor,
        )
        self.api = OllamaApi(
            self.catalog,
            self.puller,
            self.upstreams,
            self.runner,
            self.proxy,
            delete_model=self.cluster.removal.delete
            if self.cluster and self.cluster.removal
            else self.sweeper.delete_model,
        )

    def _busy_blobs(self) -> set[str]:
        """Hex digests being downloaded or served right now: no sweep removes them."""
        return set(self.fills.fills) | set(self.registry.reading)

    def resource(self) -> IResource:
        """The whole HTTP tree, every request timed, logged, counted and judged by ``security.*``."""
        return self.observability.observe(
            LoopGuard(self.access.wrap(FreshManifests(self.registry, self.root.resource())), self.marker)
        )

    def services(self, maintenance: bool = True) -> list[IService]:
        """Services to run beside the listening endpoints (*maintenance*: the eviction sweep and the
        prefetch list, which only one of several worker processes runs)."""
        services: list[IService] = [
            self.fills,
            CacheLifecycle(self.sweeper, self.reactor, sweeps=maintenance),
        ]
        if self.config.cache.prefetch and maintenance:
            services.append(self.prefetch_service())
        if self.uploads is not None:
            idle = 0.0 if self.config.server.workers == 1 else 60.0  # (others' sessions may be live)
            services.append(self.uploads.service(clear_leftovers=maintenance, leftovers_idle=idle))
        return [
            *services,
            *(self.cluster.services_of(maintenance) if self.cluster else []),
            *self.observability.services(),
            *([self.history.service()] if self.ui is not None else []),
        ]

    def prefetch_service(self) -> PrefetchService:
        """The ``cache.prefetch`` list, warmed at start and kept fresh every ``cache.prefetch_interval``."""
        cache = self.config.cache
        return PrefetchService(
            self.puller, cache.prefetch, cache.prefetch_interval, self.reactor, self.access.rules.check
        )

    def start(self) -> None:
        """Start the worker threads (before any service, which may need them)."""
        if self._thread_runner is not None:
            self._thread_runner.start()

    def close(self) -> Deferred[Any]:
        """After every service has stopped: close pooled connections and stop the worker threads."""
        pools = [pool for pool in (*self._pools, self._backend_pool) if pool is not None]
        d = DeferredList([pool.closeCachedConnections() for pool in pools])
        if self._thread_runner is not None:
            d.addBoth(lambda _: self._thread_runner.stop() if self._thread_runner else None)
        return d
