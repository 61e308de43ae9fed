"""Tags fetched before their blobs wait in ``.mirror/staged/``; this publishes them as their blobs arrive.

The cache must always be a models directory Ollama can run every model of, yet registry clients are
served a manifest before its blobs are cached (they ask for it first).  So a manifest is written into
``manifests/`` only once all its blobs are in ``blobs/`` (:meth:`Store.write_manifest`); until then it is
staged, and served from there.  Each blob stored is a chance that a staged tag is complete: the listener
here looks, in a worker thread, one look at a time.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..events import Events, FillView
from ..names import ModelName
from ..runner import Runner
from .catalog import Catalog
from .space import is_no_space, no_space

log = Logger(namespace="ollama_mirror.cache")  # pinned: log names are public


class ManifestPublisher(Events):
    def __init__(self, catalog: Catalog, runner: Runner, events: Events | None = None) -> None:
        self._catalog = catalog
        self._runner = runner
        self._events = events or Events()
        self._lock = DeferredLock()

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        if error is None:
            self.publish(fill.hexdigest)

    def publish(self, hexdigest: str | None = None) -> Deferred[list[ModelName]]:
        """Publish the staged tags that are complete now (those that list *hexdigest*, when given)."""
        d: Deferred[list[ModelName]] = self._lock.run(self._runner.run, self._catalog.promote, hexdigest)
        return d.addCallbacks(self._announce, self._failed, errbackArgs=([],))

    def _announce(self, published: list[ModelName]) -> list[ModelName]:
        for name in published:
            self._events.manifest_published(name)
        return published

    def _failed(self, failure: Failure, default: list[ModelName]) -> list[ModelName]:
        error = failure.value
        if error is not None and is_no_space(error):
            full = no_space("a manifest", self._catalog.store.manifests_dir)
            self._events.disk_full(full.message, full.path, full.free)
        else:
            log.failure("publishing staged manifests failed", failure)
        return default
