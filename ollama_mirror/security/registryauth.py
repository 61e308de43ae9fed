"""Per-client keys for the ``/v2`` registry, in the protocol unmodified Ollama servers speak.

The Go server, answered 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``,
GETs ``<realm>?nonce=..&scope=..&service=..&ts=..`` with ``Authorization: <base64 ssh public
key>:<base64 ed25519 signature>``, the signature covering ``GET,<that URL>,<base64(hex(sha256("")))>``
made with its ``~/.ollama/id_ed25519``.  :class:`TokenIssuer` checks the key against an
authorized-keys file, the signature, the timestamp and the nonce, and returns a short-lived
token that the client sends as ``Authorization: Bearer`` on its next requests.

The Go server's ranged blob GETs carry no credentials at all, so the blob ``Location`` the mirror
hands out carries its own short-lived HMAC signature (:meth:`Signer.sign_path`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import parse_qsl, urlencode

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..cache.files import read_or_create
from ..names import PrivateNamespaces

log = Logger(namespace="ollama_mirror.registryauth")  # pinned: log names are public

EMPTY_BODY_HASH = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()
CLOCK_SKEW = 300.0  # seconds a signed token request's ``ts`` may differ from our clock
MAX_NONCES = 100_000


class AuthFailed(Exception):
    """A token request or credential that is refused; the message says why (logged, and sent)."""


class PushDenied(AuthFailed):
    """A push the key may not make (403, not 401: another token would not help)."""


def load_secret(configured: str, work_dir: str) -> bytes:
    """The HMAC secret: the configured one, else one kept in the cache's work directory, created
    on first use (so every process serving the same cache signs alike, and restarts keep tokens)."""
    if configured:
        return configured.encode()
    path = os.path.join(work_dir, "signing.key")
    secret = read_or_create(path, lambda: secrets.token_hex(32).encode()).strip()
    if len(secret) < 32:
        raise ValueError(f"{path} holds no usable secret; delete it to make a new one")
    return secret


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """HMAC-signed tokens and URLs with an expiry, on the injected clock."""

    def __init__(self, secret: bytes, clock: IReactorTime) -> None:
        self._secret = secret
        self._clock = clock

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._secret, f"{purpose}\n{text}".encode(), hashlib.sha256).hexdigest()

    def issue_token(
        self, subject: str, repositories: list[str], lifetime: float, push: list[str] | None = None
    ) -> str:
        """A token for pulls of *repositories* (empty: any), and pushes to *push*."""
        claims: dict[str, object] = {
            "sub": subject,
            "repos": repositories,
            "exp": int(self._clock.seconds() + lifetime),
        }
        if push:
            claims["push"] = push
        body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{self._mac('token', body)}"

    def check_token(self, token: str, repository: str | None, push: bool = False) -> str:
        """The token's subject if it is genuine, unexpired and covers *repository* (``None``: a
        request naming no repository, such as ``GET /v2/``), for a push too with *push*; else
        :class:`AuthFailed`."""
        body, _, mac = token.partition(".")
        if not mac or not hmac.compare_digest(mac.encode(), self._mac("token", body).encode()):
            raise AuthFailed("invalid token")
        try:
            claims = json.loads(_unb64url(body))
            subject, repos, expires = str(claims["sub"]), list(claims["repos"]), float(claims["exp"])
            pushes = list(claims.get("push", []))
        except (ValueError, KeyError, TypeError, RecursionError, binascii.Error):
            raise AuthFailed("invalid token") from None
        if expires < self._clock.seconds():
            raise AuthFailed("token expired")
        if push:
            if repository not in pushes:
                raise AuthFailed(f"token does not allow pushes to {repository}")
            return subject
        if repository is not None and repos and repository not in repos:
            raise AuthFailed(f"token does not cover {repository}")
        return subject

    def sign_path(self, path: str, lifetime: float) -> str:
        """``path?expires=..&signature=..``: usable without credentials until it expires."""
        expires = int(self._clock.seconds() + lifetime)
        return f"{path}?{urlencode({'expires': expires, 'signature': self._mac('url', f'{path}|{expires}')})}"

    def check_path(self, path: str, query: str) -> bool:
        values = dict(parse_qsl(query, keep_blank_values=True))
        expires, signature = values.get("expires", ""), values.get("signature", "")
        if not expires.isdigit() or not signature:
            return False
        expected = self._mac("url", f"{path}|{expires}")
        return (
            hmac.compare_digest(signature.encode(), expected.encode())
            and int(expires) >= self._clock.seconds()
        )


@dataclass(frozen=True)
class AuthorizedKey:
    blob: bytes  # the SSH wire-format public key
    key: Ed25519PublicKey
    comment: str
    namespaces: tuple[str, ...] | None = None  # ``namespaces="team,lab-*"``: where it may push (None: any)

    def may_push_to(self, namespace: str) -> bool:
        return self.namespaces is None or any(fnmatchcase(namespace, p) for p in self.namespaces)


def fingerprint(blob: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -lf`` prints it, so an operator can match a refused key to a line."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def parse_public_key(line: str) -> AuthorizedKey:
    """An ``[namespaces="a,b*"] ssh-ed25519 <base64> [comment]`` line (``~/.ollama/id_ed25519.pub``, with
    the option authorized_keys-style), or ``ValueError``."""
    namespaces: tuple[str, ...] | None = None
    option = re.match(r'\s*namespaces="([^"]*)"\s+', line)
    if option is not None:
        namespaces = tuple(n.strip() for n in option.group(1).split(",") if n.strip())
        line = line[option.end() :]
    fields = line.split(None, 2)
    if len(fields) < 2 or fields[0] != "ssh-ed25519":
        raise ValueError("expected 'ssh-ed25519 <base64 key> [comment]' (Ollama keys are ed25519)")
    try:
        key = load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"not a valid ssh-ed25519 key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an ssh-ed25519 key")
    blob = base64.b64decode(fields[1])
    comment = fields[2].strip() if len(fields) > 2 else fingerprint(blob)
    return AuthorizedKey(blob, key, comment, namespaces)


class AuthorizedKeys:
    """The authorized-keys file, re-read whenever it changes (operators add clients live)."""

    def __init__(self, path: str, what: str = "registry keys") -> None:
        """*what* the keys are for, in log lines."""
        self.path = path
        self._what = what
        self._stamp: tuple[float, int] | None = None
        self._keys: dict[bytes, AuthorizedKey] = {}
        self.reload()

    def reload(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as e:
            if self._stamp is None:
                raise ValueError(f"cannot read {self.path}: {e.strerror}") from None
            log.warn("cannot read {path}: {error}; keeping the keys read before", path=self.path, error=e)
            return
        stamp = (stat.st_mtime, stat.st_size)
        if stamp == self._stamp:
            return
        keys: dict[bytes, AuthorizedKey] = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    key = parse_public_key(line)
                except ValueError as e:
                    log.warn("{path}:{n}: skipped: {error}", path=self.path, n=number, error=str(e))
                    continue
                keys[key.blob] = key
        self._keys, self._stamp = keys, stamp
        log.info("{n} {what} authorized by {path}", n=len(keys), what=self._what, path=self.path)

    def find(self, blob: bytes) -> AuthorizedKey | None:
        self.reload()
        return self._keys.get(blob)

    def __len__(self) -> int:
        return len(self._keys)


class TokenIssuer:
    """``GET /v2/token``: Ollama's signed token request in, a short-lived token out.

    Pull keys (``security.registry_authorized_keys``) get pull tokens; push keys
    (``private.push_authorized_keys``) get tokens that may also push, to the private namespaces their
    line allows, and pull."""

    def __init__(
        self,
        keys: AuthorizedKeys | None,
        signer: Signer,
        clock: IReactorTime,
        lifetime: float,
        push_keys: AuthorizedKeys | None = None,
        private: PrivateNamespaces | None = None,
        api_key_matches: Callable[[str], bool] | None = None,
    ) -> None:
        """*api_key_matches* lets HTTP Basic token requests in whose password is one of the mirror's API
        keys (``security.api_key``): generic OCI tools (oras), which cannot sign as Ollama does."""
        self._api_key_matches = api_key_matches
        self._keys = keys
        self._push_keys = push_keys
        self._private = private if private is not None else PrivateNamespaces()
        self._signer = signer
        self._clock = clock
        self._lifetime = lifetime
        self._nonces: dict[str, float] = {}  # nonce -> when it may be forgotten

    def issue(self, authorization: str, urls: list[str], query: str) -> tuple[str, str]:
        """Check the request and return ``(token, key comment)``; *urls* are the URLs the client
        may have signed (``http``/``https`` variants of the one it requested).  Raises
        :class:`AuthFailed` (401), or :class:`PushDenied` (403) for a push the key may not make."""
        params: dict[str, list[str]] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            params.setdefault(name, []).append(value)
        scopes = _scopes(params.get("scope", []))
        if authorization.strip().lower().startswith("basic "):
            return self._issue_to_api_key(authorization.strip()[6:], scopes)
        key_text, sep, signature_text = authorization.strip().rpartition(":")
        if not sep:
            raise AuthFailed("expected Authorization: <public key>:<signature>")
        try:
            blob = base64.b64decode(key_text, validate=True)
            signature = base64.b64decode(signature_text, validate=True)
        except (ValueError, binascii.Error):
            raise AuthFailed("malformed Authorization header") from None
        pushing = any("push" in actions for _, actions in scopes)
        pull_key = self._keys.find(blob) if self._keys is not None else None
        push_key = self._push_keys.find(blob) if self._push_keys is not None else None
        key = pull_key or push_key
        if key is None:
            if pushing:
                raise AuthFailed(
                    f"the key {fingerprint(blob)} may not push to this mirror: add the pushing Ollama's "
                    "~/.ollama/id_ed25519.pub to the file in private.push_authorized_keys"
                )
            raise AuthFailed(
                f"the key {fingerprint(blob)} is not authorized on this mirror: add the Ollama server's "
                "~/.ollama/id_ed25519.pub to the file in security.registry_authorized_keys"
            )
        for url in urls:
            try:
                key.key.verify(signature, f"GET,{url},{EMPTY_BODY_HASH}".encode())
                break
            except InvalidSignature:
                continue
        else:
            raise AuthFailed("bad signature")
        self._check_fresh(params)
        pushes = [repository for repository, actions in scopes if "push" in actions]
        for repository in pushes:
            self._may_push(push_key, blob, repository)
        repositories = sorted({repository for repository, _ in scopes})
        token = self._signer.issue_token(key.comment, repositories, self._lifetime, sorted(set(pushes)))
        return token, key.comment

    def _issue_to_api_key(self, credentials: str, scopes: list[tuple[str, set[str]]]) -> tuple[str, str]:
        """HTTP Basic with an API key as the password (any user name): pulls, and pushes to the private
        namespaces (an API key is an operator's)."""
        try:
            _user, _, password = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")
        except (ValueError, binascii.Error):
            raise AuthFailed("malformed Authorization header") from None
        if self._api_key_matches is None or not self._api_key_matches(password):
            raise AuthFailed("the password is not an API key of this mirror (security.api_key)")
        pushes = sorted({repository for repository, actions in scopes if "push" in actions})
        for repository in pushes:
            namespace = repository.partition("/")[0]
            if namespace not in self._private:
                raise PushDenied(
                    f"namespace {namespace} is not private on this mirror: pushes are never forwarded "
                    "upstream (private.namespaces)"
                )
        repositories = sorted({repository for repository, _ in scopes})
        return self._signer.issue_token("api key", repositories, self._lifetime, pushes), "an API key"

    def _check_fresh(self, params: dict[str, list[str]]) -> None:
        """The request's ``ts`` is near our clock and its nonce was never used (no replay)."""
        now = self._clock.seconds()
        ts = params.get("ts", [""])[0]
        if not ts.lstrip("-").isdigit() or abs(int(ts) - now) > CLOCK_SKEW:
            raise AuthFailed("the request's ts is missing or too far from the mirror's clock")
        nonce = params.get("nonce", [""])[0]
        if not nonce:
            raise AuthFailed("the request has no nonce")
        self._forget_nonces(now)
        if nonce in self._nonces:
            raise AuthFailed("this token request was already used")
        if len(self._nonces) >= MAX_NONCES:
            raise AuthFailed("too many token requests; retry later")
        self._nonces[nonce] = now + 2 * CLOCK_SKEW

    def _may_push(self, key: AuthorizedKey | None, blob: bytes, repository: str) -> None:
        namespace = repository.partition("/")[0]
        if namespace not in self._private:
            raise PushDenied(
                f"namespace {namespace} is not private on this mirror: pushes are never forwarded "
                "upstream (private.namespaces)"
            )
        if key is None:
            raise PushDenied(
                f"the key {fingerprint(blob)} may pull but not push: add it to the file in "
                "private.push_authorized_keys"
            )
        if not key.may_push_to(namespace):
            allowed = ", ".join(key.namespaces or ())
            raise PushDenied(f"the key {key.comment} may push only to {allowed}, not to {namespace}")

    def _forget_nonces(self, now: float) -> None:
        """Drop nonces whose ``ts`` could no longer pass the clock check (so they cannot be replayed)."""
        if len(self._nonces) >= 1024:
            for nonce in [n for n, t in self._nonces.items() if t < now]:
                del self._nonces[nonce]

    @property
    def lifetime(self) -> float:
        return self._lifetime


def _scopes(values: list[str]) -> list[tuple[str, set[str]]]:
    """``repository:<name>:<actions>`` items of the ``scope`` parameters → (name, actions)."""
    found = []
    for scope in values:
        for item in scope.split():
            kind, _, rest = item.partition(":")
            repository, _, actions = rest.rpartition(":")
            if kind == "repository" and repository:
                found.append((repository, set(actions.split(","))))
    return found
