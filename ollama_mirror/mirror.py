"""The mirror's parts wired together: store, upstream client, manifest cache, fills and the HTTP tree.

Collaborators that tests replace (the HTTP client towards upstream, the blocking-work runner)
are parameters; everything else is built from the :class:`Config`.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from . import __version__
from .catalog import Catalog
from .config import Config
from .events import EventHub
from .fills import FillManager
from .manifests import ManifestCache
from .ollama_api import OllamaApi
from .proxy import InferenceProxy
from .registry import RegistryApi
from .runner import Runner, ThreadRunner
from .store import Store
from .upstream import Upstream
from .web import RootApi


class _RunnerService(Service):
    """Starts and stops the thread pool of a :class:`ThreadRunner` with the daemon."""

    def __init__(self, runner: ThreadRunner) -> None:
        self.runner = runner

    def startService(self) -> None:
        super().startService()
        self.runner.start()

    def stopService(self) -> None:
        super().stopService()
        self.runner.stop()


class Mirror:
    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent: IAgent | None = None,
        runner: Runner | None = None,
        backend_agent: IAgent | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._pool: HTTPConnectionPool | None = None
        self._backend_pool: HTTPConnectionPool | None = None
        if agent is None:
            agent = self._make_agent(reactor, config)
        self._thread_runner: ThreadRunner | None = None
        if runner is None:
            runner = self._thread_runner = ThreadRunner(reactor)
        self.runner = runner
        self.store = Store(config.cache.directory)
        self.store.create()
        self.upstream = Upstream(
            config.upstream.url,
            config.upstream.host,
            agent,
            reactor,
            timeout=config.upstream.timeout,
            username=config.upstream.username,
            password=config.upstream.password,
        )
        self.events = EventHub()
        self.manifests = ManifestCache(self.store, self.upstream, runner, reactor, config.cache.manifest_ttl)
        self.fills = FillManager(self.store, self.upstream, reactor, runner, config.upstream, self.events)
        self.registry = RegistryApi(
            self.store, self.manifests, self.fills, self.upstream, reactor, self.events
        )
        self.catalog = Catalog(self.store)
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
            self.store, self.catalog, self.manifests, self.fills, self.upstream, runner, reactor, self.proxy
        )
        self.root = RootApi(
            {
                "name": "ollama-mirror",
                "version": __version__,
                "upstream": config.upstream.url,
                "cache_directory": os.path.abspath(config.cache.directory),
            },
            registry=self.registry.resource(),
            api=self.api.resource(),
            openai=self.proxy.resource(),
        )

    def _make_agent(self, reactor: Any, config: Config) -> IAgent:
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = (
            config.upstream.connections_per_blob * config.upstream.max_concurrent_downloads
        )
        self._pool.retryAutomatically = False
        return Agent(reactor, pool=self._pool, connectTimeout=min(30.0, config.upstream.timeout))

    def resource(self) -> IResource:
        return self.root.resource()

    def services(self) -> list[IService]:
        """Services to run beside the listening endpoints (the thread pool first, so it stops last)."""
        services: list[IService] = []
        if self._thread_runner is not None:
            services.append(_RunnerService(self._thread_runner))
        services.append(self.fills)
        return services

    def close(self) -> Deferred[Any]:
        """Close pooled connections (after the services have stopped)."""
        pools = [pool for pool in (self._pool, self._backend_pool) if pool is not None]
        return DeferredList([pool.closeCachedConnections() for pool in pools])
