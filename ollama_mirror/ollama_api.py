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
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request

from . import __version__
from .catalog import CachedModel, Catalog
from .errors import add_ollama_error_handlers, json_body, ollama_error
from .events import Events
from .fill import FillFailed
from .fills import FillManager
from .manifests import ManifestCache, ManifestUnknown
from .modelinfo import format_parameters, gguf_model_info, modelfile
from .names import InvalidName, ModelName
from .proxy import InferenceProxy
from .runner import Runner
from .store import Store, manifest_blobs
from .upstream import Upstream, UpstreamError
from .upstreams import Upstreams

log = Logger()

MAX_JSON_BODY = 1 << 20
PROGRESS_INTERVAL = 0.1  # Ollama reports about every 60 ms; clients redraw at this pace
HEARTBEAT = 1.0  # a line at least this often, even when nothing moved
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


class PullFailed(Exception):
    """Ends a pull; the message is what ``ollama pull`` prints."""


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
        upstream = self._upstreams.for_model_host(name.host)
        if upstream is None:
            served = ", ".join(u.host for u in self._upstreams)
            raise ApiError(400, f"no upstream is configured for {name.host} (this mirror serves {served})")
        if body.get("stream", True) is False:
            try:
                await self._pull(name, upstream, lambda _: None)
            except PullFailed as e:
                return ollama_error(request, 500, str(e))
            return json_body(request, 200, {"status": "success"})
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")

        def emit(line: dict[str, Any]) -> None:
            request.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

        try:
            await self._pull(name, upstream, emit)
        except PullFailed as e:
            emit({"error": str(e)})
        return None

    async def _pull(
        self, name: ModelName, upstream: Upstream, emit: Callable[[dict[str, Any]], None]
    ) -> None:
        """Cache *name* on the mirror, reporting as Ollama does.  A client hanging up cancels only
        this report: the downloads it started go on."""
        emit({"status": "pulling manifest"})
        try:
            manifest = await self._manifests.by_tag(name)
        except ManifestUnknown:
            raise PullFailed("pull model manifest: file does not exist") from None
        except UpstreamError as e:
            raise PullFailed(f"pull model manifest: {e.message}") from None
        self._events.model_used(name, True)
        blobs = manifest_blobs(manifest.data)
        if not blobs:
            raise PullFailed("pull model manifest: the upstream sent an unreadable manifest")
        ordered = [*blobs[1:], blobs[0]]  # layers first, then the config, as Ollama pulls them
        for digest, size in ordered:  # start every download now; the fill gate spaces them out
            hexdigest = digest.removeprefix("sha256:")
            if self._store.blob_size(hexdigest) is None:
                self._fills.fill(hexdigest, size, name.repository, upstream)
        for digest, size in ordered:
            await self._report_blob(name, upstream, digest, size, emit)
        emit({"status": "verifying sha256 digest"})
        emit({"status": "writing manifest"})
        emit({"status": "success"})

    async def _report_blob(
        self,
        name: ModelName,
        upstream: Upstream,
        digest: str,
        size: int,
        emit: Callable[[dict[str, Any]], None],
    ) -> None:
        hexdigest = digest.removeprefix("sha256:")
        status = f"pulling {hexdigest[:12]}"

        def line(completed: int) -> dict[str, Any]:
            report: dict[str, Any] = {"status": status, "digest": digest}
            if size:
                report["total"] = size
            if completed:
                report["completed"] = completed
            return report

        if self._store.blob_size(hexdigest) is not None:
            emit(line(size))
            return
        fill = self._fills.active(hexdigest) or self._fills.fill(hexdigest, size, name.repository, upstream)
        last, last_time = -1, self._clock.seconds()
        while not fill.ended:
            completed = fill.completed_bytes()
            if completed != last or self._clock.seconds() - last_time >= HEARTBEAT:
                emit(line(completed))
                last, last_time = completed, self._clock.seconds()
            await deferLater(self._clock, PROGRESS_INTERVAL)
        if fill.failure is not None:
            reason = fill.failure.getErrorMessage() if fill.failure.check(FillFailed) else "download failed"
            raise PullFailed(reason)
        emit(line(size))

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
