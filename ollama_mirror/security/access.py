"""Who may do what: API keys, registry access, model rules and rate limits, in front of every route.

:class:`AccessControl` wraps the root resource (inside the request observer, so refusals are
logged and counted like any answer).  For each request it works out the client's address, counts
the request against that address's rate limit, then applies the rule of the route's family:

- ``/api``, ``/v1``, ``/mirror`` (not ``/mirror/health``) and, if asked, ``/metrics``: an API key
  as ``Authorization: Bearer <key>`` (what the official Python client sends from
  ``OLLAMA_API_KEY``); the web page ``/mirror/ui`` asks for the key itself and keeps a session
  (:mod:`ollama_mirror.web.ui.session`);
- ``/v2``: ``security.registry_access`` (open, client networks, or per-client Ollama keys, see
  :mod:`ollama_mirror.security.registryauth`), and ``/v2/token`` for the key flow;
- model rules on ``/api/pull``, ``/api/show`` and the ``/v2`` manifest and blob routes;
- the rate limit, which charges only what sends the mirror upstream (a tag not fresh in the cache and
  not already being fetched, a blob neither held nor listed in a manifest the mirror served, a pull by
  name) and failed credentials: what the mirror holds is served to any number of clients behind one
  address, a fleet behind a NAT pulling one model costs one unit, and guessing keys or tokens is slowed.

Refusals use the dialect of the route: ``{"error": ...}`` or the registry's ``{"errors": [...]}``.
A path with an encoded slash (``%2F``) or an empty segment (``//``, other than a trailing ``/``) is
refused before anything else: the guard and the routers would read it differently (Klein strips
one raw segment per branch, werkzeug takes a leading ``//`` literally), and no model name, tag or
digest needs either.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ..config import ConfigError, PrivateConfig, SecurityConfig
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
from ..web.errors import ollama_error, registry_error
from .modelrules import ModelRules
from .ratelimit import RateLimiter, client_address, in_networks, parse_networks
from .registryauth import AuthFailed, AuthorizedKeys, PushDenied, Signer, TokenIssuer, load_secret
from .requestparts import (
    RegistryPath,
    ambiguous_path,
    bearer,
    header_text,
    is_web_ui,
    model_in_body,
    push_repository,
    registry_path,
    routed_path,
    routed_path_lenient,
)

log = Logger(namespace="ollama_mirror.access")  # pinned: log names are public

TOKEN_PATH = "/v2/token"


class Holdings(Protocol):
    """What the mirror holds or is already fetching (:class:`ollama_mirror.daemon.holdings.CacheHoldings`)."""

    def has_tag(self, name: ModelName) -> bool: ...

    def has_blob(self, hexdigest: str) -> bool: ...

    def has_manifest(self, hexdigest: str) -> bool: ...


class Limiter(Protocol):
    """A rate limit: :class:`RateLimiter`, or one counted across a cluster's nodes."""

    requests: int
    window: float

    def take(self, key: str, cost: float = 1.0) -> float | None:
        """Count a request of *cost* units for *key*: ``None`` if allowed, else the seconds to wait."""


class Peers(Protocol):
    """The other nodes of a cluster: their signed requests pass (they are this mirror's own reads)."""

    def verify(self, request: IRequest) -> str | None:
        """The sending node's URL when the request carries its good signature."""


class _HoldsNothing:
    """Without holdings to ask, every manifest, blob and pull request counts."""

    def has_tag(self, name: ModelName) -> bool:
        return False

    def has_blob(self, hexdigest: str) -> bool:
        return False

    def has_manifest(self, hexdigest: str) -> bool:
        return False


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    code: str = ""  # registry error code, for /v2 routes
    headers: tuple[tuple[bytes, bytes], ...] = ()


