"""The upstream registry, as the mirror's one HTTP client sees it.

Handles what every caller would otherwise repeat: the v2 ``Accept`` header private registries
insist on, Basic credentials and the ``WWW-Authenticate: Bearer`` token dance, and blob
redirects.  ``registry.ollama.ai`` answers blob GETs with a 307 to short-lived presigned URLs on
another host: we follow those ourselves, never send credentials there, remember them while
they work and resolve again when they expire.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from OpenSSL.SSL import Error as SSLError
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from .. import __version__
from .bodies import BodyTooSlow, collect_limited, drain
from .errors import UpstreamError
from .retry import RetryPolicy, parse_retry_after

log = Logger(namespace="ollama_mirror.upstream")  # pinned: log names are public
T = TypeVar("T")

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = frozenset(
    {
        MANIFEST_V2,
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    }
)
DEFAULT_ACCEPT = (MANIFEST_V2, OCI_MANIFEST)
MAX_MANIFEST_BYTES = 4 * 2**20
MAX_REDIRECTS = 5
_RESOLVED_URL_LIFETIME = 10 * 60.0  # R2 presigned URLs last ~20 minutes; re-resolve well before
_EXPIRED_STATUSES = frozenset({401, 403, 404, 410})
NETWORK_ERRORS = (ConnectError, DNSLookupError, TimeoutError, ResponseFailed, CancelledError)
LOOP_STATUS = 508  # Loop Detected: what the mirror answers a request that it sent itself ...
LOOP_HEADER = b"x-ollama-mirror-loop"  # ... with this header, so that no other 508 is taken for one


@dataclass(frozen=True)
class FetchedManifest:
    data: bytes
    media_type: str
    digest: str  # "sha256:<hex>" of data


def _challenge_params(header: str) -> tuple[str, dict[str, str]]:
    """Split ``Bearer realm="x",service="y"`` into its scheme and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


