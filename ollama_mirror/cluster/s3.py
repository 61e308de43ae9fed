"""An S3-compatible object store, spoken to through Twisted: signed by botocore, carried by the Agent.

Only what the mirror needs: HEAD an object, GET a byte range of it (a streaming response, with the
reactor's backpressure), GET and PUT a small document, and upload a local file (one PUT, or a multipart
upload in parts for a large one).  botocore signs each request (SigV4); the bytes never go through
botocore, and a file's bytes are read in worker threads, never on the reactor.  Each part's sha256 is
signed and its MD5 sent as ``Content-MD5``, so the store itself checks what it receives.  Every request
goes through the mirror's upstream retry policy (a store answers 500 and 503 "SlowDown" now and then).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from ..config import ClusterConfig, ConfigError
from ..config.parsing import parse_storage_url
from ..runner import Runner
from ..upstream.bodies import collect_limited
from ..upstream.client import NETWORK_ERRORS, discard
from ..upstream.errors import UpstreamError
from ..upstream.retry import RetryPolicy, parse_retry_after

PART_SIZE = 64 * 2**20  # larger files go up in parts of this size (S3 allows 5 MiB to 5 GiB)
PARTS_AT_ONCE = 4
READ_SIZE = 2**20  # bytes per read of a file being uploaded (in a worker thread)
MAX_DOCUMENT = 4 * 2**20  # small documents: manifests, S3's XML answers
_XMLNS = re.compile(r"^\{[^}]*\}")


@dataclass(frozen=True)
class Storage:
    """Where the cluster's objects live: the endpoint, the bucket, and the prefix every key is under."""

    endpoint: str  # "" for AWS
    bucket: str
    prefix: str
    region: str

    @classmethod
    def from_config(cls, config: ClusterConfig) -> Storage:
        bucket, prefix = parse_storage_url(config.storage_url)
        return cls(config.s3_endpoint, bucket, prefix, config.s3_region)

    def key(self, name: str) -> str:
        """The object key of *name* (``blobs/sha256-<hex>``, ``manifests/<host>/...``) under the prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, key: str, query: Mapping[str, str] | None = None) -> str:
        """Path-style under a configured endpoint; virtual-hosted on AWS."""
        path = quote(key, safe="/~")
        if self.endpoint:
            base = f"{self.endpoint}/{self.bucket}/{path}"
        else:
            base = f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"
        return f"{base}?{urlencode(sorted(query.items()), quote_via=quote)}" if query else base

    def bucket_url(self) -> str:
        """The bucket itself (what a HEAD asks whether it is there and ours)."""
        if self.endpoint:
            return f"{self.endpoint}/{self.bucket}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/"

    def describe(self) -> str:
        """``s3://bucket/prefix`` (at endpoint), for log lines and errors (no credentials in it)."""
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else where


class _Signer(S3SigV4Auth):  # type: ignore[misc]
    """SigV4 for S3, with the payload's sha256 given when the body is streamed (botocore would read it)."""

    def payload(self, request: AWSRequest) -> str:
        given: str | None = request.context.get("payload_sha256")
        return given if given is not None else str(super().payload(request))


