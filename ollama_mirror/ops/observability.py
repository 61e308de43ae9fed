"""The operator's side of the mirror: the ``/mirror`` routes, and the wiring of everything an
operator sees (metrics, stats, health, request and fill logs).

:class:`AdminApi` is mounted under ``/mirror`` by the root app.  :class:`Observability` is built
by the :class:`Mirror` from its parts; it listens to the mirror's events, wraps the root resource
to see every request, and brings the periodic jobs (cache survey, reachability probes, fill
progress lines) as services for the daemon's tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from klein import Klein
from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.web.iweb import IAgent, IRequest
from twisted.web.resource import IResource

from ..cache.eviction import Sweeper
from ..web.errors import add_ollama_error_handlers, json_body
from .accesslog import AccessLog, FillLog, RequestObserver
from .health import HealthCheck, ReachabilityProbe
from .metrics import MetricsResource, MirrorMetrics, nan_unless
from .stats import CacheSummary, CacheSurvey, StatsReport, TrafficTally

if TYPE_CHECKING:
    from ..daemon.mirror import Mirror
    from ..fill.coordinator import Fill

log = Logger(namespace="ollama_mirror.admin")  # pinned: log names are public


class AdminApi:
    """The ``/mirror`` routes (mounted under ``/mirror``, so paths here start after it)."""

    app = Klein()

    def __init__(self, stats: StatsReport, health: HealthCheck, sweeper: Sweeper) -> None:
        self._stats = stats
        self._health = health
        self._sweeper = sweeper

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/stats", methods=["GET", "HEAD"])
    async def stats(self, request: IRequest) -> bytes:
        """What the mirror holds and saves, and what it is downloading."""
        return json_body(request, 200, await self._stats.document())

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        """``ok``/``degraded`` answer 200, ``failing`` 503, so that load balancers can act on it."""
        report = await self._health.report()
        return json_body(request, report.http_status, report.document())

    @app.route("/cache", methods=["DELETE"])
    async def clear_cache(self, request: IRequest) -> bytes:
        """Empty the cache, except what is being downloaded or served right now; say what went."""
        report = await self._sweeper.clear()
        return json_body(
            request,
            200,
            {
                "removed_models": sorted(report.removed_models),
                "removed_blobs": report.removed_blobs,
                "freed_bytes": report.freed_bytes,
                "removed_partials": report.removed_partials,
                "kept_bytes": report.cache_bytes,
            },
        )

    add_ollama_error_handlers(app, "admin")


class Observability:
    """Metrics, stats, health and logs for one :class:`Mirror`.

    *agent* is the upstream HTTP client (the upstream probe goes the way downloads go);
    *backend_agent* the inference proxy's, when it is on.  *registry* is where the metrics live: a
    fresh ``CollectorRegistry`` unless an embedding application brings its own.
    """

    def __init__(
        self,
        mirror: Mirror,
        *,
        agent: IAgent,
        backend_agent: IAgent | None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        config, clock = mirror.config, mirror.reactor
        self._config = config
        self._fill_manager = mirror.fills
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = MirrorMetrics(self.registry)
        self.tally = TrafficTally()
        self.requests = RequestObserver(
            clock, [AccessLog(), self.metrics.request_finished, self.tally.request_finished]
        )
        self.fill_log = FillLog(clock, self._fills)
        for listener in (self.metrics, self.tally, self.fill_log):
            mirror.events.listen(listener)
        self.survey = CacheSurvey(mirror.store, mirror.catalog, mirror.runner, clock)
        self.upstream_probe = ReachabilityProbe(
            "upstream", config.upstream.url + "/v2/", agent, clock, via=mirror.marker
        )
        self.backend_probe: ReachabilityProbe | None = None
        if config.features.enable_api_proxy and backend_agent is not None:
            self.backend_probe = ReachabilityProbe(
                "backend",
                config.backend.url + "/api/version",
                backend_agent,
                clock,
                ok_statuses=range(200, 300),
            )
        self.health = HealthCheck(
            mirror.store,
            mirror.runner,
            clock,
            min_free_bytes=int(config.cache.min_free_gb * 10**9),
            upstream=self.upstream_probe,
            backend=self.backend_probe,
            backend_asked=lambda: mirror.proxy.asked,
        )
        self.stats = StatsReport(
            survey=self.survey,
            tally=self.tally,
            fills=self._fills,
            clock=clock,
            cache_directory=config.cache.directory,
            upstream_url=config.upstream.url,
        )
        self.admin = AdminApi(self.stats, self.health, mirror.sweeper)
        self.metrics.start_time.set(clock.seconds())
        self.metrics.read_state(
            in_flight=lambda: self.requests.in_flight,
            active_fills=lambda: sum(1 for f in self._fills() if f.started_at is not None and not f.ended),
            queued_fills=lambda: sum(1 for f in self._fills() if f.started_at is None and not f.ended),
            cache_size=lambda: self._surveyed(lambda summary: summary.total_size),
            cached_models=lambda: self._surveyed(lambda summary: len(summary.models)),
            disk_free=lambda: self._surveyed(lambda summary: summary.free_bytes),
            upstream_up=lambda: nan_unless(self.upstream_probe.state.up),
            backend_up=lambda: nan_unless(self.backend_probe.state.up if self.backend_probe else None),
        )

    def _surveyed(self, reading: Callable[[CacheSummary], float]) -> float:
        """A gauge from the latest cache survey (NaN before the first one)."""
        latest = self.survey.latest
        return nan_unless(None if latest is None else reading(latest))

    def _fills(self) -> list[Fill]:
        return list(self._fill_manager.fills.values())

    def observe(self, resource: IResource) -> IResource:
        """*resource* (the root) with every request timed, logged and counted."""
        return self.requests.wrap(resource)

    def admin_resource(self) -> IResource:
        return self.admin.resource()

    def metrics_resource(self) -> IResource:
        return MetricsResource(self.registry)

    def metrics_on_main_site(self) -> IResource | None:
        """``/metrics`` for the main listener: unless metrics are off or have a listener of their own."""
        enabled = self._config.features.enable_metrics and not self._config.server.metrics_listen
        return self.metrics_resource() if enabled else None

    def metrics_endpoints(self) -> list[str]:
        """Endpoint strings of the metrics-only listener (``server.metrics_listen``), if any."""
        if not self._config.features.enable_metrics:
            if self._config.server.metrics_listen:
                log.warn("server.metrics_listen is set but features.enable_metrics is off: not listening")
            return []
        return list(self._config.server.metrics_listen)

    def services(self) -> list[IService]:
        """The periodic jobs, each a TimerService on the mirror's clock whose call never raises."""
        services: list[IService] = [
            self.survey.service(),
            self.upstream_probe.service(),
            self.fill_log.service(),
        ]
        if self.backend_probe is not None:
            services.append(self.backend_probe.service())
        return services