class Upstream:
    """One upstream registry: its URL, the model host it serves, and how to talk to it."""

    def __init__(
        self,
        url: str,
        host: str,
        agent: IAgent,
        clock: IReactorTime,
        timeout: float,
        username: str = "",
        password: str = "",
        token: str = "",
        via: str = "",
        retry: RetryPolicy | None = None,
        retried: Callable[[str], None] | None = None,
    ) -> None:
        """*retry* is the policy every request goes through (none: one try each); *retried* hears the
        kind of each failure retried (for the metrics)."""
        self.url = url.rstrip("/")
        self.host = host
        self.agent = agent
        self._clock = clock
        self._timeout = timeout
        self._basic = (
            b"Basic " + base64.b64encode(f"{username}:{password}".encode()) if username or password else None
        )
        if token:  # a fixed token stands in for Basic credentials (and for a token service's answer)
            self._basic = b"Bearer " + token.encode("latin-1")
        self._via = via.encode("latin-1")  # marks our requests, so that one coming back is seen as a loop
        self._tokens: dict[str, bytes] = {}  # scope -> "Bearer ..." header value
        self._resolved: dict[str, tuple[str, float]] = {}  # digest -> (blob URL elsewhere, when resolved)
        self.user_agent = f"ollama-mirror/{__version__}"
        self._retry = retry or RetryPolicy(clock, 0, 0.0)
        self._retried = retried

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """*attempt* under the retry policy (see :mod:`ollama_mirror.upstream.retry`)."""

        def heard(error: Exception) -> None:
            if self._retried is not None and isinstance(error, UpstreamError):
                self._retried(error.kind)

        return await self._retry.run(f"upstream {self.url}: {what}", attempt, heard)

    # --- requests ------------------------------------------------------------------------------

    async def _send(self, method: str, url: str, headers: dict[bytes, list[bytes]]) -> IResponse:
        """One request; ``timeout`` bounds the wait for response headers, never the body.

        A plain ``Agent`` rather than treq: treq always asks for gzip and decodes it, and a blob
        range must arrive as the exact bytes asked for.
        """
        headers.setdefault(b"user-agent", [self.user_agent.encode()])
        headers.setdefault(b"accept-encoding", [b"identity"])
        if self._via:
            headers[b"via"] = [self._via]
        d = self.agent.request(method.encode("ascii"), url.encode("ascii"), Headers(headers), None)
        # A timeout that fires after the request went out fails the Agent with ResponseNeverReceived
        # (not CancelledError): say it was the clock, whatever the cancellation turned into.
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=as_timeout)
        try:
            response: IResponse = await d
        except NETWORK_ERRORS as e:
            raise _network_error(url, e, self._timeout) from None
        if response.code == LOOP_STATUS and response.headers.hasHeader(LOOP_HEADER):
            await discard(response)
            raise UpstreamError(
                f"request loop: upstream {self.host} ({_origin(url)}) leads back to this mirror; give it an "
                "address override that reaches the real registry (upstream.address, or address in "
                "upstream.hosts)",
                LOOP_STATUS,
                kind="loop",
            )
        return response

    async def _authorized(
        self, method: str, url: str, scope: str, headers: dict[bytes, list[bytes]]
    ) -> IResponse:
        """Send to the registry itself, answering one 401 challenge (Basic or Bearer token)."""
        auth = self._tokens.get(scope) or self._basic
        if auth:
            headers[b"authorization"] = [auth]
        response = await self._send(method, url, dict(headers))
        if response.code != 401:
            return response
        challenge = (response.headers.getRawHeaders(b"www-authenticate") or [b""])[0].decode("latin-1")
        await discard(response)
        scheme, params = _challenge_params(challenge)
        if scheme == "bearer" and "realm" in params:
            token = await self._token(params, scope)
            self._tokens[scope] = token
            headers[b"authorization"] = [token]
        elif scheme == "basic" and self._basic and not auth:
            headers[b"authorization"] = [self._basic]
        else:
            raise UpstreamError(f"upstream {self.url} refused our credentials (401)", 401)
        response = await self._send(method, url, dict(headers))
        if response.code == 401:
            await discard(response)
            raise UpstreamError(f"upstream {self.url} refused our credentials (401)", 401)
        return response

    async def _token(self, params: dict[str, str], scope: str) -> bytes:
        """Fetch a bearer token from the challenge's realm (with Basic credentials, if we have any)."""
        query = {
            k: v
            for k, v in (("service", params.get("service")), ("scope", params.get("scope") or scope))
            if v
        }
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        headers: dict[bytes, list[bytes]] = {}
        if self._basic:
            headers[b"authorization"] = [self._basic]
        response = await self._send("GET", url, headers)
        body = await read_small(response, 64 * 1024, self._clock, self._timeout)
        if response.code != 200:
            raise _answered(response, f"token service {realm} answered {response.code}")
        try:
            document = json.loads(body)
            token = document.get("token") or document["access_token"]
        except (ValueError, KeyError, AttributeError, TypeError):
            raise UpstreamError(f"token service {realm} sent no token") from None
        return b"Bearer " + str(token).encode("ascii")

    # --- manifests -----------------------------------------------------------------------------

    async def manifest(
        self,
        repository: str,
        reference: str,
        accept: list[str] | None = None,
        user_agent: str | None = None,
        patient: bool = True,
    ) -> FetchedManifest:
        """GET a manifest; raises :class:`UpstreamError` (status 404 when the upstream has none).

        Not *patient*: one try, no retries (a cached copy is there to serve if the upstream has trouble).
        """
        if not patient:
            return await self._manifest_once(repository, reference, accept, user_agent)
        return await self._retrying(
            f"manifest {repository}:{reference}",
            lambda: self._manifest_once(repository, reference, accept, user_agent),
        )

    async def _manifest_once(
        self, repository: str, reference: str, accept: list[str] | None, user_agent: str | None
    ) -> FetchedManifest:
        types = list(dict.fromkeys([*DEFAULT_ACCEPT, *(accept or [])]))
        headers = {b"accept": [", ".join(types).encode()]}
        headers.update(_agent(user_agent))
        url = f"{self.url}/v2/{repository}/manifests/{reference}"
        scope = f"repository:{repository}:pull"
        response = await self._authorized("GET", url, scope, dict(headers))
        response, url = await self._follow(response, url, scope, headers)
        if response.code != 200:
            await discard(response)
            raise _answered(
                response, f"upstream {self.url} answered {response.code} for {repository}:{reference}"
            )
        data = await read_small(response, MAX_MANIFEST_BYTES, self._clock, self._timeout)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        advertised = (response.headers.getRawHeaders(b"docker-content-digest") or [b""])[0].decode("latin-1")
        if advertised.startswith("sha256:") and advertised.strip() != digest:  # damaged on its way: again
            raise UpstreamError(
                f"upstream {self.url} sent a manifest for {repository}:{reference} that does not match its "
                f"Docker-Content-Digest {advertised.strip()}",
                502,
                kind="protocol",
            )
        return FetchedManifest(data, media_type_of(data, content_type), digest)

    # --- blobs ---------------------------------------------------------------------------------

    def _blob_url(self, repository: str, digest: str) -> str:
        return f"{self.url}/v2/{repository}/blobs/{digest}"

    async def blob_size(self, repository: str, digest: str, user_agent: str | None = None) -> int:
        """The exact size of a blob, by HEAD (or a one-byte ranged GET where HEAD is redirected)."""
        return await self._retrying(
            f"size of blob {digest}", lambda: self._blob_size_once(repository, digest, user_agent)
        )

    async def _blob_size_once(self, repository: str, digest: str, user_agent: str | None) -> int:
        url = self._blob_url(repository, digest)
        response = await self._authorized("HEAD", url, f"repository:{repository}:pull", _agent(user_agent))
        await discard(response)
        if response.code == 200:
            length = response.headers.getRawHeaders(b"content-length")
            if length and length[0].isdigit():
                return int(length[0])
        elif response.code not in (301, 302, 303, 307, 308):
            raise _answered(response, f"upstream {self.url} answered {response.code} for blob {digest}")
        response = await self._open_range_once(repository, digest, 0, 0, user_agent)
        await discard(response)
        total = content_range_total(response)
        if response.code != 206 or total is None:
            raise UpstreamError(
                f"upstream {self.url} gave no size for blob {digest} ({response.code})", response.code
            )
        return total

    async def open_range(
        self, repository: str, digest: str, start: int, end: int | None, user_agent: str | None = None
    ) -> IResponse:
        """Start a GET of ``bytes=start-end`` of a blob and return the response, body unread.

        The answer is 206 (or 200 from an upstream that ignores ranges); any other status raises
        :class:`UpstreamError`.  Redirects are followed here; credentials stay with the registry.
        """
        return await self._retrying(
            f"blob {digest} bytes {start}-{'' if end is None else end}",
            lambda: self._open_range_once(repository, digest, start, end, user_agent),
        )

    async def _open_range_once(
        self, repository: str, digest: str, start: int, end: int | None, user_agent: str | None
    ) -> IResponse:
        range_header = f"bytes={start}-{'' if end is None else end}".encode()
        headers = {b"range": [range_header], **_agent(user_agent)}
        resolved = self._resolved.get(digest)
        if resolved is not None and self._clock.seconds() - resolved[1] < _RESOLVED_URL_LIFETIME:
            response = await self._send("GET", resolved[0], dict(headers))
            if response.code not in _EXPIRED_STATUSES:
                return await self._expect_body(response, resolved[0])
            await discard(response)
            log.info(
                "blob URL for {digest} expired ({code}); resolving again", digest=digest, code=response.code
            )
        self._resolved.pop(digest, None)
        url = self._blob_url(repository, digest)
        scope = f"repository:{repository}:pull"
        response = await self._authorized("GET", url, scope, dict(headers))
        response, final = await self._follow(response, url, scope, headers)
        if _origin(final) != _origin(url):  # storage elsewhere (presigned): remember while it works
            self._resolved[digest] = (final, self._clock.seconds())
        return await self._expect_body(response, final)

    async def _follow(
        self, response: IResponse, url: str, scope: str, headers: dict[bytes, list[bytes]]
    ) -> tuple[IResponse, str]:
        """Follow redirects (registry.ollama.ai's 307s, hf.co's 302s) to the answer and its URL.

        Credentials go only to the registry's own origin, never to the storage a blob lives on.
        """
        registry_origin = _origin(url)
        for _ in range(MAX_REDIRECTS):
            if response.code not in (301, 302, 303, 307, 308):
                return response, url
            location = (response.headers.getRawHeaders(b"location") or [b""])[0].decode("latin-1")
            await discard(response)
            if not location:
                raise UpstreamError(f"upstream {url} redirected without a Location", response.code)
            url = urljoin(url, location)
            sent = dict(headers)
            if _origin(url) == registry_origin:
                auth = self._tokens.get(scope) or self._basic
                if auth:
                    sent[b"authorization"] = [auth]
            response = await self._send("GET", url, sent)
        await discard(response)
        raise UpstreamError(f"upstream {self.url} redirected more than {MAX_REDIRECTS} times")

    async def _expect_body(self, response: IResponse, url: str) -> IResponse:
        if response.code in (200, 206):
            return response
        await discard(response)
        raise _answered(response, f"upstream {_origin(url)} answered {response.code} for a blob")