class S3Client:
    def __init__(
        self,
        storage: Storage,
        config: ClusterConfig,
        agent: IAgent,
        clock: IReactorTime,
        runner: Runner,
        retry: RetryPolicy,
    ) -> None:
        self.storage = storage
        self._agent = agent
        self._clock = clock
        self._runner = runner
        self._retry = retry
        credentials = Credentials(
            config.s3_access_key_id, config.s3_secret_access_key, config.s3_session_token or None
        )
        self._credentials = credentials
        self._signer = _Signer(credentials, "s3", config.s3_region)
        self._signing_config = SimpleNamespace(s3={"payload_signing_enabled": True})

    # --- one request ---------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | IBodyProducer | None = None,
        payload_sha256: str | None = None,
        url: str | None = None,
    ) -> IResponse:
        """One signed request (no retries); network failures become :class:`UpstreamError`.  *url*,
        when given, replaces the object's (the bucket's own, for :meth:`ping`)."""
        url = url or self.storage.url(key, query)
        data = body if isinstance(body, bytes) else None
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=data)
        request.context["client_config"] = self._signing_config
        if body is not None and data is None:
            request.context["payload_sha256"] = payload_sha256
        self._signer.add_auth(request)
        sent = Headers(
            {name.lower().encode(): [str(value).encode()] for name, value in request.headers.items()}
        )
        producer = FileBodyProducer(io.BytesIO(body)) if isinstance(body, bytes) else body
        try:
            return await self._agent.request(method.encode(), url.encode(), sent, producer)
        except NETWORK_ERRORS as e:
            raise UpstreamError(f"storage {self.storage.describe()} did not answer: {e}") from None

    async def _answered(self, response: IResponse, what: str) -> UpstreamError:
        """An S3 error answer, in words (its ``Code`` and ``Message`` when it sent them)."""
        try:
            body = await collect_limited(response, 64 * 1024)
        except Exception:
            body = b""
        detail = ""
        try:
            root = ElementTree.fromstring(body)
            code, message = _text(root, "Code"), _text(root, "Message")
            detail = f": {code}" + (f" ({message})" if message else "") if code else ""
        except ElementTree.ParseError:
            pass
        retry_after = parse_retry_after((response.headers.getRawHeaders(b"retry-after") or [None])[0])
        return UpstreamError(
            f"storage {self.storage.describe()} answered {response.code} for {what}{detail}",
            response.code,
            retry_after=retry_after,
        )

    def presigned_get(self, key: str, expires: int) -> str:
        """A URL anyone may GET the object with (Range too) for *expires* seconds: SigV4 in the query."""
        request = AWSRequest(method="GET", url=self.storage.url(key), headers={})
        request.context["client_config"] = self._signing_config
        S3SigV4QueryAuth(self._credentials, "s3", self.storage.region, expires=expires).add_auth(request)
        return str(request.url)

    async def ping(self) -> str:
        """Whether the bucket answers a signed HEAD (the health check): what it answered, else raises."""
        response = await self._send("HEAD", "", url=self.storage.bucket_url())
        await discard(response)
        if response.code != 200:
            raise await self._answered(response, "HEAD of the bucket")
        return f"bucket {self.storage.bucket} answered {response.code}"

    # --- reading -------------------------------------------------------------------------------

    async def size(self, key: str) -> int | None:
        """The object's size, or ``None`` when there is no such object."""

        async def once() -> int | None:
            response = await self._send("HEAD", key)
            await discard(response)
            if response.code == 404:
                return None
            if response.code != 200:
                raise await self._answered(response, f"HEAD {key}")
            length = response.headers.getRawHeaders(b"content-length") or [b""]
            return int(length[0]) if length[0].isdigit() else None

        return await self._retry.run(f"storage: size of {key}", once)

    async def open_range(self, key: str, start: int, end: int | None) -> IResponse:
        """A streaming 206 answer of bytes *start* to *end* (inclusive; ``None``: to the end)."""
        rng = f"bytes={start}-{'' if end is None else end}"

        async def once() -> IResponse:
            response = await self._send("GET", key, headers={"Range": rng})
            if response.code in (200, 206):
                return response
            raise await self._answered(response, f"GET {key} {rng}")

        return await self._retry.run(f"storage: {key} {rng}", once)

    async def get_document(self, key: str) -> bytes | None:
        """A small object (a manifest), or ``None`` when there is none."""

        async def once() -> bytes | None:
            response = await self._send("GET", key)
            if response.code == 404:
                await discard(response)
                return None
            if response.code != 200:
                raise await self._answered(response, f"GET {key}")
            return await collect_limited(response, MAX_DOCUMENT)

        return await self._retry.run(f"storage: {key}", once)

    async def list_objects(self, prefix: str) -> list[Listed]:
        """Every object whose key starts with *prefix* (ListObjectsV2, a page of up to 1000 at a time)."""
        found: list[Listed] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
            root = await self._bucket_document(query, f"the list of {prefix}")
            for entry in _elements(root, "Contents"):
                found.append(Listed(_text(entry, "Key"), int(_text(entry, "Size") or 0), _when(entry)))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return found

    async def list_uploads(self, prefix: str) -> list[Upload]:
        """The multipart uploads under *prefix* that are neither completed nor aborted."""
        found: list[Upload] = []
        markers: dict[str, str] = {}
        while True:
            root = await self._bucket_document({"uploads": "", "prefix": prefix, **markers}, "the uploads")
            for entry in _elements(root, "Upload"):
                found.append(Upload(_text(entry, "Key"), _text(entry, "UploadId"), _when(entry, "Initiated")))
            markers = {
                "key-marker": _text(root, "NextKeyMarker"),
                "upload-id-marker": _text(root, "NextUploadIdMarker"),
            }
            if _text(root, "IsTruncated") != "true" or not markers["key-marker"]:
                return found

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort an abandoned multipart upload (what the sweep of the shared copy finds)."""

        async def once() -> None:
            response = await self._send("DELETE", key, query={"uploadId": upload_id})
            if response.code not in (200, 204, 404):
                raise await self._answered(response, f"DELETE {key}?uploadId")
            await discard(response)

        await self._retry.run(f"storage: abort upload of {key}", once)

    async def _bucket_document(self, query: Mapping[str, str], what: str) -> ElementTree.Element:
        async def once() -> bytes:
            response = await self._send("GET", "", query=query)
            if response.code != 200:
                raise await self._answered(response, what)
            return await collect_limited(response, MAX_DOCUMENT)

        return ElementTree.fromstring(await self._retry.run(f"storage: {what}", once))

    # --- writing -------------------------------------------------------------------------------

    async def put_document(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()  # (S3 checks it)

        async def once() -> None:
            response = await self._send(
                "PUT", key, headers={"Content-Type": content_type, "Content-MD5": md5}, body=data
            )
            if response.code != 200:
                raise await self._answered(response, f"PUT {key}")
            await discard(response)

        await self._retry.run(f"storage: PUT {key}", once)

    async def delete(self, key: str) -> None:
        async def once() -> None:
            response = await self._send("DELETE", key)
            if response.code not in (200, 204, 404):
                raise await self._answered(response, f"DELETE {key}")
            await discard(response)

        await self._retry.run(f"storage: DELETE {key}", once)

    async def upload_file(self, key: str, path: str, size: int, part_size: int = PART_SIZE) -> None:
        """Upload a local file (immutable while this runs) as *key*: visible only once whole (one PUT up
        to *part_size*, else a multipart upload in parts of that size)."""
        if size <= part_size:
            await self._put_part(key, path, 0, size, {})
            return
        upload_id = await self._create_upload(key)
        gate = DeferredSemaphore(PARTS_AT_ONCE)

        def part(number: int, start: int) -> Deferred[str]:
            query = {"partNumber": str(number), "uploadId": upload_id}
            length = min(part_size, size - start)
            return gate.run(lambda: Deferred.fromCoroutine(self._put_part(key, path, start, length, query)))

        try:
            parts = [part(number, start) for number, start in enumerate(range(0, size, part_size), 1)]
            results = await DeferredList(parts, consumeErrors=True)
            for ok, outcome in results:
                if not ok:
                    assert isinstance(outcome, Failure)
                    outcome.raiseException()
            await self._complete_upload(key, upload_id, [str(etag) for _, etag in results])
        except BaseException:
            await self._abort_upload(key, upload_id)
            raise

    async def _put_part(self, key: str, path: str, start: int, length: int, query: Mapping[str, str]) -> str:
        """PUT bytes [start, start+length) of *path* (the whole object, or one part); its ETag."""
        sha256, md5 = await self._runner.run(_digests, path, start, length)

        async def once() -> str:
            producer = ThreadedFileProducer(path, start, length, self._runner)
            headers = {"Content-Length": str(length), "Content-MD5": md5}
            response = await self._send(
                "PUT", key, query=query, headers=headers, body=producer, payload_sha256=sha256
            )
            if response.code != 200:
                raise await self._answered(response, f"PUT {key} {dict(query) or ''}".rstrip())
            await discard(response)
            etag: bytes = (response.headers.getRawHeaders(b"etag") or [b""])[0]
            return etag.decode()

        etag: str = await self._retry.run(f"storage: PUT {key}", once)
        return etag

    async def _create_upload(self, key: str) -> str:
        async def once() -> str:
            response = await self._send("POST", key, query={"uploads": ""})
            if response.code != 200:
                raise await self._answered(response, f"POST {key}?uploads")
            upload_id = _text(
                ElementTree.fromstring(await collect_limited(response, MAX_DOCUMENT)), "UploadId"
            )
            if not upload_id:
                raise UpstreamError(
                    f"storage {self.storage.describe()} started an upload without an UploadId"
                )
            return upload_id

        upload: str = await self._retry.run(f"storage: start upload of {key}", once)
        return upload

    async def _complete_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>" for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()

        async def once() -> None:
            response = await self._send("POST", key, query={"uploadId": upload_id}, body=body)
            data = await collect_limited(response, MAX_DOCUMENT)
            if response.code != 200 or b"<Error>" in data:  # (S3 may answer 200 with an error inside)
                raise UpstreamError(
                    f"storage {self.storage.describe()} did not complete the upload of {key}: "
                    f"{response.code} {data[:200]!r}",
                    response.code if response.code != 200 else 503,
                )

        await self._retry.run(f"storage: complete upload of {key}", once)

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload, so that its parts are not kept (and billed) for ever."""
        try:
            response = await self._send("DELETE", key, query={"uploadId": upload_id})
            await discard(response)
        except UpstreamError:
            pass  # (the store's own lifecycle rule is the backstop: documented)


