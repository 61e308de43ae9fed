"""The daemon's download machinery without a daemon: for ``ollama-mirror prefetch --cache-dir``.

:class:`CacheFiller` pulls models straight into a cache directory with the very parts the daemon uses
(the manifest cache, one Fill per blob, verification before publishing, the cache's admission and its
index), on a reactor of its own and with no HTTP tree.  The cache must not be in use by a daemon
meanwhile (the command holds the cache's lock).
"""

from __future__ import annotations

import os

from twisted.internet.defer import DeferredList

from ..cache.catalog import Catalog
from ..cache.eviction import Sweeper
from ..cache.files import cache_marker
from ..cache.index import CacheIndex
from ..cache.manifests import ManifestCache
from ..cache.staging import ManifestPublisher
from ..cache.store import Store
from ..config import Config
from ..events import EventHub
from ..fill.manager import FillManager
from ..fill.pulling import Emit, ModelPuller
from ..names import ModelName, PrivateNamespaces
from ..runner import Reactor, Runner, ThreadRunner
from ..security.modelrules import ModelRules
from ..upstream.hosts import build_upstreams


class CacheFiller:
    def __init__(self, config: Config, reactor: Reactor, runner: Runner | None = None) -> None:
        """*reactor* must run threads unless a *runner* is given."""
        self._reactor = reactor
        self._thread_runner = ThreadRunner(reactor) if runner is None else None
        self.runner: Runner = runner or self._thread_runner  # type: ignore[assignment]
        store = Store(config.cache.directory)
        store.create()
        events = EventHub()
        events.listen(ManifestPublisher(Catalog(store), self.runner, events))
        self.index = CacheIndex(os.path.join(store.work_dir, "index.sqlite3"), reactor)
        events.listen(self.index)
        private = PrivateNamespaces(config.private.namespaces)
        sweeper = Sweeper(
            store,
            Catalog(store),
            self.index,
            config.cache,
            self.runner,
            reactor,
            events,
            protected=set,
            private=private,
        )
        events.listen(sweeper)
        upstreams, self._pools = build_upstreams(
            config, reactor, cache_marker(store.work_dir), retried=events.upstream_error
        )
        manifests = ManifestCache(
            store, upstreams, self.runner, reactor, config.cache.manifest_ttl, events, private=private
        )
        self.fills = FillManager(
            store, upstreams.default, reactor, self.runner, config.upstream, events, admit=sweeper.admit
        )
        self._puller = ModelPuller(store, manifests, self.fills, upstreams, reactor, events)
        self._rules = ModelRules(config.security.allowed_models, config.security.blocked_models)

    def start(self) -> None:
        if self._thread_runner is not None:
            self._thread_runner.start()
        self.fills.startService()

    def refused(self, name: ModelName) -> str | None:
        """Why the mirror would not serve *name* (``security.*`` model rules): then it is not fetched."""
        return self._rules.check(name)

    async def pull(self, name: ModelName, emit: Emit) -> list[str]:
        """Cache *name* (``PullFailed`` when it cannot be); the hex digests of the blobs fetched."""
        return await self._puller.pull(name, emit)

    async def close(self) -> None:
        """Stop the downloads (what is on disk resumes next time), record the index, close connections."""
        await self.fills.stopService()
        await self.runner.run(self.index.flush, self.index.take_pending())
        await self.runner.run(self.index.close)
        await DeferredList([pool.closeCachedConnections() for pool in self._pools])
        if self._thread_runner is not None:
            self._thread_runner.stop()
