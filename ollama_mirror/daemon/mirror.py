"""The mirror's parts wired together: store, upstream client, manifest cache, fills and the HTTP tree.

Collaborators that tests replace (the HTTP client towards upstream, the blocking-work runner)
are parameters; everything else is built from the :class:`Config`.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorThreads
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from ..cache.catalog import Catalog
from ..cache.eviction import CacheLifecycle, Sweeper
from ..cache.index import CacheIndex
from ..cache.manifests import ManifestCache
from ..cache.store import Store
from ..config import Config
from ..events import EventHub
from ..fill.manager import FillManager
from ..ops.observability import Observability
from ..runner import InlineRunner, Runner, ThreadRunner
from ..security.access import AccessControl
from ..upstream.hosts import LoopGuard, build_upstreams, cache_marker
from ..web.ollama_api import OllamaApi
from ..web.proxy import InferenceProxy
from ..web.registry import FreshManifests, RegistryApi
from ..web.root import RootApi
from .holdings import CacheHoldings
from .prefetch import PrefetchService


class Mirror:
    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent: IAgent | None = None,
        runner: Runner | None = None,
        backend_agent: IAgent | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._pools: list[HTTPConnectionPool] = []
        self._backend_pool: HTTPConnectionPool | None = None
        self._thread_runner: ThreadRunner | None = None
        if runner is None and IReactorThreads.providedBy(reactor):
            runner = self._thread_runner = ThreadRunner(reactor)
        elif runner is None:  # a fake reactor (tests) has no threads to hand results back with
            runner = InlineRunner()
        self.runner = runner
        self.store = Store(config.cache.directory)
        self.store.create()
        self.marker = cache_marker(
            self.store.work_dir
        )  # the Via value of our upstream requests: one coming back is a loop
        self.upstreams, self._pools = build_upstreams(config, reactor, self.marker, agent)
        self.upstream = self.upstreams.default
        self.events = EventHub()
        self.manifests = ManifestCache(
            self.store, self.upstreams, runner, reactor, config.cache.manifest_ttl, self.events
        )
        self.fills = FillManager(self.store, self.upstream, reactor, runner, config.upstream, self.events)
        self.access = AccessControl(
            config.security,
            reactor,
            self.store.work_dir,
            registry_host=lambda host_header: self.upstreams.for_request_host(host_header).host,
            holdings=CacheHoldings(self.store, self.manifests, self.fills),
        )
        self.registry = RegistryApi(
            self.store, self.manifests, self.fills, self.upstreams, reactor, self.events
        )
        self.registry.blob_location = self.access.blob_location
        self.catalog = Catalog(self.store)
        self.index = CacheIndex(os.path.join(self.store.work_dir, "index.sqlite3"), reactor)
        self.events.listen(self.index)
        self.sweeper = Sweeper(
            self.store,
            self.catalog,
            self.index,
            config.cache,
            runner,
            reactor,
            self.events,
            protected=lambda: set(self.fills.fills) | set(self.registry.reading),
        )
        self.events.listen(self.sweeper)
        self.fills.admit = self.sweeper.admit
        if backend_agent is None and config.features.enable_api_proxy:
            self._backend_pool = HTTPConnectionPool(reactor, persistent=True)
            backend_agent = Agent(reactor, pool=self._backend_pool, connectTimeout=10)
        self.proxy = InferenceProxy(
            backend_agent,
            config.backend.url,
            config.features.enable_api_proxy,
            config.backend.timeout,
            reactor,
        )
        self.api = OllamaApi(
            self.store,
            self.catalog,
            self.manifests,
            self.fills,
            self.upstreams,
            runner,
            reactor,
            self.proxy,
            self.events,
            delete_model=self.sweeper.delete_model,
        )
        self.observability = Observability(
            self, agent=agent or self.upstream.agent, backend_agent=backend_agent, registry=metrics_registry
        )
        self.root = RootApi(
            registry=self.registry.resource(),
            api=self.api.resource(),
            openai=self.proxy.resource(),
            admin=self.observability.admin_resource(),
            metrics=self.observability.metrics_on_main_site(),
        )

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
        return [*services, *self.observability.services()]

    def prefetch_service(self) -> PrefetchService:
        """The ``cache.prefetch`` list, warmed at start and kept fresh every ``cache.prefetch_interval``."""
        cache = self.config.cache
        return PrefetchService(
            self.api.puller, cache.prefetch, cache.prefetch_interval, self.reactor, self.access.rules.check
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