class AccessControl:
    """The ``security.*`` settings, in force."""

    def __init__(
        self,
        config: SecurityConfig,
        clock: IReactorTime,
        work_dir: str,
        registry_host: Callable[[str | None], str],
        holdings: Holdings | None = None,
        peers: Peers | None = None,
        limiter: Limiter | None = None,
        private: PrivateConfig | None = None,
    ) -> None:
        """*registry_host* gives the model host a ``/v2`` request means, from its ``Host`` header (the
        mirror may serve several upstreams, by virtual host); *holdings* tells which requests the
        mirror answers without going upstream (those cost nothing against the rate limit); *limiter*
        replaces this node's own rate limit (a cluster counts clients across its nodes); *private*: the
        namespaces pushed here, and the keys that may push."""
        self.config = config
        self._clock = clock
        self._registry_host = registry_host
        self._holdings: Holdings = holdings or _HoldsNothing()
        self._peers = peers
        self._api_keys = [k.encode() for k in (config.api_key, *config.api_keys) if k]
        self._trusted = parse_networks(config.trusted_proxies)
        self._networks = parse_networks(config.registry_networks)
        self.rules = ModelRules(config.allowed_models, config.blocked_models)
        self.limiter: Limiter = (
            limiter
            if limiter is not None
            else RateLimiter(clock, config.rate_limit_requests, config.rate_limit_window)
        )
        self.mode = config.registry_access
        self.signer: Signer | None = None
        self.issuer: TokenIssuer | None = None
        if self.mode == "networks" and not self._networks:
            raise ConfigError("security.registry_access = networks needs security.registry_networks")
        keys: AuthorizedKeys | None = None
        if self.mode == "keys":
            if not config.registry_authorized_keys:
                raise ConfigError("security.registry_access = keys needs security.registry_authorized_keys")
            keys = _keys(
                "security.registry_authorized_keys", config.registry_authorized_keys, "registry keys"
            )
        self.private = PrivateNamespaces(private.namespaces if private else ())
        self.push_keys: AuthorizedKeys | None = None
        if private is not None and private.push_authorized_keys and self.private:
            self.push_keys = _keys("private.push_authorized_keys", private.push_authorized_keys, "push keys")
        may_push_with_api_keys = bool(self.private) and bool(self._api_keys)
        if keys is not None or self.push_keys is not None or may_push_with_api_keys:
            try:
                secret = load_secret(config.signing_secret, work_dir)
            except (ValueError, OSError) as e:
                raise ConfigError(f"security.signing_secret: {e}") from None
            self.signer = Signer(secret, clock)
            self.issuer = TokenIssuer(
                keys,
                self.signer,
                clock,
                config.registry_token_lifetime,
                self.push_keys,
                self.private,
                self._key_matches if self._api_keys else None,
            )

    def wrap(self, resource: IResource, as_path: str | None = None) -> IResource:
        """*resource* behind these rules; *as_path*: judge every request as if it were for that path
        (the metrics-only listener serves ``/metrics`` on any path)."""
        return _GuardedResource(resource, self, as_path)

    # --- what the registry routes call ---------------------------------------------------------

    def blob_location(self, path: str) -> str:
        """The ``Location`` of a blob's discovery answer: signed when the registry needs keys."""
        if self.signer is None:
            return path
        return self.signer.sign_path(path, self.config.registry_url_lifetime)

    # --- judging a request ---------------------------------------------------------------------

    def client(self, request: IRequest) -> str:
        address = request.getClientAddress()
        peer = str(getattr(address, "host", "") or type(address).__name__.removesuffix("Address").lower())
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []  # type: ignore[attr-defined]
        return client_address(peer, [v.decode("latin-1") for v in forwarded], self._trusted)

    def check(self, request: Request, path: str) -> Refusal | None:
        if path == "/mirror/health":
            return None
        client = self.client(request)
        if path.startswith(("/v2/", "/mirror/cluster/models/")) and self._from_a_node(request):
            return None  # another node of the cluster, reading what this node downloads, or removing
        if path.startswith("/v2/") and request.method not in (b"GET", b"HEAD"):
            return self._check_push(request, path, client)  # (pushes cost the upstream nothing)
        if path == "/v2" or path.startswith("/v2/"):
            refusal = self._check_registry(request, path, client)
        else:
            refusal = self._check_api(request, path, client)
        if refusal is not None:
            return refusal
        cost = self._upstream_cost(request, path)
        return self._charge(client, cost) if cost else None

    def _check_push(self, request: Request, path: str, client: str) -> Refusal | None:
        """A push (``POST``/``PATCH``/``PUT``/``DELETE`` on ``/v2``): to a private namespace only, with
        a token a push key earned; refused before any byte of the body is accepted."""
        target = push_repository(path)
        if target is None:
            return None  # (the routes answer: not found, or the method is not allowed)
        namespace, repository = target.partition("/")[0], target
        if namespace not in self.private:
            return Refusal(
                403,
                f"namespace {namespace} is not private on this mirror: pushes are never forwarded "
                "upstream (private.namespaces)",
                "DENIED",
            )
        if (self.push_keys is None and not self._api_keys) or self.signer is None:
            return Refusal(
                403, "nobody may push to this mirror: private.push_authorized_keys is empty", "DENIED"
            )
        token = bearer(request)
        reason = "authentication required"
        if token is not None:
            try:
                self.signer.check_token(token, repository, push=True)
                return None
            except AuthFailed as e:
                reason = str(e)
        challenge = self._challenge(request, f"repository:{repository}:push,pull")
        refusal = Refusal(401, reason, "UNAUTHORIZED", ((b"www-authenticate", challenge),))
        return refusal if token is None else self._failed_credentials(client, refusal)

    def may_push(self, headers: Headers, repository: str) -> bool:
        """Whether a request with these headers carries a token that may push to *repository* (asked
        before its body is accepted, see :class:`~ollama_mirror.web.push.StreamingBodies`)."""
        if self.signer is None or repository.partition("/")[0] not in self.private:
            return False
        values = headers.getRawHeaders(b"authorization") or []
        scheme, _, token = (values[0].decode("latin-1") if values else "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            self.signer.check_token(token.strip(), repository, push=True)
        except AuthFailed:
            return False
        return True

    def _from_a_node(self, request: IRequest) -> bool:
        return self._peers is not None and self._peers.verify(request) is not None

    def _check_api(self, request: Request, path: str, client: str) -> Refusal | None:
        family = path.split("/", 2)[1] if path.count("/") >= 1 else ""
        if is_web_ui(path):
            return None  # the page signs its users in itself (a key given once, then a session cookie)
        if family in ("api", "v1", "mirror") or (path == "/metrics" and self.config.protect_metrics):
            refusal = self._check_api_key(request, client)
            if refusal is not None:
                return refusal
        if path in ("/api/pull", "/api/show") and self.rules.active and request.method == b"POST":
            return self._check_api_model(request)
        return None

    # --- the rate limit ------------------------------------------------------------------------

    def _charge(self, client: str, cost: float = 1.0) -> Refusal | None:
        """Count *cost* against the client's allowance: ``None``, or the 429 to answer."""
        wait = self.limiter.take(client, cost)
        if wait is None:
            return None
        seconds = max(1, int(wait + 0.999))
        return Refusal(
            429,
            f"too many requests from {client}: security.rate_limit_requests is "
            f"{self.limiter.requests} per {self.limiter.window:g} s; retry in {seconds} s",
            "TOOMANYREQUESTS",
            ((b"retry-after", str(seconds).encode()),),
        )

    def _failed_credentials(self, client: str, refusal: Refusal) -> Refusal:
        """A wrong key or token costs one unit: guessing is slowed to the rate limit."""
        return self._charge(client) or refusal

    def _upstream_cost(self, request: Request, path: str) -> float:
        """1 if answering this request may send the mirror upstream, else 0."""
        if not self.limiter.requests:
            return 0.0
        if path == "/api/pull" and request.method == b"POST":
            name = model_in_body(request)
            return 0.0 if name is not None and self._holdings.has_tag(name) else 1.0
        target = registry_path(path) if path.startswith("/v2/") else None
        if target is None or request.method not in (b"GET", b"HEAD"):
            return 0.0
        if not (is_namespace(target.namespace) and is_model(target.model)):
            return 0.0  # the route answers NAME_INVALID
        if target.kind == "blobs":
            try:
                return 0.0 if self._holdings.has_blob(parse_digest(target.reference)) else 1.0
            except InvalidName:
                return 0.0
        if is_digest(target.reference):
            return 0.0 if self._holdings.has_manifest(parse_digest(target.reference)) else 1.0
        if not is_tag(target.reference):
            return 0.0
        host = self._registry_host(header_text(request, b"host") or None)
        held = self._holdings.has_tag(ModelName(host, target.namespace, target.model, target.reference))
        return 0.0 if held else 1.0

    def _check_api_key(self, request: IRequest, client: str) -> Refusal | None:
        if not self._api_keys:
            return None
        given = bearer(request)
        if given is None:
            return Refusal(401, "unauthorized: this mirror needs an API key (Authorization: Bearer <key>)")
        if self._key_matches(given):
            return None
        return self._failed_credentials(client, Refusal(401, "unauthorized: wrong API key"))

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        """The accepted API keys (``security.api_key`` and ``security.api_keys``)."""
        return tuple(self._api_keys)

    def failed_sign_in(self, request: IRequest) -> float | None:
        """A wrong key given to the web page's sign-in costs a unit, as a wrong Bearer key does: the
        seconds the client must wait when that puts it over the rate limit, else ``None``."""
        return self.limiter.take(self.client(request))

    def _key_matches(self, given: str) -> bool:
        candidate = given.encode("latin-1", "replace")
        matched = False
        for key in self._api_keys:  # every key is compared, so timing tells nothing
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def trusted(self, request: IRequest) -> bool:
        """Whether *request* may see the mirror's details (paths, URLs, versions): no API key is set, or
        it carries a right one.  Routes open to anyone (``/mirror/health``) show the rest only their
        status."""
        if not self._api_keys:
            return True
        given = bearer(request)
        return given is not None and self._key_matches(given)

    def _check_api_model(self, request: Request) -> Refusal | None:
        name = model_in_body(request)
        if name is None:
            return None  # the route answers the bad body itself
        reason = self.rules.check(name)
        return Refusal(403, reason) if reason else None

    # --- /v2 -----------------------------------------------------------------------------------

    def _check_registry(self, request: Request, path: str, client: str) -> Refusal | None:
        target = registry_path(path)
        if path == TOKEN_PATH and self.issuer is not None:
            return None  # answered by the guard itself
        refusal = self._check_registry_access(request, path, target, client)
        if refusal is not None or target is None or not self.rules.active:
            return refusal
        if not (is_namespace(target.namespace) and is_model(target.model)):
            return None  # the route answers NAME_INVALID
        host = self._registry_host(header_text(request, b"host") or None)
        if target.kind == "manifests" and is_tag(target.reference) and not is_digest(target.reference):
            reason = self.rules.check(ModelName(host, target.namespace, target.model, target.reference))
        else:
            reason = self.rules.check_repository(host, target.namespace, target.model)
        return Refusal(403, reason, "DENIED") if reason else None

    def _check_registry_access(
        self, request: Request, path: str, target: RegistryPath | None, client: str
    ) -> Refusal | None:
        if self.mode == "open":
            return None
        if self._networks and in_networks(client, self._networks):
            return None
        if self.mode == "networks":
            return Refusal(
                403, f"the registry is not open to {client} (security.registry_networks)", "DENIED"
            )
        assert self.signer is not None
        repository = f"{target.namespace}/{target.model}" if target is not None else None
        if target is not None and target.kind == "blobs" and request.method in (b"GET", b"HEAD"):
            query = request.uri.partition(b"?")[2].decode("latin-1")
            if query and self.signer.check_path(request.path.decode("latin-1"), query):
                return None
        token = bearer(request)
        reason = "authentication required"
        if token is not None:
            try:
                self.signer.check_token(token, repository)
                return None
            except AuthFailed as e:
                reason = str(e)
        scope = f"repository:{repository}:pull" if repository else ""
        refusal = Refusal(
            401, reason, "UNAUTHORIZED", ((b"www-authenticate", self._challenge(request, scope)),)
        )
        # The first request of every pull has no token (the normal challenge); a wrong one costs a unit.
        return refusal if token is None else self._failed_credentials(client, refusal)

    def _origin(self, request: Request) -> tuple[str, str]:
        """The scheme and ``host[:port]`` the client asked for (the Go client wants the realm there)."""
        host = header_text(request, b"host").strip()
        if not host or any(c in host for c in ' "\\,/@?#') or len(host) > 300:
            address = request.getHost()
            host = f"{getattr(address, 'host', 'localhost')}:{getattr(address, 'port', 0)}"
        scheme = "https" if request.isSecure() else "http"
        peer = str(getattr(request.getClientAddress(), "host", ""))
        forwarded_proto = header_text(request, b"x-forwarded-proto").strip().lower()
        if forwarded_proto in ("http", "https") and self._trusted and in_networks(peer, self._trusted):
            scheme = forwarded_proto
        return scheme, host

    def _challenge(self, request: Request, scope: str) -> bytes:
        scheme, host = self._origin(request)
        value = f'Bearer realm="{scheme}://{host}{TOKEN_PATH}",service="{host}"'
        if scope:
            value += f',scope="{scope}"'
        return value.encode("latin-1")

    def issue_token(self, request: Request) -> Refusal | dict[str, Any]:
        """``GET /v2/token``: the token document, or the refusal to answer (a refused key costs a unit
        against the rate limit)."""
        assert self.issuer is not None
        _scheme, host = self._origin(request)
        uri = request.uri.decode("latin-1")
        urls = [f"{scheme}://{host}{uri}" for scheme in ("http", "https")]
        query = uri.partition("?")[2]
        client = self.client(request)
        try:
            token, who = self.issuer.issue(header_text(request, b"authorization"), urls, query)
        except PushDenied as e:
            log.warn("registry token refused to {client}: {reason}", client=client, reason=str(e))
            return Refusal(403, str(e), "DENIED")
        except AuthFailed as e:
            log.warn("registry token refused to {client}: {reason}", client=client, reason=str(e))
            return self._failed_credentials(client, Refusal(401, str(e), "UNAUTHORIZED"))
        log.info("registry token issued to {who} at {client}", who=who, client=client)
        return {"token": token, "access_token": token, "expires_in": int(self.issuer.lifetime)}


def _refuse(request: Request, path: str, refusal: Refusal) -> bytes:
    for name, value in refusal.headers:
        request.setHeader(name, value)
    if path == "/v2" or path.startswith("/v2/"):
        return registry_error(request, refusal.status, refusal.code or "DENIED", refusal.message)
    return ollama_error(request, refusal.status, refusal.message)


def _refuse_token(request: Request, refusal: Refusal) -> bytes:
    """A refused token request, in plain text: Ollama prints the body of a failed token request as it
    is (``Error: pull model manifest: 401: <body>``), so words read better there than JSON."""
    for name, value in refusal.headers:
        request.setHeader(name, value)
    body = refusal.message.encode() + b"\n"
    request.setResponseCode(refusal.status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


class _GuardedResource(Resource):
    """A leaf wrapper: judge the request, then refuse it or let the wrapped tree render it."""

    isLeaf = True

    def __init__(self, wrapped: IResource, access: AccessControl, as_path: str | None = None) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._access = access
        self._as_path = as_path

    def render(self, request: Request) -> Any:
        try:
            path = self._as_path or routed_path(request)
        except UnicodeDecodeError:  # the routers would answer a plain-text 400
            path = routed_path_lenient(request)
            return _refuse(request, path, Refusal(400, "the URL is not valid UTF-8", "NAME_INVALID"))
        if self._as_path is None and ambiguous_path(request):
            return _refuse(
                request,
                path,
                Refusal(400, "the URL has an empty or encoded-slash (%2F) path segment", "NAME_INVALID"),
            )
        try:
            refusal = self._access.check(request, path)
        except Exception:  # a bug here must still answer JSON, without a traceback
            log.failure("access check failed on {path}", path=quote(path)[:300])
            return ollama_error(request, 500, "internal error")
        if refusal is not None:
            if refusal.status != 429:
                log.info(
                    "refused {method} {path} from {client}: {status} {reason}",
                    method=request.method.decode("latin-1"),
                    path=quote(path)[:300],
                    client=self._access.client(request),
                    status=refusal.status,
                    reason=refusal.message,
                )
            return _refuse(request, path, refusal)
        if path == TOKEN_PATH and self._access.issuer is not None and request.method in (b"GET", b"HEAD"):
            answer = self._access.issue_token(request)
            if isinstance(answer, Refusal):
                return _refuse_token(request, answer)
            body = json.dumps(answer, separators=(",", ":")).encode()
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", str(len(body)).encode())
            return body
        return self._wrapped.render(request)


def _keys(key: str, path: str, what: str) -> AuthorizedKeys:
    """An authorized-keys file, or the :class:`ConfigError` naming *key* and why it cannot be read."""
    try:
        return AuthorizedKeys(path, what)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{key}: {e}") from None
