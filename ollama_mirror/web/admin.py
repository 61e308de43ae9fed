"""The operator's routes, ``/mirror``: stats, health, the cluster's nodes, emptying the cache, the page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ..names import InvalidName, ModelName
from .errors import add_ollama_error_handlers, json_body, ollama_error


class Report(Protocol):
    async def document(self) -> dict[str, Any]: ...


class HealthReport(Protocol):
    @property
    def http_status(self) -> int: ...

    def document(self) -> dict[str, Any]: ...


class Health(Protocol):
    async def report(self) -> HealthReport: ...


class Removal(Protocol):
    """Removals across a cluster (:class:`ollama_mirror.cluster.removal.ClusterRemoval`)."""

    def from_a_node(self, request: IRequest) -> bool: ...

    async def forget(self, name: ModelName) -> list[str] | None: ...


class Cleared(Protocol):
    removed_models: Any
    removed_blobs: int
    freed_bytes: int
    removed_partials: int
    cache_bytes: int


class Clearer(Protocol):
    async def clear(self) -> Cleared: ...


class AdminApi:
    """The ``/mirror`` routes (mounted under ``/mirror``, so paths here start after it)."""

    app = Klein()

    def __init__(
        self,
        stats: Report,
        health: Health,
        sweeper: Clearer,
        trusted: Callable[[IRequest], bool] = lambda request: True,
        cluster: Report | None = None,
        removal: Removal | None = None,
        ui: IResource | None = None,
    ) -> None:
        """*trusted* says whether a request may see details (paths, URLs): ``/mirror/health`` is open to
        load balancers, which need only the statuses.  *cluster* reports on a cluster's nodes;
        *removal* is how another node asks this one to forget a model; *ui* is the web page
        (``features.enable_web_ui``)."""
        self._ui = ui
        self._stats = stats
        self._cluster = cluster
        self._removal = removal
        self._health = health
        self._sweeper = sweeper
        self._trusted = trusted

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    @app.route("/ui", branch=True)
    @app.route("/ui/")
    def ui(self, request: IRequest) -> IResource | bytes:
        """The operator's web page (:mod:`ollama_mirror.web.ui`), at ``/mirror/ui`` and below."""
        if self._ui is None:
            return ollama_error(request, 404, "the web page is off here (features.enable_web_ui)")
        if not request.postpath:  # type: ignore[attr-defined]
            request.postpath = [b""]  # type: ignore[attr-defined]  # (/mirror/ui: the page's own "/")
        return self._ui

    @app.route("/stats", methods=["GET", "HEAD"])
    async def stats(self, request: IRequest) -> bytes:
        """What the mirror holds and saves, and what it is downloading."""
        return json_body(request, 200, await self._stats.document())

    @app.route("/cluster", methods=["GET", "HEAD"])
    async def cluster(self, request: IRequest) -> bytes:
        """The cluster's live nodes, what each is doing, and their totals."""
        if self._cluster is None:
            return ollama_error(
                request, 404, "this mirror is not part of a cluster (cluster.redis_url is not set)"
            )
        try:
            document = await self._cluster.document()
        except Exception as e:
            return ollama_error(request, 503, f"the cluster's Redis does not answer: {e}")
        return json_body(request, 200, document)

    @app.route("/cluster/models/<path:name>", methods=["DELETE"])
    async def forget(self, request: IRequest, name: str) -> bytes:
        """Another node removed a model from the cluster: remove it from this node's cache too."""
        if self._removal is None or not self._removal.from_a_node(request):
            return ollama_error(request, 403, "only the other nodes of this cluster may ask this")
        try:
            model = ModelName.parse(name)
        except InvalidName:
            return ollama_error(request, 400, "invalid model name")
        removed = await self._removal.forget(model)
        return json_body(request, 200, {"removed_blobs": None if removed is None else len(removed)})

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request: IRequest) -> bytes:
        """``ok``/``degraded`` answer 200, ``failing`` 503, so that load balancers can act on it."""
        report = await self._health.report()
        document = report.document()
        if not self._trusted(request):
            checks = document.get("checks", {})
            document = {
                "status": document.get("status"),
                "checks": {name: {"status": check.get("status")} for name, check in checks.items()},
            }
        return json_body(request, report.http_status, document)

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