@dataclass(frozen=True)
class Listed:
    """An object of a listing: its key, size, and when it was last written (Unix time)."""

    key: str
    size: int
    modified: float


@dataclass(frozen=True)
class Upload:
    """A multipart upload in progress (or abandoned): its key, id, and when it started (Unix time)."""

    key: str
    upload_id: str
    initiated: float


def _elements(root: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """The direct children of *root* named *name*, namespace or not."""
    return [element for element in root if _XMLNS.sub("", element.tag) == name]


def _when(entry: ElementTree.Element, name: str = "LastModified") -> float:
    """An S3 time stamp (``2026-12-07T14:38:00.000Z``) as Unix time; 0 when there is none."""
    text = _text(entry, name)
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _text(root: ElementTree.Element, name: str) -> str:
    """The text of the first element named *name* anywhere in *root*, namespace or not."""
    for element in root.iter():
        if _XMLNS.sub("", element.tag) == name:
            return element.text or ""
    return ""


def _digests(path: str, start: int, length: int) -> tuple[str, str]:
    """(thread) The hex sha256 and base64 MD5 of bytes [start, start+length) of *path*."""
    sha256, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)  # (S3 checks the MD5)
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left:
            data = f.read(min(READ_SIZE, left))
            if not data:
                raise OSError(f"{path} is shorter than expected")
            sha256.update(data)
            md5.update(data)
            left -= len(data)
    return sha256.hexdigest(), base64.b64encode(md5.digest()).decode()


