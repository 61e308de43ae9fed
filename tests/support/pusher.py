"""A test pusher sending what the Go Ollama server sends for ``ollama push --insecure HOST:PORT/ns/m:tag``.

Where each step comes from in Ollama's sources (``server/images.go`` ``PushModel``, ``makeRequestWithRetry``,
``makeRequest``; ``server/upload.go`` ``uploadBlob``, ``blobUpload.Prepare``/``Run``/``uploadPart``;
``server/auth.go`` ``registryChallenge.URL``, ``getAuthorizationToken``; ``auth/auth.go`` ``Sign``):

1. **Order** (``PushModel``): the manifest's layers in order, then the config blob (skipped if its digest is
   empty), one blob after another; then the manifest. Nothing is sent in parallel except the parts of one
   blob after a ``307`` (below).
2. **HEAD** ``/v2/<ns>/<model>/blobs/<digest>`` (``uploadBlob`` through ``makeRequestWithRetry``, redirects
   followed). ``404`` = upload it; any other status below 400 (not only 200) = "already there", skip; ``401``
   = the token flow; another status >= 400 fails the push with ``<code>: <body>``.
3. **POST** ``/v2/<ns>/<model>/blobs/uploads/`` (``Prepare``, through ``makeRequestWithRetry``, no body, so
   Go sends ``Content-Length: 0``). When the layer has a ``From`` (it was taken from another local model by
   ``ollama create``), the query is ``from=<ns>%2F<model>&mount=sha256%3A<hex>``: Go's ``url.Values.Encode``
   sorts the keys and percent-encodes ``/`` and ``:``; ``from`` is ``ParseName(From).DisplayNamespaceModel()``
   (no host, no tag). ``201`` = mounted, done (no PATCH, no commit). Any other status below 400 (normally
   ``202``) = an upload session at ``Docker-Upload-Location``, else ``Location``; ``404`` fails with
   ``file does not exist``, other >= 400 with ``<code>: <body>``. The blob file is stat'ed *after* the POST.
4. **Location** is used as Go's ``url.Parse`` gives it, **not resolved** against the request URL: with
   ``--insecure`` the scheme is forced to ``http`` (``makeRequest``), so a relative Location becomes
   ``http:///v2/...`` and every PATCH fails with ``Patch "http:///v2/...": http: no Host in request URL``
   (retried 6 times, then ``max retries exceeded: ...``). An absolute ``https://`` Location is downgraded to
   ``http://`` on the same host and port (port 80 if it had none). The server must send absolute ``http``
   Locations. A missing Location behaves as an empty URL (``http:``), the same failure.
5. **Parts** (``Prepare``): part size = ``file size // 16`` clamped to [100 MB, 1000 MB] (``format.MegaByte``
   is 10**6), the last part shorter. There is no cap on the number of parts: up to 1.6 GB ``ceil(size /
   100 MB)`` <= 16 parts; up to 16 GB 16 parts (17 when ``size % 16`` leaves a remainder); above that
   ``ceil(size / 1000 MB)`` (a 40 GB blob has 40). A zero-byte blob has no part at all: the commit goes
   straight to the POST's Location.
6. **PATCH** ``<location>`` per part (``uploadPart`` through ``makeRequest``: *no* 401 retry there), headers
   ``Content-Type: application/octet-stream``, ``Content-Length: <part size>``, ``X-Redirect-Uploads: 1``,
   ``Content-Range: <first>-<last>`` (inclusive, no ``bytes `` prefix), the Ollama ``User-Agent``,
   ``Accept-Encoding: gzip`` (Go's transport) and ``Authorization: Bearer <token>`` once a token was got.
   The body is not re-sendable, so Go's client does *not* follow a 307/308 (it would follow 301/302/303 as a
   GET). Then:

   - status < 400 other than 307: the part is done; its answer's ``Docker-Upload-Location`` (else
     ``Location``) is the URL of the next PATCH, or of the commit after the last part, so parts go one after
     another. Every PATCH answer must carry that header.
   - ``307``: the next PATCH URL is taken from ``Docker-Upload-Location`` (else ``Location``: a server must
     therefore send both) and the next part starts at once; this part is sent again by **PUT** to
     ``Location`` (resolved against the PATCH URL) with only ``Content-Type``, ``Content-Length``,
     ``User-Agent`` and ``Accept-Encoding`` -- no token, no ``Content-Range``, no insecure downgrade
     (``uploadPart`` with an empty ``registryOptions``). A PUT answer >= 400 is retried up to 6 times.
     Up to 16 parts are then in flight at once (``errgroup.SetLimit(numUploadParts)``).
   - ``401``: a token is fetched (below) and kept, then the part fails with ``http status 401 Unauthorized:
     <body>`` and is retried like any failed part.
   - other >= 400: ``http status <code> <reason>: <body>`` (Go's ``resp.Status``).

   A failed part (network error or status >= 400) is retried on the same URL after 1 s, 2 s, 4 s, 8 s, 16 s,
   32 s (``maxRetries`` = 6 attempts, a sleep after each failure, the last included); then the push fails
   with ``max retries exceeded: <last error>``.

   The body of every PATCH must be read by the server, whatever it answers (307, 401, 4xx): answering and
   closing without reading makes Go's write fail (``write: broken pipe``, the answer unseen -- so a 401 never
   gets a new token) and the part is retried; answering without reading nor closing hangs Go (no timeout).
   This pusher always sends the whole body before it reads the answer and fails on a write error.
7. **Commit** (``Run``): ``PUT <last location>`` with the query re-encoded by ``url.Values.Encode`` (existing
   keys such as ``_state`` kept, keys sorted): ``_state=...&digest=sha256%3A<hex>&etag=<hex>-<n>``, where
   the etag is md5 over the concatenated *binary* md5 digests of the parts as sent, then ``-<number of
   parts>`` (``d41d8cd98f00b204e9800998ecf8427e-0`` for a zero-byte blob). Headers ``Content-Type:
   application/octet-stream``, ``Content-Length: 0``. Sent through ``makeRequestWithRetry`` (redirects
   followed, 401 → token, 404 → ``file does not exist``, >= 400 → ``<code>: <body>``); any status below 400
   is success (201 is not checked). A failed commit is retried 6 times with the same sleeps; the last error
   is the push's (not wrapped in "max retries exceeded").
8. **Manifest**: ``PUT /v2/<ns>/<model>/manifests/<tag>`` with ``Content-Type:
   application/vnd.docker.distribution.manifest.v2+json`` and the body ``json.Marshal(mf)``: Go parses the
   local manifest into its struct and marshals it again, so the bytes are compact JSON with only
   ``schemaVersion``, ``mediaType``, ``config``, ``layers`` and, per layer, ``mediaType``, ``digest``,
   ``size``, ``from`` and ``name`` (the last two when not empty; unknown fields are dropped). A layer taken
   from another model carries ``"from":"<that model's short name>"``. Any status below 400 is success; the
   response (``Docker-Content-Digest`` included) is not read.
9. **Auth** (``makeRequestWithRetry``): on a ``401`` the challenge ``WWW-Authenticate: Bearer realm="..",
   service="..",scope=".."`` is parsed and the **scope is the server's, verbatim** (Ollama never builds one;
   several space-separated scopes become several ``scope=`` values). The token URL (``registryChallenge.URL``:
   realm + ``nonce``, ``scope``, ``service``, ``ts``, keys sorted) must have exactly the host:port of the
   request that got the 401 (Ollama >= 0.14.3), else ``realm host "a" does not match original host "b"``. It
   is fetched by ``GET`` with ``Authorization: <base64 key blob>:<base64 signature of
   "GET,<token URL>,<base64(hex(sha256("")))>">`` (``auth.Sign``) and the Ollama ``User-Agent``; status >= 400
   fails with ``<code>: <body>``; an answer below 400 is ``{"token": "..."}`` (an empty token is accepted).
   The request is then sent once more with ``Authorization: Bearer <token>``; a second 401 fetches *another*
   token and fails the push with ``unauthorized: access denied``. The token is kept for every later
   registry request of the push (HEAD, POST, PATCH, commit, manifest) whatever their host; never on the
   redirected PUTs nor on the token request.
10. **Redirects** (Go's default ``http.Client``, ``CheckRedirect`` unset): at most 10; 301/302/303 turn
    anything but GET/HEAD into a body-less GET (dropping ``Content-Type``); 307/308 keep method and body
    when the body can be sent again (no body, or the manifest's bytes) and are not followed for a part's
    body; ``Authorization`` is dropped for a host that is neither the first request's host nor a subdomain
    of it; ``Referer`` is set to the previous URL.
11. **User-Agent** ``ollama/<version> (<arch> <os>) Go/<go version>`` on every request, the token request and
    the redirected part PUTs included (``makeRequest`` always sets it); ``Accept-Encoding: gzip`` on all but
    HEAD (Go's transport), ``Content-Length: 0`` on body-less POST/PUT.

Not emulated (so that a test can never hang or sleep for a minute): Go's requests have no timeout, here
``request_timeout`` bounds each socket operation; the sleeps are ``retry_backoff * 2**try`` (Go: 1 s *
2**try); Go reuses keep-alive connections, this pusher opens one connection per request and speaks
HTTP/1.1 only; a ``307`` answer to a redirected PUT (Go would recurse and may deadlock) is an error here;
no progress lines. Models with ``application/vnd.ollama.image.tensor`` layers (safetensors/MLX) are pushed by Go through the
separate ``x/transfer`` uploader (``pushWithTransfer``), which this module does not emulate.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import queue
import re
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from tests.support import models
from tests.support.models import BuiltModel, go_json
from tests.support.ollamakey import OllamaKey, parse_challenge, token_url
from tests.support.puller import (
    DEFAULT_USER_AGENT,
    GO_MAX_PART_SIZE,
    GO_MIN_PART_SIZE,
    MANIFEST_ACCEPT,
    MAX_REDIRECTS,
    ConnectTo,
    _connection,
    _describe,
    _hangup,
    _host_header,
    _target,
    compute_parts,
)

__all__ = [
    "DEFAULT_USER_AGENT",
    "EMPTY_ETAG",
    "ERR_MAX_RETRIES",
    "ERR_NOT_EXIST",
    "ERR_UNAUTHORIZED",
    "GO_MAX_PART_SIZE",
    "GO_MIN_PART_SIZE",
    "MANIFEST_CONTENT_TYPE",
    "MAX_RETRIES",
    "NUM_UPLOAD_PARTS",
    "BlobPush",
    "PartPush",
    "PushError",
    "PushResult",
    "RequestLog",
    "go_manifest",
    "namespace_model",
    "push",
    "upload_etag",
]

MANIFEST_CONTENT_TYPE = MANIFEST_ACCEPT
NUM_UPLOAD_PARTS = 16  # upload.go numUploadParts: the target number of parts and the errgroup limit
MAX_RETRIES = 6  # download.go maxRetries, shared by upload.go
EMPTY_ETAG = hashlib.md5(b"").hexdigest() + "-0"
OCTET_STREAM = "application/octet-stream"
SEND_CHUNK = 1024 * 1024
MAX_BODY = 1024 * 1024  # answers are read up to this size (error bodies, token responses)
QUEUE_POLL = 0.05

ERR_NOT_EXIST = "file does not exist"  # os.ErrNotExist, from makeRequestWithRetry on a 404
ERR_UNAUTHORIZED = "unauthorized: access denied"  # images.go errUnauthorized
ERR_MAX_RETRIES = "max retries exceeded"  # download.go errMaxRetriesExceeded

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_BODY_HEADERS = frozenset({"content-type", "content-encoding", "content-language", "content-location"})
_SENSITIVE_HEADERS = frozenset({"authorization", "www-authenticate", "cookie", "cookie2"})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

Step = Literal["head", "post", "patch", "redirect-put", "commit", "manifest", "token"]
Action = Literal["skipped", "mounted", "uploaded"]


class PushError(models.PushError):
    """The push failed; ``str()`` is the message the Ollama CLI prints after ``Error: ``.

    ``status`` and ``body`` are those of the HTTP answer the error came from, when one did.
    """

    def __init__(self, message: str, *, status: int | None = None, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class _NotExist(PushError):
    """``os.ErrNotExist`` from ``makeRequestWithRetry`` (a 404)."""


class _MaxRetries(PushError):
    """``errMaxRetriesExceeded``: not retried again by the part loop."""


class _BrokenTransport(http.client.HTTPException):
    """An answer Go's transport refuses (``net/http: HTTP/1.x transport connection broken: ...``)."""


