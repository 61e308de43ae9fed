"""``ollama push`` to the mirror: the registry's write routes, for private namespaces only.

Who may push was judged before a route runs (:mod:`ollama_mirror.security.access`: a private namespace,
a token a push key earned).  The routes, in the order Ollama sends them (``server/upload.go``):

- ``POST /v2/<ns>/<model>/blobs/uploads/`` starts a session (``202``, ``Location``, ``Docker-Upload-UUID``),
  or with ``?mount=<digest>&from=<repo>`` answers ``201`` when the mirror has the blob;
- ``PATCH <location>`` with ``Content-Range: <a>-<b>``: one part, streamed into the session as it arrives
  (:class:`StreamingBodies` makes it the request's body); ``202`` with the next ``Location`` and ``Range``;
- ``PUT <location>?digest=<digest>`` commits: the blob is published if its sha256 is that digest;
- ``PUT /v2/<ns>/<model>/manifests/<tag>``: the tag, once every blob it names is on the mirror.

``Location`` values are absolute (Ollama uses them as given) and name the host the client asked.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from urllib.parse import parse_qs

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from ..cache.blobs import BlobStore, ManifestStore
from ..cache.store import manifest_blobs
from ..events import Events
from ..names import InvalidName, ModelName, is_model, is_namespace, is_tag, parse_digest
from ..private.uploads import BodySink, PartWriter, Upload, UploadError, Uploads
from ..runner import Runner
from .errors import registry_error

log = Logger(namespace="ollama_mirror.private")

MANIFEST_TYPE = b"application/vnd.docker.distribution.manifest.v2+json"
MAX_MANIFEST = 4 * 2**20
_UPLOAD_PATH = re.compile(rb"/v2/([^/?]+)/([^/?]+)/blobs/uploads/([0-9a-f]{32})(?:\?.*)?")


class PushApi:
    app = Klein()

    def __init__(
        self,
        blobs: BlobStore,
        manifests: ManifestStore,
        uploads: Uploads,
        runner: Runner,
        host_of: Callable[[IRequest], str],
        events: Events | None = None,
    ) -> None:
        """*host_of* gives the model host a request means, from its ``Host`` (as the pull routes name
        models); *uploads* holds the sessions."""
        self._blobs = blobs
        self._manifests = manifests
        self._uploads = uploads
        self._runner = runner
        self._host_of = host_of
        self._events = events or Events()

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    # --- blobs ---------------------------------------------------------------------------------

    @app.route("/<namespace>/<model>/blobs/uploads/", methods=["POST"])
    async def start(self, request: IRequest, namespace: str, model: str) -> bytes:
        repository = _repository(namespace, model)
        query = _query(request)
        mount = query.get("mount")
        if mount:
            hexdigest = _digest(mount)
            if self._blobs.blob_size(hexdigest) is not None:  # (Ollama mounts every layer of FROM)
                request.setResponseCode(201)
                request.setHeader(b"location", self._url(request, f"/v2/{repository}/blobs/{mount}"))
                request.setHeader(b"docker-content-digest", mount.encode())
                return _empty(request)
        upload = await self._uploads.start(repository)
        request.setResponseCode(202)
        self._session_headers(request, upload)
        return _empty(request)

    @app.route("/<namespace>/<model>/blobs/uploads/<upload_id>", methods=["PATCH"])
    async def part(self, request: IRequest, namespace: str, model: str, upload_id: str) -> bytes:
        upload = self._uploads.find(upload_id, _repository(namespace, model))
        writer = getattr(request, "content", None)
        if isinstance(writer, _Discard) and writer.refusal is not None:
            raise writer.refusal
        if not isinstance(writer, PartWriter) or writer is not upload.writer:
            raise UploadError(400, "BLOB_UPLOAD_INVALID", "the part did not reach its upload")
        await writer.finished()
        if writer.refusal is not None:
            raise writer.refusal
        if upload.failure is not None:
            raise UploadError(500, "BLOB_UPLOAD_INVALID", upload.failure)
        request.setResponseCode(202)
        self._session_headers(request, upload)
        return _empty(request)

    @app.route("/<namespace>/<model>/blobs/uploads/<upload_id>", methods=["PUT"])
    async def commit(self, request: IRequest, namespace: str, model: str, upload_id: str) -> bytes:
        repository = _repository(namespace, model)
        digest = _query(request).get("digest", "")
        hexdigest = _digest(digest)
        if self._uploads.committed(upload_id, repository, hexdigest):  # (a retried commit)
            return self._committed(request, repository, digest)
        if self._uploads.gone(upload_id) and self._blobs.blob_size(hexdigest) is not None:
            return self._committed(request, repository, digest)  # (committed by another worker process)
        upload = self._uploads.find(upload_id, repository)
        writer = getattr(request, "content", None)
        if isinstance(writer, PartWriter) and writer is upload.writer:
            await writer.finished()  # (a last part sent with the commit)
        await self._uploads.commit(upload, hexdigest)
        return self._committed(request, repository, digest)

    def _committed(self, request: IRequest, repository: str, digest: str) -> bytes:
        request.setResponseCode(201)
        request.setHeader(b"location", self._url(request, f"/v2/{repository}/blobs/{digest}"))
        request.setHeader(b"docker-content-digest", digest.encode())
        return _empty(request)

    @app.route("/<namespace>/<model>/blobs/uploads/<upload_id>", methods=["DELETE"])
    async def cancel(self, request: IRequest, namespace: str, model: str, upload_id: str) -> bytes:
        await self._uploads.cancel(self._uploads.find(upload_id, _repository(namespace, model)))
        request.setResponseCode(204)
        return b""

    # --- manifests -----------------------------------------------------------------------------

    @app.route("/<namespace>/<model>/manifests/<tag>", methods=["PUT"])
    async def manifest(self, request: IRequest, namespace: str, model: str, tag: str) -> bytes:
        _repository(namespace, model)
        if not is_tag(tag):
            raise UploadError(400, "TAG_INVALID", f"invalid tag {tag!r}")
        data = request.content.read(MAX_MANIFEST + 1) if request.content is not None else b""  # type: ignore[attr-defined]
        if len(data) > MAX_MANIFEST:
            raise UploadError(400, "MANIFEST_INVALID", "the manifest is larger than 4 MiB")
        blobs = manifest_blobs(data)
        if not blobs:
            raise UploadError(400, "MANIFEST_INVALID", "not an image manifest with a config and layers")
        for digest, size in blobs:
            if self._blobs.blob_size(digest.removeprefix("sha256:")) != size:
                raise UploadError(
                    400, "MANIFEST_BLOB_UNKNOWN", f"blob {digest} ({size} bytes) is not on this mirror"
                )
        name = ModelName(self._host_of(request), namespace, model, tag)
        await self._runner.run(self._manifests.write_manifest, name, data)
        self._events.manifest_published(name)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        log.info("pushed {name} ({digest})", name=name.display(), digest=digest)
        request.setResponseCode(201)
        request.setHeader(b"location", self._url(request, f"/v2/{namespace}/{model}/manifests/{digest}"))
        request.setHeader(b"docker-content-digest", digest.encode())
        return _empty(request)

    # --- answers -------------------------------------------------------------------------------

    def _session_headers(self, request: IRequest, upload: Upload) -> None:
        path = f"/v2/{upload.repository}/blobs/uploads/{upload.id}"
        request.setHeader(b"location", self._url(request, path))
        request.setHeader(b"docker-upload-uuid", upload.id.encode())
        request.setHeader(b"range", f"0-{max(upload.size - 1, 0)}".encode())

    @staticmethod
    def _url(request: IRequest, path: str) -> bytes:
        """An absolute URL on the host the client asked (Ollama uses a ``Location`` as given)."""
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        return f"{scheme}://{host}{path}".encode("latin-1")

    @app.handle_errors(UploadError)
    def _upload_error(self, request: IRequest, failure: Failure) -> bytes:
        e: UploadError = failure.value  # type: ignore[assignment]
        return registry_error(request, e.status, e.code, e.message)


class StreamingBodies:
    """Which request bodies go straight to their upload as they arrive: a ``PATCH`` (or a ``PUT`` with
    a body) of a known session.  Asked by the request when its headers are in (see
    :class:`~ollama_mirror.security.hardening.StreamingRequest`), before the guard and the route run: with
    credentials that may push there, to a session that exists; anything else on an upload path is read
    and dropped, so that the guard or the route can answer (``401``, ``404``) without spooling."""

    def __init__(self, uploads: Uploads, may_push: Callable[[Headers, str], bool]) -> None:
        """*may_push* says whether a request's credentials let it push to a repository."""
        self._uploads = uploads
        self._may_push = may_push

    def target(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> PartWriter | _Discard | None:
        if method not in (b"PATCH", b"PUT"):
            return None
        match = _UPLOAD_PATH.fullmatch(path)
        if match is None:
            return None
        namespace, model, upload_id = (part.decode("latin-1") for part in match.groups())
        ranges = headers.getRawHeaders(b"content-range") or []
        start = _range_start(ranges[0]) if ranges else None
        if (
            method == b"PUT"
            and not ranges
            and (headers.getRawHeaders(b"content-length") or [b"0"])[0] == b"0"
        ):
            return None  # (a commit without a last part)
        repository = f"{namespace}/{model}"
        if not self._may_push(headers, repository):
            return _Discard()  # (refused by the guard; nothing of it is written)
        length = (headers.getRawHeaders(b"content-length") or [b"0"])[0]
        try:
            upload = self._uploads.find(upload_id, repository)
            return self._uploads.part(upload, start, pause, resume, int(length) if length.isdigit() else 0)
        except UploadError as e:
            return _Discard(e)


class _Discard(BodySink):
    """A body read and dropped (its request is refused by the guard or the route: *refusal* says why);
    ``server.request_timeout`` still bounds it."""

    discards = True

    def __init__(self, refusal: UploadError | None = None) -> None:
        self.refusal = refusal

    def write(self, data: bytes) -> None:
        pass


def _range_start(value: bytes) -> int | None:
    """The first byte of ``Content-Range: <a>-<b>`` (Ollama sends no ``bytes `` prefix; others do)."""
    match = re.fullmatch(rb"(?:bytes )?(\d+)-\d+(?:/\S+)?", value.strip())
    return int(match.group(1)) if match else -1


def _repository(namespace: str, model: str) -> str:
    if not is_namespace(namespace) or not is_model(model):
        raise UploadError(400, "NAME_INVALID", f"invalid repository name {namespace}/{model}")
    return f"{namespace}/{model}"


def _digest(text: str) -> str:
    try:
        return parse_digest(text)
    except InvalidName:
        raise UploadError(400, "DIGEST_INVALID", f"invalid digest {text!r}") from None


def _query(request: IRequest) -> dict[str, str]:
    query = request.uri.partition(b"?")[2].decode("latin-1")
    return {name: values[0] for name, values in parse_qs(query).items()}


def _empty(request: IRequest) -> bytes:
    request.setHeader(b"content-length", b"0")
    return b""