def _answered(response: IResponse, message: str) -> UpstreamError:
    """An upstream answer that is not the one asked for, with its status and its ``Retry-After``."""
    retry_after = parse_retry_after((response.headers.getRawHeaders(b"retry-after") or [None])[0])
    return UpstreamError(message, response.code, retry_after=retry_after)


def _agent(user_agent: str | None) -> dict[bytes, list[bytes]]:
    """The ``User-Agent`` header of a request made for a client (none: the mirror's own)."""
    return {b"user-agent": [user_agent.encode("latin-1", "replace")]} if user_agent else {}


class AsClient:
    """An upstream seen through one client's ``User-Agent``, for what is fetched on that client's behalf
    (registry.ollama.ai may refuse an Ollama too old for a model: it must judge the client's version),
    without changing the upstream that every request shares."""

    def __init__(self, upstream: Upstream, user_agent: str | None) -> None:
        self.upstream = upstream
        self.user_agent = user_agent

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse:
        return await self.upstream.open_range(repository, digest, start, end, self.user_agent)

    async def blob_size(self, repository: str, digest: str) -> int:
        return await self.upstream.blob_size(repository, digest, self.user_agent)


def ollama_agent(user_agent: str | None) -> str | None:
    """A client's ``User-Agent`` worth forwarding upstream: an Ollama's (``ollama/0.32.15 ...``)."""
    return user_agent if user_agent and user_agent.startswith("ollama/") else None