class _Cancelled(Exception):
    """Another part failed: stop waiting (Go's ``inner.Done()``)."""


@dataclass
class RequestLog:
    """One HTTP exchange (one entry per redirect hop) as the pusher sent it and saw its answer.

    ``request_headers`` are the headers sent (``Host`` included); ``response_headers`` are lower-cased.
    """

    method: str
    url: str
    step: Step
    status: int | None
    request_headers: dict[str, str]
    response_headers: dict[str, str]
    bytes_sent: int
    elapsed: float
    digest: str | None = None
    part: int | None = None
    error: str | None = None

    def header(self, name: str) -> str | None:
        """A request header by name, case-insensitively."""
        lowered = name.lower()
        return next((v for k, v in self.request_headers.items() if k.lower() == lowered), None)


@dataclass
class PartPush:
    """One part of a blob upload: its span, the URL it was PATCHed to, and how it went."""

    index: int
    offset: int
    size: int
    url: str = ""
    md5: bytes | None = None  # binary md5 of the bytes last sent for this part (PATCH, or the redirected PUT)
    attempts: int = 0
    statuses: list[int] = field(default_factory=list)
    redirected_to: str | None = None


@dataclass
class BlobPush:
    """What happened to one blob: skipped (HEAD said it is there), mounted (POST 201) or uploaded."""

    digest: str
    size: int
    media_type: str
    action: Action
    mount_from: str | None = None  # the ``from`` query value (ns/model) when a mount was asked for
    location: str | None = None  # the upload session URL of the POST's answer
    parts: list[PartPush] = field(default_factory=list)
    commit_url: str | None = None
    etag: str | None = None


