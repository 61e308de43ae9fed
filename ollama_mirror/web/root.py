"""The root of the HTTP tree: liveness, version, and the branches for each API.

Each API is a Klein app of its own (registry ``/v2``, Ollama ``/api``, operator ``/mirror``); this
class mounts them and owns the errors nothing else catches, so that every answer is JSON.
"""

from __future__ import annotations

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import NotFound

from .errors import add_ollama_error_handlers

log = Logger(namespace="ollama_mirror.web")  # pinned: log names are public

ROOT_ANSWER = b"Ollama is running"


class RootApi:
    """``/``, ``/api/version`` and the mount points of the other APIs."""

    app = Klein()

    def __init__(
        self,
        *,
        registry: IResource,
        api: IResource,
        openai: IResource,
        admin: IResource | None = None,
        metrics: IResource | None = None,
        push: IResource | None = None,
    ) -> None:
        """*push*: the registry's write routes (``ollama push`` to private namespaces), if any."""
        self._registry = registry
        self._push = push
        self._api = api
        self._openai = openai
        self._admin = admin
        self._metrics = metrics  # None: metrics are off here (disabled, or on a listener of their own)

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        """Exactly Ollama's answer (clients and health checks compare the text); the mirror's own
        details are in ``/mirror/stats``, behind the API key when one is set."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", str(len(ROOT_ANSWER)).encode())
        return ROOT_ANSWER

    @app.route("/v2/", branch=True)
    def registry(self, request: IRequest) -> IResource:
        if self._push is not None and request.method not in (b"GET", b"HEAD"):
            return self._push
        return self._registry

    @app.route("/api/", branch=True)
    def api(self, request: IRequest) -> IResource:
        return self._api

    @app.route("/v1/", branch=True)
    def openai(self, request: IRequest) -> IResource:
        """OpenAI-compatible routes, all forwarded to the backend Ollama."""
        return self._openai

    @app.route("/mirror/", branch=True)
    def admin(self, request: IRequest) -> IResource:
        """The operator's routes: ``/mirror/stats``, ``/mirror/health``."""
        if self._admin is None:
            raise NotFound()
        return self._admin

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> IResource:
        """Prometheus metrics (``features.enable_metrics``), unless they have a listener of their own."""
        if self._metrics is None:
            raise NotFound()
        return self._metrics

    add_ollama_error_handlers(app, "web")

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]