@implementer(IBodyProducer)
class ThreadedFileProducer:
    """A request body of bytes [start, start+length) of a file, each piece read in a worker thread, and
    written to the connection only as fast as it takes them (pauseProducing/resumeProducing)."""

    def __init__(self, path: str, start: int, length: int, runner: Runner) -> None:
        self.length = length
        self._path = path
        self._start = start
        self._runner = runner
        self._paused: Deferred[None] | None = None
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return Deferred.fromCoroutine(self._produce(consumer))

    async def _produce(self, consumer: IConsumer) -> None:
        fd = await self._runner.run(os.open, self._path, os.O_RDONLY)
        try:
            position, end = self._start, self._start + self.length
            while position < end and not self._stopped:
                data: bytes = await self._runner.run(os.pread, fd, min(READ_SIZE, end - position), position)
                if not data:
                    raise OSError(f"{self._path} is shorter than expected")
                if self._stopped:
                    break
                consumer.write(data)
                position += len(data)
                if self._paused is not None:
                    await self._paused
        finally:
            await self._runner.run(os.close, fd)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


def check_storage(config: ClusterConfig, timeout: float = 10.0) -> None:
    """At start, before the reactor runs (it blocks): the bucket answers a signed HEAD, else a
    :class:`ConfigError` that names the key and the reason (the daemon stops with exit status 2)."""
    storage = Storage.from_config(config)
    url = storage.bucket_url()
    request = AWSRequest(method="HEAD", url=url, headers={})
    credentials = Credentials(
        config.s3_access_key_id, config.s3_secret_access_key, config.s3_session_token or None
    )
    _Signer(credentials, "s3", config.s3_region).add_auth(request)
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, method="HEAD", headers=dict(request.headers)), timeout=timeout
        ):
            return
    except urllib.error.HTTPError as e:
        reason = {
            403: "the credentials were refused (cluster.s3_access_key_id, cluster.s3_secret_access_key)",
            404: f"there is no bucket {storage.bucket!r} there",
        }.get(e.code, f"it answered {e.code}")
        raise ConfigError(f"cluster.storage_url: {storage.describe()}: {reason}") from None
    except (urllib.error.URLError, OSError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) else e
        raise ConfigError(f"cluster.s3_endpoint: cannot reach {storage.describe()}: {why}") from None