@dataclass
class PushResult:
    """Everything a test may want to assert about a push."""

    manifest_bytes: bytes  # what was PUT (Go's json.Marshal of the manifest)
    manifest_digest: str  # sha256 of those bytes
    manifest_url: str
    manifest_status: int
    manifest_headers: dict[str, str]
    blobs: list[BlobPush]
    requests: list[RequestLog]
    token_requests: int
    elapsed: float

    @property
    def uploaded(self) -> list[str]:
        return [b.digest for b in self.blobs if b.action == "uploaded"]

    @property
    def skipped(self) -> list[str]:
        return [b.digest for b in self.blobs if b.action == "skipped"]

    @property
    def mounted(self) -> list[str]:
        return [b.digest for b in self.blobs if b.action == "mounted"]

    def blob(self, digest: str) -> BlobPush:
        for blob in self.blobs:
            if blob.digest == digest:
                return blob
        raise KeyError(digest)

    def requests_for(
        self, *, method: str | None = None, step: Step | None = None, digest: str | None = None
    ) -> list[RequestLog]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (step is None or r.step == step)
            and (digest is None or r.digest == digest)
        ]


# ----------------------------------------------------------------------------------------------------
# Go's names, URLs, manifests and etags


def namespace_model(name: str) -> str:
    """``model.ParseName(name).DisplayNamespaceModel()``: ``llama3:latest`` → ``library/llama3``,
    ``host:5000/ns/m:tag`` → ``ns/m`` (defaults: namespace ``library``)."""
    rest = name
    for prefix in ("http://", "https://"):
        rest = rest.removeprefix(prefix)
    rest = rest.split("@", 1)[0]
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:
        rest = rest[:colon]
    parts = rest.split("/")
    if len(parts) == 1:
        return f"library/{parts[0]}"
    return f"{parts[-2]}/{parts[-1]}"


