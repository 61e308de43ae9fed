"""Prometheus metrics: ``ollama_mirror_*`` on an injected ``CollectorRegistry``, served by a small
synchronous resource.

Never the default ``REGISTRY`` (two mirrors in one process, as tests build them, would collide on
it) and never ``prometheus_client.twisted`` (it renders on the global reactor's thread pool and
imports the reactor at import time).  Every label has a fixed, small set of values: routes come
from :func:`ollama_mirror.web.routes.route_of`, never from raw paths, and no label carries a digest or a
model name.

Counters move with events (fills, upstream bytes and errors, evictions) and with request records;
gauges that describe state (running fills, cache size, disk space, probe results) are read when
Prometheus scrapes, from values kept up to date elsewhere, so a scrape never touches the disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from .. import __version__
from ..events import Events, FillView
from .accesslog import RequestRecord

PREFIX = "ollama_mirror_"
SOURCES = ("cache", "fill", "upstream")
KINDS = ("blob", "manifest")
CLUSTER_SOURCES = ("storage", "node")
UPSTREAM_ERROR_KINDS = ("timeout", "connection", "status", "idle", "protocol")
EVICTION_REASONS = ("retention", "size", "orphan", "admin")
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, math.inf)
FILL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, math.inf)


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else "other"


class MirrorMetrics(Events):
    """The mirror's metrics; an :class:`Events` listener and a request listener."""

    def __init__(self, registry: CollectorRegistry, clock: IReactorTime, routes: Iterable[str] = ()) -> None:
        """*routes*: every route label, so that each bounded series exists from the start.

        Long on purpose: it is the table of every metric the mirror exports (name, help, labels, unit),
        one declaration each, easier to read and to check against the README in one place.
        """
        self.registry = registry
        self._clock = clock
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

        def counter(name: str, doc: str, labels: tuple[str, ...] = (), unit: str = "") -> Counter:
            return Counter(PREFIX + name, doc, labels, unit=unit, registry=registry)

        def gauge(name: str, doc: str, unit: str = "") -> Gauge:
            return Gauge(PREFIX + name, doc, unit=unit, registry=registry)

        self.requests = counter(
            "http_requests", "HTTP requests answered, by route and status class.", ("route", "status_class")
        )
        self.requests_interrupted = counter(
            "http_requests_interrupted",
            "HTTP responses that did not end cleanly (client gone, or aborted by the mirror).",
            ("route",),
        )
        self.request_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from the start of a request to the end of its response.",
            ("route",),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.requests_in_flight = gauge("http_requests_in_flight", "HTTP requests being answered now.")
        self.served_bytes = counter(
            "served",
            "Model bytes (blobs and manifests) sent to clients, by where they came from: "
            "cache, fill (a download in progress) or upstream (a manifest fetched for the request).",
            ("source",),
            unit="bytes",
        )
        self.upstream_received = counter(
            "upstream_received", "Blob bytes received from upstream registries.", unit="bytes"
        )
        self.cluster_received = counter(
            "cluster_received",
            "Blob bytes this node received from its cluster, by source: storage (the shared copy) or "
            "node (another node's download in progress).",
            ("source",),
            unit="bytes",
        )
        self.cache_hits = counter("cache_hits", "Blob and manifest answers served from the cache.", ("kind",))
        self.cache_misses = counter(
            "cache_misses", "Blob and manifest answers that needed the upstream.", ("kind",)
        )
        self.fill_duration = Histogram(
            PREFIX + "fill_duration_seconds",
            "How long blob downloads took, by result (ok or failed).",
            ("result",),
            buckets=FILL_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = counter(
            "upstream_errors", "Failed upstream requests (each retry counted), by kind.", ("kind",)
        )
        self.digest_mismatches = counter(
            "digest_mismatches", "Downloads discarded because their bytes did not match their digest."
        )
        self.connections_refused = counter(
            "connections_refused",
            "Client connections refused over server.max_connections or server.max_connections_per_client.",
        )
        self.disk_full_errors = counter(
            "disk_full", "Writes into the cache (or downloads) that found its disk full."
        )
        self.evicted_models = counter(
            "evicted_models", "Models removed from the cache, by reason.", ("reason",)
        )
        self.evicted_blobs = counter("evicted_blobs", "Blobs removed from the cache, by reason.", ("reason",))
        self.evicted_bytes = counter(
            "evicted", "Bytes removed from the cache, by reason.", ("reason",), unit="bytes"
        )
        self.active_fills = gauge("active_fills", "Blob downloads running now.")
        self.queued_fills = gauge("queued_fills", "Blob downloads waiting for a download slot.")
        self.cache_size = gauge("cache_size", "Bytes of complete blobs in the cache.", unit="bytes")
        self.cached_models = gauge("cached_models", "Complete models in the cache.")
        self.disk_free = gauge("disk_free", "Free space on the cache's filesystem.", unit="bytes")
        self.upstream_up = gauge("upstream_up", "1 if the upstream answered its last probe, else 0.")
        self.backend_up = gauge("backend_up", "1 if the backend Ollama answered its last probe, else 0.")
        self.start_time = gauge("start_time_seconds", "When the mirror started, in Unix time.")
        Info(PREFIX + "build", "The running version.", registry=registry).info({"version": __version__})

        for route in routes:  # every bounded series exists from the start, so rate() sees its first move
            self.requests_interrupted.labels(route)
        for source in SOURCES:
            self.served_bytes.labels(source)
        for cluster_source in CLUSTER_SOURCES:
            self.cluster_received.labels(cluster_source)
        for kind in KINDS:
            self.cache_hits.labels(kind)
            self.cache_misses.labels(kind)
        for error_kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(error_kind)
        for reason in EVICTION_REASONS:
            self.evicted_models.labels(reason)
            self.evicted_blobs.labels(reason)
            self.evicted_bytes.labels(reason)

    def read_state(
        self,
        *,
        in_flight: Callable[[], float],
        active_fills: Callable[[], float],
        queued_fills: Callable[[], float],
        cache_size: Callable[[], float],
        cached_models: Callable[[], float],
        disk_free: Callable[[], float],
        upstream_up: Callable[[], float],
        backend_up: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time, from state others keep (NaN while unknown)."""
        self.requests_in_flight.set_function(in_flight)
        self.active_fills.set_function(active_fills)
        self.queued_fills.set_function(queued_fills)
        self.cache_size.set_function(cache_size)
        self.cached_models.set_function(cached_models)
        self.disk_free.set_function(disk_free)
        self.upstream_up.set_function(upstream_up)
        self.backend_up.set_function(backend_up)

    # --- requests ------------------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (labels() locks and validates on every call;
        a label set's child never changes, none is ever removed)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request_finished(self, record: RequestRecord) -> None:
        route = record.route
        self._child(self.requests, route, record.status_class).inc()
        self._child(self.request_duration, route).observe(record.duration)
        if not record.complete:
            self._child(self.requests_interrupted, route).inc()
        source, kind = record.source, record.kind
        if source is None or kind is None:
            return
        if record.sent:
            self._child(self.served_bytes, source).inc(record.sent)
        self._child(self.cache_hits if record.hit else self.cache_misses, kind).inc()

    # --- events --------------------------------------------------------------------------------

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        if fill.started_at is not None:
            elapsed = max(0.0, self._clock.seconds() - fill.started_at)
            self.fill_duration.labels("ok" if error is None else "failed").observe(elapsed)

    def upstream_bytes(self, count: int) -> None:
        self.upstream_received.inc(count)

    def cluster_bytes(self, source: str, count: int) -> None:
        self._child(self.cluster_received, _bounded(source, CLUSTER_SOURCES)).inc(count)

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(_bounded(kind, UPSTREAM_ERROR_KINDS)).inc()

    def digest_mismatch(self, fill: FillView) -> None:
        self.digest_mismatches.inc()

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        self.disk_full_errors.inc()

    def connection_refused(self) -> None:
        self.connections_refused.inc()

    def evicted(self, models: int, blobs: int, size: int, reason: str) -> None:
        reason = _bounded(reason, EVICTION_REASONS)
        self.evicted_models.labels(reason).inc(models)
        self.evicted_blobs.labels(reason).inc(blobs)
        self.evicted_bytes.labels(reason).inc(size)


class MetricsResource(Resource):
    """``GET /metrics``: the registry in the format the scraper asks for (Prometheus text by
    default, OpenMetrics if its ``Accept`` prefers it); synchronous and thread-free."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body: bytes = encoder(self._registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode())
        return body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)


def nan_unless(value: float | None) -> float:
    """A gauge reading: the value, or NaN while it is not known yet."""
    return math.nan if value is None else float(value)
