"""Everything an operator sees, put together: metrics, stats, health, request and fill logs.

:class:`Observability` is built by the daemon from the parts it reads; it listens to the mirror's
events, wraps the root resource to see every request, and brings the periodic jobs (cache survey,
reachability probes, fill progress lines) as services for the daemon's tree.  The ``/mirror`` routes
that show it are the web layer's (:mod:`ollama_mirror.web.admin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource

from .. import __version__
from ..cache.catalog import Catalog
from ..cache.store import Store
from ..config import Config
from ..events import EventHub, FillView
from ..runner import Runner
from .accesslog import AccessLog, FillLog, RequestObserver
from .diskfull import DiskFullWatch
from .health import HealthCheck, Probe, ReachabilityProbe
from .metrics import MetricsResource, MirrorMetrics, nan_unless
from .stats import (
    CacheSummary,
    CacheSurvey,
    ClusterReport,
    StatsReport,
    TrafficTally,
    fill_progress,
    iso_time,
)

log = Logger(namespace="ollama_mirror.admin")  # pinned: log names are public


class Observability:
    """Metrics, stats, health and logs for one mirror, from the parts it reads.

    *agent* is the upstream HTTP client (the upstream probe goes the way downloads go);
    *backend_agent* the inference proxy's, when it is on; *backend_asked* says whether a client asked
    for inference (then a missing backend degrades health).  *fills* lists the downloads running now;
    *marker* is the mirror's ``Via`` value (a probe that comes back to this mirror is a loop); *route_of*
    and *routes* name requests' routes for logs and metrics.  *registry* is where the metrics live: a
    fresh ``CollectorRegistry`` unless an embedding application brings its own.  *dependencies* are
    the cluster's services, checked for health; *cluster* reports on the nodes (stats and metrics).
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        *,
        store: Store,
        catalog: Catalog,
        runner: Runner,
        events: EventHub,
        fills: Callable[[], Iterable[FillView]],
        marker: str,
        route_of: Callable[[bytes], str],
        routes: Iterable[str],
        agent: IAgent,
        backend_agent: IAgent | None,
        backend_asked: Callable[[], bool],
        registry: CollectorRegistry | None = None,
        dependencies: Sequence[Probe] = (),
        cluster: ClusterReport | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._fills = lambda: list(fills())
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = MirrorMetrics(self.registry, clock, routes)
        self.tally = TrafficTally()
        self.requests = RequestObserver(
            clock, route_of, [AccessLog(), self.metrics.request_finished, self.tally.request_finished]
        )
        self.fill_log = FillLog(clock, self._fills)
        min_free = int(config.cache.min_free_gb * 10**9)
        self.disk_full = DiskFullWatch(clock, min_free)
        for listener in (self.metrics, self.tally, self.fill_log, self.disk_full):
            events.listen(listener)
        self.survey = CacheSurvey(store, catalog, runner, clock)
        self.upstream_probe = ReachabilityProbe(
            "upstream", config.upstream.url + "/v2/", agent, clock, via=marker
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
            store,
            runner,
            clock,
            min_free_bytes=min_free,
            upstream=self.upstream_probe,
            backend=self.backend_probe,
            backend_asked=backend_asked,
            disk_full=self.disk_full,
            dependencies=dependencies,
        )
        self.stats = StatsReport(
            survey=self.survey,
            tally=self.tally,
            fills=self._fills,
            clock=clock,
            cache_directory=config.cache.directory,
            upstream_url=config.upstream.url,
            cluster=cluster,
        )
        self.cluster = cluster
        if cluster is not None:
            self.registry.register(cluster.collector())
        self.metrics.start_time.set(clock.seconds())
        self._read_state()

    def _read_state(self) -> None:
        """The gauges read at each scrape."""
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

    def observe(self, resource: IResource) -> IResource:
        """*resource* (the root) with every request timed, logged and counted."""
        return self.requests.wrap(resource)

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

    def node_report(self) -> dict[str, Any]:
        """This node in a few numbers, for the other nodes of a cluster (its heartbeat)."""
        latest = self.survey.latest
        now = self._clock.seconds()
        return {
            "version": __version__,
            "started_at": iso_time(self.stats.started_at),
            "fills": [fill_progress(fill, now) for fill in self._fills() if not fill.ended],
            "traffic": self.tally.document(),
            "cache": {
                "size": latest.total_size if latest else None,
                "models": len(latest.models) if latest else None,
                "disk_free": latest.free_bytes if latest else None,
            },
        }