def _go_layer(layer: Any, from_name: str | None) -> dict[str, Any]:
    """A ``manifest.Layer`` as Go marshals it (``from`` and ``name`` omitted when empty)."""
    data = layer if isinstance(layer, dict) else {}
    out: dict[str, Any] = {
        "mediaType": str(data.get("mediaType") or ""),
        "digest": str(data.get("digest") or ""),
        "size": int(data.get("size") or 0),
    }
    frm = from_name or str(data.get("from") or "")
    if frm:
        out["from"] = frm
    name = str(data.get("name") or "")
    if name:
        out["name"] = name
    return out


def go_manifest(manifest: bytes, from_names: Mapping[str, str] | None = None) -> bytes:
    """The bytes ``PushModel`` PUTs: ``json.Marshal`` of the local manifest parsed into Go's struct.

    ``from_names`` maps a layer digest to the ``From`` Ollama recorded for it (the short name of the model
    the layer was taken from, e.g. ``src:latest``). A manifest written by ``ollama create`` (and by
    :func:`tests.support.models.build_model`) comes back byte for byte when no ``from`` is added.
    """
    data = json.loads(manifest)
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a JSON object")
    names = dict(from_names or {})
    layers = data.get("layers")
    config = data.get("config")
    out = {
        "schemaVersion": int(data.get("schemaVersion") or 0),
        "mediaType": str(data.get("mediaType") or ""),
        "config": _go_layer(
            config, names.get(config.get("digest", "")) if isinstance(config, dict) else None
        ),
        # A nil slice marshals as null.
        "layers": None
        if layers is None
        else [
            _go_layer(lay, names.get(lay.get("digest", "")) if isinstance(lay, dict) else None)
            for lay in layers
        ],
    }
    return go_json(out)


def upload_etag(part_md5s: list[bytes]) -> str:
    """``Run``'s etag: md5 over the parts' binary md5 digests, hex, then ``-<number of parts>``."""
    composite = hashlib.md5()
    for digest in part_md5s:
        composite.update(digest)
    return f"{composite.hexdigest()}-{len(part_md5s)}"


def _go_op(method: str) -> str:
    """``urlErrorOp``: ``PATCH`` → ``Patch``."""
    return method[:1] + method[1:].lower()


def _go_url_string(scheme: str, netloc: str, path: str, query: str, fragment: str) -> str:
    """``url.URL.String()`` for these parts (``http:///v2/x`` for a host-less URL with a scheme)."""
    out = ""
    if scheme:
        out += scheme + ":"
    if scheme or netloc:
        if netloc or path:
            out += "//"
        out += netloc
    if netloc and path and not path.startswith("/"):
        out += "/"
    out += path
    if query:
        out += "?" + query
    if fragment:
        out += "#" + fragment
    return out


def _go_request_url(raw: str, method: str, *, insecure: bool) -> str:
    """The URL ``makeRequest`` sends for ``url.Parse(raw)``, or the error ``http.Client.Do`` returns."""
    parts = urlsplit(raw)
    scheme = parts.scheme
    if insecure and scheme != "http":
        scheme = "http"
    rendered = _go_url_string(scheme, parts.netloc, parts.path, parts.query, parts.fragment)
    if scheme not in ("http", "https"):
        raise PushError(f'{_go_op(method)} "{rendered}": unsupported protocol scheme "{scheme}"')
    if not parts.hostname:
        raise PushError(f'{_go_op(method)} "{rendered}": http: no Host in request URL')
    return rendered


def _with_query(raw: str, added: list[tuple[str, str]]) -> str:
    """``values := u.Query(); values.Add(...); u.RawQuery = values.Encode()``: keys sorted, values escaped."""
    parts = urlsplit(raw)
    values = parse_qsl(parts.query, keep_blank_values=True)
    values.extend(added)
    values.sort(key=lambda kv: kv[0])  # stable: values of one key keep their order
    return _go_url_string(parts.scheme, parts.netloc, parts.path, urlencode(values), parts.fragment)


def _same_domain_or_sub(dest: str, initial: str) -> bool:
    """``isDomainOrSubdomain``: whether auth headers may follow a redirect from ``initial`` to ``dest``."""
    return dest == initial or dest.endswith("." + initial)


def _referer(previous: str, new: str) -> str | None:
    """``refererForURL``: the previous URL without user info, unless https → http."""
    prev, nxt = urlsplit(previous), urlsplit(new)
    if prev.scheme == "https" and nxt.scheme == "http":
        return None
    netloc = prev.netloc.rsplit("@", 1)[-1]
    return urlunsplit((prev.scheme, netloc, prev.path, prev.query, ""))


# ----------------------------------------------------------------------------------------------------
# HTTP plumbing


