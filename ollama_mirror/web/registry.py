"""The registry API (``/v2``) that ``ollama pull --insecure MIRROR/library/MODEL`` talks to.

Manifests come from :class:`ManifestCache`; blobs are streamed by :class:`BlobProducer` from the
blob store or from the blob's download in progress (see :mod:`ollama_mirror.cache.blobs`).  The blob
GET without ``Range`` answers 200 with a ``Location`` pointing at itself: the Go client insists on a
redirect-like answer before it sends its parallel ranged GETs, and hangs up on this one at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from ..cache.blobs import BlobFetches, BlobStore, GrowingBlob
from ..cache.manifests import Manifest, ManifestCache, ManifestUnknown
from ..cache.space import NoSpace
from ..events import Events
from ..fill.errors import FillFailed
from ..names import (
    InvalidName,
    ModelName,
    PrivateNamespaces,
    is_digest,
    is_model,
    is_namespace,
    is_tag,
    parse_digest,
)
from ..private.source import NoUpstream
from ..registryerror import RegistryError
from ..upstream.client import AsClient, Upstream, ollama_agent
from ..upstream.errors import UpstreamError
from ..upstream.hosts import Upstreams
from .blobstream import BlobProducer, StreamingResource
from .errors import json_body, registry_error, routing_answer
from .ranges import InvalidRange, UnsatisfiableRange, parse_range

log = Logger(namespace="ollama_mirror.registry")  # pinned: log names are public

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
FIRST_BYTES_WAIT = 10.0


def _header(request: IRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else None


class RegistryApi:
    """The ``/v2`` routes (mounted under ``/v2`` by the root app, so paths here start after it)."""

    app = Klein()

    def __init__(
        self,
        blobs: BlobStore,
        manifests: ManifestCache,
        fetches: BlobFetches,
        upstreams: Upstreams,
        clock: IReactorTime,
        events: Events | None = None,
        blob_location: Callable[[str], str] = lambda path: path,
        redirect: Callable[[str], Awaitable[str | None]] | None = None,
        private: PrivateNamespaces | None = None,
    ) -> None:
        """*blob_location* makes the ``Location`` of a blob's discovery answer from its path (the
        access control signs it when the registry needs keys); *redirect* gives a URL elsewhere that
        serves a blob, when there is one (``cluster.redirect_to_storage``), for a GET to answer 307;
        *private* names the namespaces pushed here, whose blobs are never fetched from an upstream."""
        self._redirect = redirect
        self._private = private if private is not None else PrivateNamespaces()
        self._clock = clock
        self._events = events or Events()
        self.reading: Counter[str] = Counter()  # hex digest -> responses streaming it now
        self._blobs = blobs
        self._manifests = manifests
        self._fetches = fetches
        self._upstreams = upstreams
        self._blob_location = blob_location

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    def _upstream(self, request: IRequest) -> Upstream:
        """The upstream this request means, by its ``Host`` (virtual hosts, transparent mode)."""
        return self._upstreams.for_request_host(_header(request, b"host"))

    def _name(self, request: IRequest, namespace: str, model: str, tag: str = "latest") -> ModelName:
        if not is_namespace(namespace) or not is_model(model):
            raise RegistryError(400, "NAME_INVALID", f"invalid repository name {namespace}/{model}")
        return ModelName(self._upstream(request).host, namespace, model, tag)

    @app.route("/", methods=["GET", "HEAD"])
    def version_check(self, request: IRequest) -> bytes:
        request.setHeader(*API_VERSION)
        return json_body(request, 200, {})

    # --- manifests -----------------------------------------------------------------------------

    @app.route("/<namespace>/<model>/manifests/<reference>", methods=["GET", "HEAD"])
    async def manifest(self, request: IRequest, namespace: str, model: str, reference: str) -> bytes:
        accept = [t.strip() for t in (_header(request, b"accept") or "").split(",") if t.strip()]
        user_agent = _header(request, b"user-agent")
        found: Manifest
        if is_digest(reference):
            name = self._name(request, namespace, model)
            found = await self._manifests.by_digest(name, parse_digest(reference), accept, user_agent)
        elif is_tag(reference):
            name = self._name(request, namespace, model, reference)
            found = await self._manifests.by_tag(name, accept, user_agent)
            self._events.model_used(name, request.method == b"GET")
        else:
            raise RegistryError(400, "TAG_INVALID", f"invalid tag or digest {reference!r}")
        return self._manifest_answer(request, found)

    def _manifest_answer(self, request: IRequest, found: Manifest) -> bytes:
        request.setHeader(*API_VERSION)
        request.setHeader(b"content-type", found.media_type.encode())
        request.setHeader(b"docker-content-digest", found.digest.encode())
        request.setHeader(b"etag", f'"{found.digest}"'.encode())
        request.setHeader(b"content-length", str(len(found.data)).encode())
        request.setHeader(b"x-mirror-cache", found.source.encode())
        self._events.manifest_served(found.source)
        return found.data

    def fresh_manifest(self, request: IRequest) -> bytes | None:
        """The answer to a GET or HEAD of a tag whose cached manifest is fresh, given at once, without
        the routers or a coroutine: the same status, headers, body and events as :meth:`manifest`.
        ``None``: anything else (the routes answer it, errors included)."""
        if request.method not in (b"GET", b"HEAD"):
            return None
        parts = request.path.split(b"/")  # "", "v2", namespace, model, "manifests", tag
        if len(parts) != 6 or parts[0] or parts[1] != b"v2" or parts[4] != b"manifests":
            return None
        try:
            namespace, model, reference = (part.decode("ascii") for part in parts[2:4] + parts[5:])
        except UnicodeDecodeError:
            return None
        # Only names that read the same raw and unquoted (no "%"): the routes would see the same.
        if is_digest(reference) or not (is_namespace(namespace) and is_model(model) and is_tag(reference)):
            return None
        upstream = self._upstream(request)
        name = ModelName(upstream.host, namespace, model, reference)
        try:
            found = self._manifests.fresh(name)
        except OSError:
            return None  # the route reports it
        if found is None:
            return None
        self._events.model_used(name, request.method == b"GET")
        return self._manifest_answer(request, found)

    # --- blobs ---------------------------------------------------------------------------------

    async def _locate(
        self, upstream: AsClient, name: ModelName, hexdigest: str
    ) -> tuple[int, GrowingBlob | None]:
        """The blob's size, and its download if it is in progress."""
        size = self._blobs.blob_size(hexdigest)
        if size is not None:
            return size, None
        fill = self._fetches.active(hexdigest)
        if fill is not None:
            return fill.size, fill
        known = self._manifests.blob_sizes.get(hexdigest)
        if known is not None:
            return known, None
        if name.namespace in self._private:  # (never asked of an upstream)
            raise RegistryError(404, "BLOB_UNKNOWN", f"blob unknown: sha256:{hexdigest}")
        try:
            return await upstream.blob_size(name.repository, "sha256:" + hexdigest), None
        except UpstreamError as e:
            if e.status in (404, 400):
                raise RegistryError(404, "BLOB_UNKNOWN", f"blob unknown: sha256:{hexdigest}") from None
            raise

    async def _redirected(self, request: IRequest, hexdigest: str) -> bool:
        """Answer a GET with a 307 to where the blob is served from elsewhere, if it is (the client
        reads the bytes, ranges too, from there)."""
        if request.method != b"GET" or self._redirect is None:
            return False
        elsewhere = await self._redirect(hexdigest)
        if elsewhere is None or _same_hostname(elsewhere, _header(request, b"host")):
            return False  # (Ollama follows a 307 to the same host name itself, and then finds no Location)
        request.setResponseCode(307)
        request.setHeader(b"location", elsewhere.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")  # (the URL expires)
        request.setHeader(b"content-length", b"0")
        return True

    def _open(self, hexdigest: str, fill: GrowingBlob | None) -> int:
        """The descriptor the response reads from, opened before any header is sent."""
        try:
            return fill.open_reader() if fill is not None else self._blobs.open_blob(hexdigest)
        except FileNotFoundError:
            if fill is not None and fill.failure is not None:
                raise _failed(fill.failure.value) from None
            raise RegistryError(
                503, "UNAVAILABLE", "the blob left the cache while being opened; retry"
            ) from None

    async def _first_bytes(self, fill: GrowingBlob, offset: int) -> None:
        """Hold the response until the download has bytes for it (or failed), so that an upstream
        failing at once is a clear 502 instead of a broken stream; never longer than a few seconds,
        since the Go client gives its discovery GET 30 s in all."""
        if fill.available(offset) > 0:
            return
        waiting = fill.wait(offset)
        timer = self._clock.callLater(FIRST_BYTES_WAIT, waiting.cancel)
        try:
            await waiting
        except CancelledError:
            if timer.active():  # the client hung up: let the cancellation through
                raise
            return  # still nothing: send headers anyway and stream as bytes come
        except FillFailed as e:
            raise _failed(e) from None
        finally:
            if timer.active():
                timer.cancel()

    @app.route("/<namespace>/<model>/blobs/<digest>", methods=["GET", "HEAD"])
    async def blob(self, request: Request, namespace: str, model: str, digest: str) -> Any:
        # what is fetched for this client goes upstream with its User-Agent (see AsClient)
        upstream = AsClient(self._upstream(request), ollama_agent(_header(request, b"user-agent")))
        name = self._name(request, namespace, model)
        try:
            hexdigest = parse_digest(digest)
        except InvalidName:
            raise RegistryError(400, "DIGEST_INVALID", f"invalid digest {digest!r}") from None
        if await self._redirected(request, hexdigest):
            return b""
        size, fill = await self._locate(upstream, name, hexdigest)
        try:
            wanted = parse_range(_header(request, b"range"), size)
        except InvalidRange as e:
            raise RegistryError(400, "RANGE_INVALID", str(e)) from None
        except UnsatisfiableRange:
            body = registry_error(
                request, 416, "RANGE_INVALID", f"range not satisfiable for a {size}-byte blob"
            )
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            return body
        first, last = (0, size - 1) if wanted is None else wanted
        streaming = request.method != b"HEAD" and last >= first
        if streaming and fill is None and self._blobs.blob_size(hexdigest) is None:
            # (a private model's blob only from a cluster's shared storage, never from an upstream)
            source = NoUpstream() if name.namespace in self._private else upstream
            fill = self._fetches.fill(hexdigest, size, name.repository, source)
        fd: int | Callable[[], int] = -1
        if streaming:
            if fill is not None:
                await self._first_bytes(fill, first)  # before any header: a failure is still a clean 502
            if fill is None or fill.complete or fill.available(first) > 0:
                fd = self._open(hexdigest, fill)  # now, so that a vanished file is still a clean error
            else:  # still queued behind other downloads: open when its first bytes are on disk
                fd = fill.open_reader
        _blob_headers(request, digest, last - first + 1)
        if wanted is None:
            location = self._blob_location(f"/v2/{name.repository}/blobs/{digest}")
            request.setHeader(b"location", location.encode())
        else:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{size}".encode())
        if not streaming:
            return b""
        request.setHeader(b"x-mirror-cache", b"hit" if fill is None else b"fill")
        # A response carrying the whole blob ends only once it is verified (parts of it, as the Go
        # client's parallel ranges, are not held: the client checks the sha256 itself at the end).
        hold_last = fill is not None and first == 0 and last == size - 1
        self._events.blob_used(hexdigest)
        self.reading[hexdigest] += 1

        def done_reading() -> None:
            self.reading[hexdigest] -= 1
            if self.reading[hexdigest] <= 0:
                del self.reading[hexdigest]

        producer = BlobProducer(request, fd, first, last, fill, hold_last, self._events, done_reading)
        return StreamingResource(producer)

    # --- errors --------------------------------------------------------------------------------

    @app.handle_errors(RegistryError)
    def _registry_error(self, request: IRequest, failure: Failure) -> bytes:
        e: RegistryError = failure.value  # type: ignore[assignment]
        return registry_error(request, e.status, e.code, e.message)

    @app.handle_errors(NoSpace)
    def _no_space(self, request: IRequest, failure: Failure) -> bytes:
        return registry_error(request, 507, "UNAVAILABLE", failure.getErrorMessage())

    @app.handle_errors(ManifestUnknown)
    def _manifest_unknown(self, request: IRequest, failure: Failure) -> bytes:
        return registry_error(request, 404, "MANIFEST_UNKNOWN", failure.getErrorMessage())

    @app.handle_errors(InvalidName)
    def _invalid_name(self, request: IRequest, failure: Failure) -> bytes:
        return registry_error(request, 400, "NAME_INVALID", failure.getErrorMessage())

    @app.handle_errors(UpstreamError)
    def _upstream_error(self, request: IRequest, failure: Failure) -> bytes:
        e: UpstreamError = failure.value  # type: ignore[assignment]
        log.warn(
            "{method} {path}: {error}",
            method=request.method.decode(),
            path=request.path.decode("latin-1"),
            error=e.message,
        )
        status = 503 if e.status is None else 502
        return registry_error(request, status, "UNAVAILABLE", e.message)

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return registry_error(request, 404, "NAME_UNKNOWN", "no such registry route")

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        return registry_error(request, 405, "UNSUPPORTED", "this mirror is read-only")

    @app.handle_errors(HTTPException)
    def _routing(self, request: IRequest, failure: Failure) -> bytes:
        return routing_answer(
            request, failure, lambda r, code, text: registry_error(r, code, "UNSUPPORTED", text)
        )

    @app.handle_errors(Exception)
    def _internal(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("registry route failed", failure)
        return registry_error(request, 500, "UNKNOWN", "internal error")


class FreshManifests(Resource):
    """A leaf wrapper around the root: fresh cached manifests (the requests a fleet repeats most) are
    answered by :meth:`RegistryApi.fresh_manifest` without two Klein routers; everything else goes on
    to the wrapped tree.  It sits inside the access control, so every rule still applies."""

    isLeaf = True

    def __init__(self, registry: RegistryApi, wrapped: IResource) -> None:
        super().__init__()
        self._registry = registry
        self._wrapped = wrapped

    def render(self, request: Request) -> Any:
        body = self._registry.fresh_manifest(request)
        if body is None:
            return self._wrapped.render(request)
        request.write(body)  # as Klein ends an answer (a HEAD's body is dropped by twisted.web)
        request.finish()
        return NOT_DONE_YET


def _failed(error: BaseException | None) -> Exception:
    """What a client is told of a download that failed before its answer began: 507 when the mirror's
    disk is full (see :mod:`ollama_mirror.cache.space`), else 502 with the download's own words."""
    if isinstance(error, NoSpace):
        return error
    return UpstreamError(str(error) if error is not None else "the download failed", 502)


def _blob_headers(request: IRequest, digest: str, length: int) -> None:
    """The headers of every blob answer: what it is, that it never changes, that ranges work."""
    request.setHeader(*API_VERSION)
    request.setHeader(b"docker-content-digest", digest.encode())
    request.setHeader(b"etag", f'"{digest}"'.encode())
    request.setHeader(b"accept-ranges", b"bytes")
    request.setHeader(b"cache-control", b"public, max-age=31536000, immutable")
    request.setHeader(b"content-type", b"application/octet-stream")
    request.setHeader(b"content-length", str(length).encode())


def _same_hostname(url: str, host_header: str | None) -> bool:
    """Whether *url* names the host the client asked (``Host``), ports aside."""
    asked = urlsplit(f"//{host_header}").hostname if host_header else None
    return asked is not None and urlsplit(url).hostname == asked
