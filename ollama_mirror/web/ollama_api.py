"""The Ollama REST API on the mirror (``OLLAMA_HOST=http://mirror:11434``).

``/api/pull`` caches a model on the mirror through the same Fills as the registry routes and
reports their real progress as Ollama does; ``/api/tags``, ``/api/show`` and ``/api/delete`` work
on the cache; inference routes go to the backend Ollama through :class:`InferenceProxy`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request

from .. import __version__
from ..cache.catalog import Catalog
from ..cache.modelinfo import describe, details
from ..fill.errors import PullFailed
from ..names import InvalidName, ModelName
from ..runner import Runner
from ..upstream.client import ollama_agent
from ..upstream.hosts import Upstreams
from .errors import add_ollama_error_handlers, json_body, ollama_error
from .proxy import InferenceProxy
from .routes import PROXIED

log = Logger(namespace="ollama_mirror.ollama_api")  # pinned: log names are public

MAX_JSON_BODY = 1 << 20


class ApiError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type (as Ollama reads it)."""
    data = request.content.read(MAX_JSON_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_JSON_BODY:
        raise ApiError(400, f"request body is larger than {MAX_JSON_BODY} bytes")
    try:
        document = json.loads(data or b"{}")
    except ValueError as e:
        raise ApiError(400, f"invalid JSON in request body: {e}") from None
    except RecursionError:  # a body nested thousands of levels deep
        raise ApiError(400, "invalid JSON in request body: nested too deeply") from None
    if not isinstance(document, dict):
        raise ApiError(400, "request body must be a JSON object")
    return document


def _model_field(body: dict[str, Any]) -> str:
    value = body.get("model") or body.get("name")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "model is required")
    return value


Emit = Callable[[dict[str, Any]], None]


class Puller(Protocol):
    """Caches one model, reporting as Ollama's ``/api/pull`` does (the fill package's ``ModelPuller``)."""

    async def pull(self, name: ModelName, emit: Emit, user_agent: str | None = None) -> list[str]: ...


class OllamaApi:
    """The ``/api`` routes (mounted under ``/api``, so paths here start after it)."""

    app = Klein()

    def __init__(
        self,
        catalog: Catalog,
        puller: Puller,
        upstreams: Upstreams,
        runner: Runner,
        proxy: InferenceProxy,
        delete_model: Callable[[ModelName], Awaitable[list[str] | None]],
    ) -> None:
        """*puller* caches a whole model (``/api/pull``); *delete_model* removes one from the cache,
        keeping blobs in use (``/api/delete``)."""
        self._catalog = catalog
        self.puller = puller
        self._upstreams = upstreams
        self._runner = runner
        self._proxy = proxy
        self._delete_model = delete_model

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    def _name(self, text: str) -> ModelName:
        try:
            return ModelName.parse(text)
        except InvalidName:
            raise ApiError(400, "invalid model name") from None

    @app.route("/version", methods=["GET", "HEAD"])
    def version(self, request: Request) -> bytes:
        return json_body(request, 200, {"version": __version__})

    # --- pull ----------------------------------------------------------------------------------

    @app.route("/pull", methods=["POST"])
    async def pull(self, request: Request) -> bytes | None:
        body = read_json(request)
        name = self._name(_model_field(body))
        agent = ollama_agent((request.getHeader(b"user-agent") or b"").decode("latin-1"))
        if self._upstreams.for_model_host(name.host) is None:
            served = ", ".join(u.host for u in self._upstreams)
            raise ApiError(400, f"no upstream is configured for {name.host} (this mirror serves {served})")
        if body.get("stream", True) is False:
            try:
                await self.puller.pull(name, lambda _: None, agent)
            except PullFailed as e:
                return ollama_error(request, e.status, str(e))
            return json_body(request, 200, {"status": "success"})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")

        def emit(line: dict[str, Any]) -> None:
            request.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

        try:
            await self.puller.pull(name, emit, agent)
        except PullFailed as e:
            emit({"error": str(e)})
        return None

    # --- the cache -----------------------------------------------------------------------------

    @app.route("/tags", methods=["GET", "HEAD"])
    async def tags(self, request: Request) -> bytes:
        entries = await self._runner.run(self._list_models)
        return json_body(request, 200, {"models": entries})

    def _list_models(self) -> list[dict[str, Any]]:
        entries = []
        for model in self._catalog.models():
            display = model.name.display()
            entries.append(
                {
                    "name": display,
                    "model": display,
                    "modified_at": model.modified_at,
                    "size": model.size,
                    "digest": model.digest,
                    "details": details(self._catalog.config(model)),
                }
            )
        return entries

    @app.route("/show", methods=["POST"])
    async def show(self, request: Request) -> bytes:
        body = read_json(request)
        text = _model_field(body)
        name = self._name(text)
        model = await self._runner.run(self._catalog.find, name)
        if model is None:
            raise ApiError(404, f"model '{text}' not found")
        document = await self._runner.run(describe, self._catalog, model, bool(body.get("verbose")))
        return json_body(request, 200, document)

    @app.route("/delete", methods=["DELETE"])
    async def delete(self, request: Request) -> bytes:
        text = _model_field(read_json(request))
        name = self._name(text)
        removed = await self._delete_model(name)
        if removed is None:
            raise ApiError(404, f"model '{text}' not found")
        log.info("deleted {name} and {n} blobs no other model uses", name=str(name), n=len(removed))
        request.setResponseCode(200)
        request.defaultContentType = None  # type: ignore[attr-defined]  # Ollama: an empty 200, no type
        request.setHeader(b"content-length", b"0")
        return b""

    # --- inference, forwarded ------------------------------------------------------------------

    @app.route("/blobs/<path:rest>", methods=["GET", "HEAD", "POST", "PUT"])
    def blobs(self, request: Request, rest: str) -> IResource:
        return self._proxy.resource()

    @app.route(f"/<any({','.join(PROXIED)}):route>", methods=["GET", "POST", "DELETE", "HEAD"])
    def inference(self, request: Request, route: str) -> IResource:
        return self._proxy.resource()

    # --- errors --------------------------------------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        e: ApiError = failure.value  # type: ignore[assignment]
        return ollama_error(request, e.code, e.message)

    add_ollama_error_handlers(app, "api")