def as_timeout(result: Any, timeout: float) -> Any:
    """``addTimeout``'s *onTimeoutCancel*: a request cut short by its timeout failed by timing out (an
    Agent whose request went out fails with ``ResponseNeverReceived``, not ``CancelledError``)."""
    if isinstance(result, Failure):
        return Failure(TimeoutError(timeout))
    return result


def network_reason(error: BaseException | None) -> str:
    """A network failure in words (``ResponseFailed`` holds a list of Failures, whose repr is no reason)."""
    if isinstance(error, ResponseFailed):
        reasons = [
            f"TLS failed: {_tls_reason(r.value)}"
            if isinstance(r.value, SSLError)
            else r.getErrorMessage() or type(r.value).__name__
            for r in error.reasons
            if not isinstance(r.value, CancelledError)
        ]
        return ", ".join(reasons) or "connection lost"
    return str(error) or type(error).__name__ if error is not None else "unknown error"


def _network_error(url: str, error: Exception, timeout: float | None = None) -> UpstreamError:
    if isinstance(error, CancelledError | TimeoutError):
        within = f" within {timeout:g} s (upstream.timeout)" if timeout is not None else " in time"
        return UpstreamError(f"upstream {_origin(url)} did not answer{within}", kind="timeout")
    if isinstance(error, ResponseFailed):
        return UpstreamError(f"upstream {_origin(url)} failed: {network_reason(error)}")
    return UpstreamError(f"upstream {_origin(url)} is unreachable: {error}")


def _tls_reason(error: SSLError) -> str:
    """The readable part of an OpenSSL error list (e.g. ``certificate verify failed``)."""
    reasons = [str(part[2]) for part in (error.args[0] if error.args else []) if isinstance(part, tuple)]
    return ", ".join(reasons) or str(error)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def media_type_of(data: bytes, content_type: str) -> str:
    """The Content-Type a manifest is served with: its own ``mediaType`` (what a registry answers for
    it; registry.ollama.ai's ``text/plain`` is not a manifest type), else the upstream's header when it
    names a manifest type, else what its shape says: a manifest without ``mediaType`` is OCI (Docker's
    schema 2 requires the field), an index when it lists ``manifests``.  A cached manifest (no header)
    is thus served with the type its registry gave it."""
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return content_type.split(";", maxsplit=1)[0].strip() or MANIFEST_V2
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = content_type.split(";", maxsplit=1)[0].strip()
    if header in MANIFEST_TYPES:
        return header
    if document.get("schemaVersion") == 2:
        return OCI_INDEX if "manifests" in document else OCI_MANIFEST
    return header or MANIFEST_V2


def content_range_total(response: IResponse) -> int | None:
    """The ``/total`` of a ``Content-Range: bytes a-b/total`` header."""
    header = (response.headers.getRawHeaders(b"content-range") or [b""])[0]
    match = re.fullmatch(rb"bytes (\d+)-(\d+)/(\d+)", header.strip())
    return int(match.group(3)) if match else None


def content_range_start(response: IResponse) -> int | None:
    header = (response.headers.getRawHeaders(b"content-range") or [b""])[0]
    match = re.fullmatch(rb"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    return int(match.group(1)) if match else None


async def read_small(
    response: IResponse, limit: int, clock: IReactorTime | None = None, timeout: float = 0
) -> bytes:
    """Read a body that should be small; more than *limit* bytes, or (with a *clock*) a body that takes
    more than *timeout* seconds, is an upstream error."""
    try:
        return await collect_limited(response, limit, clock, timeout)
    except BodyTooSlow:
        raise UpstreamError(
            f"upstream sent a document too slowly (not within {timeout:g} s, upstream.timeout)", kind="idle"
        ) from None
    except ValueError:
        raise UpstreamError(
            f"upstream sent more than {limit} bytes where a small document was expected",
            kind="protocol",
            lasting=True,
        ) from None
    except NETWORK_ERRORS as e:
        raise UpstreamError(f"upstream failed while sending a document: {e}") from None


async def discard(response: IResponse) -> None:
    """Drop a body we don't want without leaving its connection stuck (it may go back to the pool)."""
    with contextlib.suppress(Exception):  # the body is unwanted: any failure only loses the connection
        await drain(response)