@dataclass
class _Body:
    """A request body: bytes (re-sendable, like Go's ``bytes.Reader``) or a section of a file (not)."""

    data: bytes | None = None
    path: Path | None = None
    offset: int = 0
    size: int = 0

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.size

    @property
    def resendable(self) -> bool:
        return self.data is not None


@dataclass
class _Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-cased
    body: bytes
    url: str  # the URL of the last hop
    sent_md5: bytes  # md5 of the body bytes sent on the first hop

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    @property
    def status_line(self) -> str:
        """Go's ``resp.Status``: ``400 Bad Request``."""
        return f"{self.status} {self.reason}".strip()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _Log:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[RequestLog] = []

    def add(self, entry: RequestLog) -> None:
        with self._lock:
            self._entries.append(entry)

    def entries(self) -> list[RequestLog]:
        with self._lock:
            return list(self._entries)


class _Pusher:
    """One ``PushModel`` call: its options, its token (``registryOptions.Token``) and its request log."""

    def __init__(
        self,
        *,
        insecure: bool,
        key: OllamaKey | None,
        user_agent: str,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        connect_to: ConnectTo | None,
        max_retries: int,
        retry_backoff: float,
        max_parallel_parts: int,
        part_size_min: int,
        part_size_max: int,
    ) -> None:
        self.insecure = insecure
        self.part_size_min = part_size_min
        self.part_size_max = part_size_max
        self.key = key
        self.user_agent = user_agent
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.connect_to = connect_to
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.max_parallel_parts = max_parallel_parts
        self.token = ""
        self.token_requests = 0
        self._token_lock = threading.Lock()
        self.log = _Log()

    # -- one request, as Go's http.Client sends it -----------------------------------------------------

    def _send_once(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: _Body | None,
    ) -> tuple[int, str, dict[str, str], bytes, int, bytes]:
        """Send one request; (status, reason, headers, body, bytes sent, md5 of bytes sent)."""
        conn = _connection(url, self.timeout, self.ssl_context, self.connect_to)
        md5 = hashlib.md5()
        sent = 0
        try:
            conn.connect()
            conn.putrequest(method, _target(url), skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            # A write error is the request's error, even if the server answered before it stopped reading
            # and closed: Go's transport then fails too ("write: broken pipe"), most of the time.
            if body is not None and body.data is not None:
                conn.send(body.data)
                md5.update(body.data)
                sent = len(body.data)
            elif body is not None and body.path is not None and body.size > 0:
                with body.path.open("rb") as fh:
                    fh.seek(body.offset)
                    remaining = body.size
                    while remaining > 0:
                        chunk = fh.read(min(SEND_CHUNK, remaining))
                        if not chunk:
                            raise PushError(f"{body.path}: unexpected end of file")
                        conn.send(chunk)
                        md5.update(chunk)
                        sent += len(chunk)
                        remaining -= len(chunk)
            resp = conn.getresponse()
            lengths = [v.strip() for v in resp.msg.get_all("Content-Length") or []]
            if len(set(lengths)) > 1:
                got = " ".join(json.dumps(v) for v in lengths)
                raise _BrokenTransport(
                    f"http: message cannot contain multiple Content-Length headers; got [{got}]"
                )
            status, reason = resp.status, resp.reason
            response_headers = {k.lower(): v for k, v in resp.getheaders()}
            data = b"" if method == "HEAD" else resp.read(MAX_BODY)
            if response_headers.get("content-encoding", "").lower() == "gzip" and data:
                with contextlib.suppress(OSError, EOFError):
                    data = gzip.decompress(data)  # Go asked for gzip, so it decodes it transparently
            return status, reason, response_headers, data, sent, md5.digest()
        finally:
            _hangup(conn, conn.sock)

    def request(
        self,
        method: str,
        raw_url: str,
        headers: Mapping[str, str],
        body: _Body | None,
        *,
        step: Step,
        registry: bool = True,
        digest: str | None = None,
        part: int | None = None,
        go_method: str | None = None,
    ) -> _Response:
        """``makeRequest``: the registry token and insecure downgrade (when ``registry``), the Ollama
        User-Agent, then Go's ``http.Client.Do`` with its default redirect policy."""
        url = _go_request_url(raw_url, go_method or method, insecure=self.insecure and registry)
        extra: dict[str, str] = dict(headers)
        if registry and self.token:
            extra["Authorization"] = "Bearer " + self.token
        initial_host = urlsplit(url).hostname or ""
        strip_sensitive = False
        strip_body_headers = False
        first_md5 = b""
        previous: str | None = None
        hops = 0
        while True:
            length = 0 if body is None else body.length
            lines: list[tuple[str, str]] = [("Host", _host_header(url)), ("User-Agent", self.user_agent)]
            if length > 0 or method in ("POST", "PUT", "PATCH"):
                lines.append(("Content-Length", str(length)))
            for name in sorted(extra, key=str.lower):
                lowered = name.lower()
                if lowered in ("content-length", "user-agent", "host"):
                    continue
                if strip_sensitive and lowered in _SENSITIVE_HEADERS:
                    continue
                if strip_body_headers and lowered in _BODY_HEADERS:
                    continue
                lines.append((name, extra[name]))
            if previous is not None:
                referer = _referer(previous, url)
                if referer:
                    lines.append(("Referer", referer))
            if method != "HEAD":
                lines.append(("Accept-Encoding", "gzip"))
            started = time.monotonic()
            try:
                status, reason, response_headers, data, sent, md5 = self._send_once(method, url, lines, body)
            except (OSError, http.client.HTTPException) as exc:
                reason_text = _describe(exc)
                if isinstance(exc, _BrokenTransport):
                    reason_text = f"net/http: HTTP/1.x transport connection broken: {exc}"
                message = f'{_go_op(method)} "{url}": {reason_text}'
                self.log.add(
                    RequestLog(
                        method,
                        url,
                        step,
                        None,
                        dict(lines),
                        {},
                        0,
                        time.monotonic() - started,
                        digest,
                        part,
                        message,
                    )
                )
                raise PushError(message) from exc
            if hops == 0:
                first_md5 = md5
            self.log.add(
                RequestLog(
                    method,
                    url,
                    step,
                    status,
                    dict(lines),
                    response_headers,
                    sent,
                    time.monotonic() - started,
                    digest,
                    part,
                )
            )
            location = response_headers.get("location", "")
            if status not in _REDIRECT_CODES or not location:
                return _Response(status, reason, response_headers, data, url, first_md5)
            if status in (307, 308) and body is not None and not body.resendable and body.length != 0:
                return _Response(status, reason, response_headers, data, url, first_md5)
            hops += 1
            if hops > MAX_REDIRECTS:
                raise PushError(f'{_go_op(method)} "{location}": stopped after {MAX_REDIRECTS} redirects')
            new_url = urljoin(url, location)
            if status in (301, 302, 303):
                if method not in ("GET", "HEAD"):
                    method = "GET"
                body = None
                strip_body_headers = True
            new_host = urlsplit(new_url).hostname or ""
            if not _same_domain_or_sub(new_host, initial_host):
                strip_sensitive = True
            previous, url = url, new_url

    # -- makeRequestWithRetry and the token -------------------------------------------------------------

    def fetch_token(
        self, challenge_header: str, original_host: str, *, digest: str | None = None, part: int | None = None
    ) -> str:
        """``getAuthorizationToken``: the signed token request for the server's challenge."""
        challenge = parse_challenge(challenge_header)
        url = token_url(
            {
                "realm": challenge.get("realm", ""),
                "service": challenge.get("service", ""),
                "scope": challenge.get("scope", ""),
            }
        )
        realm_host = urlsplit(url).netloc
        if realm_host != original_host:
            raise PushError(f'realm host "{realm_host}" does not match original host "{original_host}"')
        if self.key is None:
            raise PushError(
                "unauthorized: the registry asked for a token and no key was given "
                "(Go: open ~/.ollama/id_ed25519: no such file or directory)"
            )
        with self._token_lock:
            self.token_requests += 1
        resp = self.request(
            "GET",
            url,
            {"Authorization": self.key.token_request_authorization(url)},
            None,
            step="token",
            registry=False,
            digest=digest,
            part=part,
        )
        if resp.status >= 400:
            message = f"{resp.status}: {resp.text}" if resp.body else str(resp.status)
            raise PushError(message, status=resp.status, body=resp.body)
        try:
            token = json.loads(resp.body).get("token", "")
        except (ValueError, AttributeError) as exc:
            raise PushError(f"token response: {exc}", status=resp.status, body=resp.body) from exc
        return str(token or "")

    def with_retry(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: _Body | None,
        *,
        step: Step,
        digest: str | None = None,
    ) -> _Response:
        """``makeRequestWithRetry``: one more try after a 401 (with a fresh token); 404 and >= 400 fail."""
        for _ in range(2):
            resp = self.request(method, url, headers, body, step=step, digest=digest)
            if resp.status == 401:
                self.token = self.fetch_token(
                    resp.header("WWW-Authenticate"), urlsplit(url).netloc, digest=digest
                )
                continue
            if resp.status == 404:
                raise _NotExist(ERR_NOT_EXIST, status=404, body=resp.body)
            if resp.status >= 400:
                raise PushError(f"{resp.status}: {resp.text}", status=resp.status, body=resp.body)
            return resp
        raise PushError(ERR_UNAUTHORIZED, status=401)

    def sleep(self, attempt: int) -> None:
        delay = self.retry_backoff * (2**attempt)
        if delay > 0:
            time.sleep(delay)

    # -- one blob ---------------------------------------------------------------------------------------

    def upload_part(
        self,
        method: str,
        url: str,
        part: PartPush,
        path: Path,
        digest: str,
        next_urls: queue.Queue[str],
        cancelled: threading.Event,
    ) -> None:
        """``blobUpload.uploadPart``: one PATCH (or, after a 307, one PUT to the redirect target)."""
        headers = {"Content-Type": OCTET_STREAM, "Content-Length": str(part.size)}
        if method == "PATCH":
            headers["X-Redirect-Uploads"] = "1"
            headers["Content-Range"] = f"{part.offset}-{part.offset + part.size - 1}"
        registry = method == "PATCH"  # the redirected PUT gets an empty registryOptions
        part.attempts += 1
        resp = self.request(
            method,
            url,
            headers,
            _Body(path=path, offset=part.offset, size=part.size),
            step="patch" if registry else "redirect-put",
            registry=registry,
            digest=digest,
            part=part.index,
        )
        part.statuses.append(resp.status)
        next_url = resp.header("Docker-Upload-Location") or resp.header("Location")
        if resp.status == 307:
            if method != "PATCH":
                raise PushError(f"307 answer to the redirected PUT of part {part.index}: not emulated")
            _put(next_urls, next_url, cancelled)
            location = resp.header("Location")
            if not location:
                raise PushError("http: no Location header in response")
            redirect = urljoin(resp.url, location)
            part.redirected_to = redirect
            self.upload_with_retries("PUT", redirect, part, path, digest, next_urls, cancelled)
            return
        if resp.status == 401:
            token = self.fetch_token(
                resp.header("WWW-Authenticate"), urlsplit(url).netloc, digest=digest, part=part.index
            )
            if registry:
                self.token = token
        if resp.status >= 400:
            raise PushError(
                f"http status {resp.status_line}: {resp.text}", status=resp.status, body=resp.body
            )
        if method == "PATCH":
            _put(next_urls, next_url, cancelled)
        part.md5 = resp.sent_md5

    def run_part(
        self,
        url: str,
        part: PartPush,
        path: Path,
        digest: str,
        next_urls: queue.Queue[str],
        cancelled: threading.Event,
    ) -> None:
        """The goroutine ``Run`` starts per part: up to ``maxRetries`` PATCH attempts with sleeps."""
        part.url = url
        self.upload_with_retries("PATCH", url, part, path, digest, next_urls, cancelled)

    def upload_with_retries(
        self,
        method: str,
        url: str,
        part: PartPush,
        path: Path,
        digest: str,
        next_urls: queue.Queue[str],
        cancelled: threading.Event,
    ) -> None:
        """Go's retry loop, the same for a part's PATCH and for the PUT of its redirect: up to
        ``maxRetries`` attempts with sleeps between them."""
        error: PushError | None = None
        for attempt in range(self.max_retries):
            if cancelled.is_set():
                raise _Cancelled()
            try:
                self.upload_part(method, url, part, path, digest, next_urls, cancelled)
            except _MaxRetries:
                raise
            except PushError as exc:
                error = exc
                self.sleep(attempt)
                continue
            return
        assert error is not None
        raise _MaxRetries(f"{ERR_MAX_RETRIES}: {error}", status=error.status, body=error.body)

    def upload_blob(
        self, base: str, repo: str, layer: Mapping[str, Any], path: Path, mount_from: str | None
    ) -> BlobPush:
        """``uploadBlob``: HEAD, then ``Prepare`` (POST) and ``Run`` (parts, commit)."""
        digest, media_type = str(layer["digest"]), str(layer["mediaType"])
        blob_url = f"{base}/v2/{repo}/blobs/{digest}"
        try:
            self.with_retry("HEAD", blob_url, {}, None, step="head", digest=digest)
        except _NotExist:
            pass
        else:
            return BlobPush(digest, int(layer["size"]), media_type, "skipped")

        post_url = f"{base}/v2/{repo}/blobs/uploads/"
        mount_name = namespace_model(mount_from) if mount_from else None
        if mount_name is not None:
            post_url = _with_query(post_url, [("mount", digest), ("from", mount_name)])
        resp = self.with_retry("POST", post_url, {}, None, step="post", digest=digest)
        location = resp.header("Docker-Upload-Location") or resp.header("Location")
        try:
            total = path.stat().st_size
        except OSError as exc:
            raise PushError(f"stat {path}: {exc.strerror or exc}") from exc
        result = BlobPush(digest, total, media_type, "uploaded", mount_from=mount_name, location=location)
        if resp.status == 201:
            result.action = "mounted"
            return result

        result.parts = [
            PartPush(i, offset, size)
            for i, (offset, size) in enumerate(compute_parts(total, self.part_size_min, self.part_size_max))
        ]
        next_urls: queue.Queue[str] = queue.Queue(maxsize=1)
        next_urls.put(location)
        cancelled = threading.Event()
        failures: list[BaseException] = []  # in the order they happened: errgroup's Wait returns the first

        def done(future: Future[None]) -> None:
            exc = future.exception()
            if exc is not None and not isinstance(exc, _Cancelled):
                failures.append(exc)
                cancelled.set()

        with ThreadPoolExecutor(
            max_workers=self.max_parallel_parts, thread_name_prefix="pusher-part"
        ) as pool:
            for part in result.parts:
                url = _get(next_urls, cancelled)
                if url is None:
                    break
                pool.submit(self.run_part, url, part, path, digest, next_urls, cancelled).add_done_callback(
                    done
                )
        if failures:
            raise failures[0]
        commit_base = _get(next_urls, cancelled, timeout=self.timeout)
        if commit_base is None:  # every part succeeded, so each gave its next URL: Go would block here
            raise PushError("no URL for the commit (Go would wait forever)")

        md5s = [p.md5 or b"" for p in result.parts]
        result.etag = upload_etag(md5s)
        commit_url = _with_query(commit_base, [("digest", digest), ("etag", result.etag)])
        result.commit_url = commit_url
        headers = {"Content-Type": OCTET_STREAM, "Content-Length": "0"}
        error: PushError | None = None
        for attempt in range(self.max_retries):
            try:
                self.with_retry("PUT", commit_url, headers, None, step="commit", digest=digest)
            except PushError as exc:
                error = exc
                self.sleep(attempt)
                continue
            error = None
            break
        if error is not None:
            raise error
        return result


def _put(next_urls: queue.Queue[str], url: str, cancelled: threading.Event) -> None:
    """``b.nextURL <- url`` (a channel of capacity 1), giving up once the upload is cancelled."""
    while True:
        try:
            next_urls.put(url, timeout=QUEUE_POLL)
            return
        except queue.Full:
            if cancelled.is_set():
                raise _Cancelled() from None


def _get(next_urls: queue.Queue[str], cancelled: threading.Event, timeout: float | None = None) -> str | None:
    """``select { case <-inner.Done(): case url := <-b.nextURL: }`` (``None`` once cancelled or timed out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return next_urls.get(timeout=QUEUE_POLL)
        except queue.Empty:
            if cancelled.is_set() or (deadline is not None and time.monotonic() > deadline):
                return None


def _blob_path(model: BuiltModel, digest: str) -> Path:
    """Where Go reads a blob: ``<models>/blobs/sha256-<hex>`` (``manifest.BlobsPath``)."""
    for blob in model.blobs:
        if blob.digest == digest:
            return blob.path
    return model.config.path.parent / ("sha256-" + digest.removeprefix("sha256:"))


# ----------------------------------------------------------------------------------------------------
# The push


def push(
    base_url: str,
    repo: str,
    tag: str,
    model: BuiltModel,
    *,
    from_names: Mapping[str, str] | None = None,
    manifest: bytes | None = None,
    part_size_min: int = GO_MIN_PART_SIZE,
    part_size_max: int = GO_MAX_PART_SIZE,
    max_parallel_parts: int = NUM_UPLOAD_PARTS,
    max_retries: int = MAX_RETRIES,
    retry_backoff: float = 0.1,
    user_agent: str = DEFAULT_USER_AGENT,
    insecure: bool = True,
    key: OllamaKey | None = None,
    request_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
    connect_to: ConnectTo | None = None,
) -> PushResult:
    """Push ``model`` to ``base_url`` (``http://127.0.0.1:PORT``) as ``repo:tag`` (``repo`` = ``ns/model``)
    the way ``ollama push --insecure HOST:PORT/ns/model:tag`` does (see the module docstring).

    ``from_names`` maps layer digests to the model each was taken from (Ollama's ``Layer.From``, e.g.
    ``src:latest`` or ``ns/src:latest``): those layers are POSTed with ``?mount=...&from=<ns>/<model>`` and
    carry ``"from"`` in the pushed manifest. ``manifest`` replaces ``model.manifest`` as the local manifest
    (it is always re-marshalled as Go does, see :func:`go_manifest`); blobs it names that ``model`` does not
    are read from ``sha256-<hex>`` next to the model's config blob. ``insecure`` (``--insecure``) forces
    ``http`` on every registry URL, as Go does. ``key`` answers ``401`` challenges (without one a ``401``
    is an error). ``retry_backoff * 2**try`` seconds are slept between retries (Go: 1 s * 2**try).

    Raises :class:`PushError` with the message the Ollama CLI would print.
    """
    started = time.monotonic()
    base = base_url.rstrip("/")
    for name in [*repo.split("/"), tag]:
        if not name or name in (".", ".."):
            raise PushError(f"invalid model name part {name!r}")
    if part_size_min < 1 or part_size_max < part_size_min:
        raise ValueError("need 1 <= part_size_min <= part_size_max")
    pusher = _Pusher(
        insecure=insecure,
        key=key,
        user_agent=user_agent,
        timeout=request_timeout,
        ssl_context=ssl_context,
        connect_to=connect_to,
        max_retries=max_retries,
        retry_backoff=retry_backoff,
        max_parallel_parts=max_parallel_parts,
        part_size_min=part_size_min,
        part_size_max=part_size_max,
    )
    names = dict(from_names or {})
    local = model.manifest if manifest is None else manifest
    body = go_manifest(local, names)
    parsed = json.loads(body)

    layers: list[dict[str, Any]] = list(parsed.get("layers") or [])
    if parsed["config"]["digest"]:
        layers.append(parsed["config"])  # PushModel: layers first, then the config
    blobs: list[BlobPush] = []
    for layer in layers:
        digest = layer["digest"]
        if not _DIGEST_RE.match(digest):
            raise PushError(f"invalid digest format: {digest!r}")
        blobs.append(
            pusher.upload_blob(base, repo, layer, _blob_path(model, digest), layer.get("from") or None)
        )

    manifest_url = f"{base}/v2/{repo}/manifests/{tag}"
    resp = pusher.with_retry(
        "PUT", manifest_url, {"Content-Type": MANIFEST_CONTENT_TYPE}, _Body(data=body), step="manifest"
    )
    return PushResult(
        manifest_bytes=body,
        manifest_digest="sha256:" + hashlib.sha256(body).hexdigest(),
        manifest_url=manifest_url,
        manifest_status=resp.status,
        manifest_headers=resp.headers,
        blobs=blobs,
        requests=pusher.log.entries(),
        token_requests=pusher.token_requests,
        elapsed=time.monotonic() - started,
    )
