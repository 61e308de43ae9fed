"""The Fill manager: at most one Fill per blob across all requests, and a cap on how many run."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..cache.blobs import BlobSource, SharedTier
from ..cache.store import Store
from ..config import UpstreamConfig
from ..events import Events
from ..runner import Runner
from ..upstream.retry import RetryPolicy
from .coordinator import Admission, Fill

log = Logger(namespace="ollama_mirror.fills")  # pinned: log names are public


class FillManager(Service):
    def __init__(
        self,
        store: Store,
        source: BlobSource,
        clock: IReactorTime,
        runner: Runner,
        config: UpstreamConfig,
        events: Events | None = None,
        admit: Admission | None = None,
        retry: RetryPolicy | None = None,
        shared: SharedTier | None = None,
    ) -> None:
        """*source* is where downloads get bytes unless told otherwise (the default upstream); *admit*
        may refuse a download before it writes anything (the cache's room-making); *shared* is the
        cluster's copy, which downloads read before their source when it holds the blob."""
        self.store = store
        self.source = source
        self.clock = clock
        self.runner = runner
        self.config = config
        self.events = events or Events()
        self.gate = DeferredSemaphore(config.max_concurrent_downloads)
        self.fills: dict[str, Fill] = {}
        self.admit = admit
        self.retry = retry or RetryPolicy(clock, config.retry_attempts, config.retry_delay)
        self.shared = shared

    def active(self, hexdigest: str) -> Fill | None:
        """The running Fill of a blob, if any."""
        fill = self.fills.get(hexdigest)
        return fill if fill is not None and not fill.ended else None

    def fill(self, hexdigest: str, size: int, repository: str, source: BlobSource | None = None) -> Fill:
        """The blob's running Fill, or a new one (resuming any partial data on disk) from *source*
        (the upstream of the model asking; the default source when not given)."""
        fill = self.active(hexdigest)
        if fill is not None:
            return fill
        source = source or self.source
        if self.shared is not None:
            source = self.shared.source(source)
        fill = Fill(
            hexdigest=hexdigest,
            size=size,
            repository=repository,
            source=source,
            store=self.store,
            clock=self.clock,
            runner=self.runner,
            chunk_size=self.config.chunk_size,
            connections=self.config.connections_per_blob,
            retry=self.retry,
            idle_timeout=self.config.idle_timeout,
            gate=self.gate,
            events=self.events,
            admit=self.admit,
            max_connections=self.config.max_connections_per_blob,
        )
        self.fills[hexdigest] = fill
        fill.start().addBoth(self._ended, fill)
        return fill

    def _ended(self, result: object, fill: Fill) -> None:
        if self.fills.get(fill.hexdigest) is fill:
            del self.fills[fill.hexdigest]

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return DeferredList([fill.stop() for fill in list(self.fills.values())])
