"""What happens in the mirror, told to whoever listens (metrics, stats, logs).

Parts that do the work (fills, routes, the sweeper) call an :class:`Events`; listeners subclass it
and override what they care about.  Listeners are called on the reactor thread and must be quick;
an exception in one is logged and never reaches the caller.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from .names import ModelName

log = Logger()


class FillView(Protocol):
    """What listeners (logs, metrics, stats, admission) may read of a running download."""

    digest: str
    hexdigest: str
    size: int
    repository: str
    started_at: float | None
    resumed_bytes: int
    received_bytes: int
    allocated_bytes: int  # already taken on disk by its partial file (admission must not count them again)

    @property
    def ended(self) -> bool: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def following(self) -> bool:
        """Another worker process holds this download."""

    @property
    def followed(self) -> bool:
        """This download followed another worker process's at some point."""

    @property
    def origin(self) -> str:
        """Where its bytes come from: ``upstream``, or in a cluster ``the shared storage`` or
        ``node <url>``."""

    def completed_bytes(self) -> int: ...


class Events:
    """The events, as no-op methods; a listener overrides the ones it wants."""

    def fill_started(self, fill: FillView) -> None:
        """A download began (or resumed: ``fill.resumed_bytes`` were already on disk)."""

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        """A download ended: published and verified when *error* is ``None``."""

    def upstream_bytes(self, count: int) -> None:
        """Body bytes received from an upstream for a blob (not from a cluster's shared storage or nodes)."""

    def cluster_bytes(self, source: str, count: int) -> None:
        """Body bytes received for a blob from a cluster's ``storage`` (shared) or another ``node``."""

    def upstream_error(self, kind: str) -> None:
        """An upstream request failed; *kind* is one of ``timeout``, ``connection``, ``status``,
        ``idle``, ``protocol``."""

    def digest_mismatch(self, fill: FillView) -> None:
        """A download's bytes did not hash to its digest (it was discarded)."""

    def manifest_published(self, name: ModelName) -> None:
        """A tag's manifest entered ``manifests/``: all its blobs are held here."""

    def connection_refused(self) -> None:
        """A client connection was refused: over ``server.max_connections(_per_client)``."""

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        """The cache's disk had no room: a write at *path* failed, or a download was refused, for the
        reason *message* says (*free* bytes left there, when known)."""

    def blob_served(self, source: str, count: int, complete: bool) -> None:
        """A blob response ended; *source* is ``cache`` or ``fill``, *count* the body bytes sent."""

    def manifest_served(self, source: str) -> None:
        """A manifest was answered from ``cache``, ``upstream`` or ``stale`` (cache, upstream failing)."""

    def evicted(self, models: int, blobs: int, size: int, reason: str) -> None:
        """Cache entries were removed (``retention``, ``size``, ``orphan``, ``admin``)."""

    def model_used(self, name: ModelName, pulled: bool) -> None:
        """A model's manifest was served (*pulled*: by a registry GET or ``/api/pull``)."""

    def blob_used(self, hexdigest: str) -> None:
        """A blob response started."""

    def manifest_revalidated(self, name: ModelName) -> None:
        """A cached tag was checked against its upstream."""


class EventHub(Events):
    """Fans every event out to the registered listeners."""

    def __init__(self) -> None:
        self._listeners: list[Events] = []

    def listen(self, listener: Events) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(*args)
            except Exception:  # a listener's bug must not break a download
                log.failure("event listener {listener} failed on {event}", listener=listener, event=event)

    def fill_started(self, fill: FillView) -> None:
        self._emit("fill_started", fill)

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        self._emit("fill_ended", fill, error)

    def upstream_bytes(self, count: int) -> None:
        self._emit("upstream_bytes", count)

    def cluster_bytes(self, source: str, count: int) -> None:
        self._emit("cluster_bytes", source, count)

    def upstream_error(self, kind: str) -> None:
        self._emit("upstream_error", kind)

    def digest_mismatch(self, fill: FillView) -> None:
        self._emit("digest_mismatch", fill)

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        self._emit("disk_full", message, path, free)

    def connection_refused(self) -> None:
        self._emit("connection_refused")

    def manifest_published(self, name: ModelName) -> None:
        self._emit("manifest_published", name)

    def blob_served(self, source: str, count: int, complete: bool) -> None:
        self._emit("blob_served", source, count, complete)

    def manifest_served(self, source: str) -> None:
        self._emit("manifest_served", source)

    def evicted(self, models: int, blobs: int, size: int, reason: str) -> None:
        self._emit("evicted", models, blobs, size, reason)

    def model_used(self, name: ModelName, pulled: bool) -> None:
        self._emit("model_used", name, pulled)

    def blob_used(self, hexdigest: str) -> None:
        self._emit("blob_used", hexdigest)

    def manifest_revalidated(self, name: ModelName) -> None:
        self._emit("manifest_revalidated", name)
