"""The Ollama REST API on the mirror (``OLLAMA_HOST=http://mirror:11434``).

``/api/pull`` caches a model on the mirror through the same Fills as the registry routes and
reports their real progress as Ollama does; ``/api/tags``, ``/api/show`` and ``/api/delete`` work
on the cache; inference routes go to the backend Ollama through :class:`InferenceProxy`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request

from .. import __version__
from ..cache.catalog import CachedModel, Catalog
from ..cache.manifests import ManifestCache
from ..cache.modelinfo import format_parameters, gguf_model_info, modelfile
from ..cache.store import Store
from ..events import Events
from ..fill.manager import FillManager
from ..fill.pulling import ModelPuller, PullFailed
from ..names import InvalidName, ModelName
from ..runner import Runner
from ..upstream.hosts import Upstreams
from .errors import add_ollama_error_handlers, json_body, ollama_error
from .proxy import InferenceProxy

log = Logger(namespace="ollama_mirror.ollama_api")  # pinned: log names are public

MAX_JSON_BODY = 1 << 20
TEXT_LAYERS = {
    "application/vnd.ollama.image.template": "template",
    "application/vnd.ollama.image.system": "system",
    "application/vnd.ollama.image.license": "license",
    "application/vnd.ollama.image.params": "params",
}
PROXIED = (
    "generate",
    "chat",
    "embed",
    "embeddings",
    "ps",
    "create",
    "copy",
    "push",
)


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


def _details(config: dict[str, Any]) -> dict[str, Any]:
    families = config.get("model_families")
    return {
        "parent_model": "",
        "format": config.get("model_format", ""),
        "family": config.get("model_family", ""),
        "families": families if isinstance(families, list) else None,
        "parameter_size": config.get("model_type", ""),
        "quantization_level": config.get("file_type", ""),
    }


class OllamaApi:
    """The ``/api`` routes (mounted under ``/api``, so paths here start after it)."""

    app = Klein()

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        manifests: ManifestCache,
        fills: FillManager,
        upstreams: Upstreams,
        runner: Runner,
        clock: Any,
        proxy: InferenceProxy,
        events: Events | None = None,
        delete_model: Callable[[ModelName], Awaitable[list[str] | None]] | None = None,
    ) -> None:
        self._events = events or Events()
        self._delete_model = delete_model or self._delete_unguarded
        self._store = store
        self._catalog = catalog
        self._manifests = manifests
        self._fills = fills
        self._upstreams = upstreams
        self._runner = runner
        self._clock = clock
        self._proxy = proxy
        self.puller = ModelPuller(store, manifests, fills, upstreams, clock, self._events)

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
        if self._upstreams.for_model_host(name.host) is None:
            served = ", ".join(u.host for u in self._upstreams)
            raise ApiError(400, f"no upstream is configured for {name.host} (this mirror serves {served})")
        if body.get("stream", True) is False:
            try:
                await self.puller.pull(name, lambda _: None)
            except PullFailed as e:
                return ollama_error(request, 500, str(e))
            return json_body(request, 200, {"status": "success"})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")

        def emit(line: dict[str, Any]) -> None:
            request.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

        try:
            await self.puller.pull(name, emit)
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
                    "details": _details(self._catalog.config(model)),
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
        document = await self._runner.run(self._describe, model, bool(body.get("verbose")))
        return json_body(request, 200, document)

    def _describe(self, model: CachedModel, verbose: bool) -> dict[str, Any]:
        texts: dict[str, str] = {}
        model_path = ""
        info: dict[str, Any] = {}
        for layer in model.layers():
            media_type, digest = layer.get("mediaType"), str(layer.get("digest", ""))
            hexdigest = digest.removeprefix("sha256:")
            if media_type == "application/vnd.ollama.image.model" and not model_path:
                model_path = self._store.blob_path(hexdigest)
                info = gguf_model_info(model_path, verbose)
            elif media_type in TEXT_LAYERS:
                key = TEXT_LAYERS[media_type]
                text = self._catalog.read_blob_text(hexdigest)
                texts[key] = texts[key] + "\n" + text if key in texts else text
        parameters = format_parameters(texts.get("params", ""))
        document: dict[str, Any] = {
            "license": texts.get("license", ""),
            "modelfile": modelfile(model.name.display(), model_path, texts, parameters),
            "parameters": parameters,
            "template": texts.get("template", ""),
            "details": _details(self._catalog.config(model)),
            "model_info": info,
            "capabilities": ["completion"],
            "modified_at": model.modified_at,
        }
        if "system" in texts:
            document["system"] = texts["system"]
        return document

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

    async def _delete_unguarded(self, name: ModelName) -> list[str] | None:
        """Without a sweeper (an embedder's minimal wiring): keep only what is being downloaded."""
        removed: list[str] | None = await self._runner.run(
            self._catalog.delete, name, frozenset(self._fills.fills)
        )
        return removed

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
