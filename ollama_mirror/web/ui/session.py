"""Sessions of the web page: an API key given once, then a signed cookie; a CSRF token per session.

The cookie holds no key, only ``expiry.nonce.key-id.mac``: the mac (HMAC-SHA256 under a key derived from
``security.signing_secret``) proves the daemon issued it, the key id says which API key signed in, so that
removing that key from the configuration ends its sessions.  Nothing is stored server-side: every worker
process and node sharing the secret accepts the cookie, and a restart keeps the operator signed in.

Without any API key the page is open, but its actions still need a session cookie (issued with the page)
and its CSRF token: a page of another site must not make an operator's browser delete models.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

COOKIE_NAME = b"ollama_mirror_ui"
COOKIE_PATH = b"/mirror/ui"
SESSION_LIFETIME = 12 * 3600.0  # an operator's working day; then the key is asked again
OPEN = "open"  # the key id of a session on a mirror without API keys
_PURPOSE = b"ollama-mirror web ui session v1"  # so that these macs never pass for registry tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Session:
    expires: int
    nonce: str
    key_id: str


class Sessions:
    """Issues and checks session cookies and CSRF tokens, on the injected clock."""

    def __init__(
        self,
        secret: bytes,
        api_keys: Sequence[bytes],
        clock: IReactorTime,
        lifetime: float = SESSION_LIFETIME,
    ) -> None:
        self._mac_key = hmac.new(secret, _PURPOSE, hashlib.sha256).digest()
        self._keys = {self._key_id(key): key for key in api_keys if key}
        self._clock = clock
        self.lifetime = lifetime

    @property
    def needs_key(self) -> bool:
        """Whether signing in takes an API key (``security.api_key(s)`` is set)."""
        return bool(self._keys)

    def _key_id(self, key: bytes) -> str:
        return _b64(hmac.new(self._mac_key, b"key|" + key, hashlib.sha256).digest()[:9])

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._mac_key, text.encode(), hashlib.sha256).digest())

    def sign_in(self, given: str) -> str | None:
        """The cookie value of a new session when *given* is one of the API keys, else ``None``.

        Every key is compared, in constant time, so timing tells nothing of which one came close."""
        candidate = given.encode("utf-8", "replace")
        found = None
        for key_id, key in self._keys.items():
            if hmac.compare_digest(candidate, key):
                found = key_id
        return None if found is None else self._issue(found)

    def open_session(self) -> str:
        """The cookie value of a session on a mirror without API keys."""
        if self.needs_key:
            raise ValueError("this mirror has API keys: sign in with one")
        return self._issue(OPEN)

    def _issue(self, key_id: str) -> str:
        expires = int(self._clock.seconds() + self.lifetime)
        body = f"{expires}.{secrets.token_urlsafe(12)}.{key_id}"
        return f"{body}.{self._mac(body)}"

    def check(self, value: bytes | str | None) -> Session | None:
        """The session a cookie value stands for, if the daemon issued it, it has not expired, and the key
        that opened it is still configured; otherwise ``None``."""
        if value is None:
            return None
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        parts = text.split(".")
        if len(parts) != 4:
            return None
        expires, nonce, key_id, mac = parts
        if not hmac.compare_digest(self._mac(f"{expires}.{nonce}.{key_id}"), mac):
            return None
        try:
            when = int(expires)
        except ValueError:
            return None
        if when <= self._clock.seconds():
            return None
        if key_id not in self._keys and not (key_id == OPEN and not self.needs_key):
            return None
        return Session(when, nonce, key_id)

    def csrf_token(self, session: Session) -> str:
        """The token the page sends back with every action of *session* (in ``X-CSRF-Token``)."""
        return self._mac(f"csrf|{session.nonce}|{session.expires}")

    def check_csrf(self, session: Session, token: bytes | str | None) -> bool:
        if token is None:
            return False
        text = token.decode("latin-1") if isinstance(token, bytes) else token
        return hmac.compare_digest(self.csrf_token(session), text)

    def cookie(self, value: str, secure: bool) -> bytes:
        """The ``Set-Cookie`` value for a session: HttpOnly, SameSite=Strict, only on the page's paths."""
        flags = f"; Path={COOKIE_PATH.decode()}; Max-Age={int(self.lifetime)}; HttpOnly; SameSite=Strict"
        return (COOKIE_NAME.decode() + "=" + value + flags + ("; Secure" if secure else "")).encode()

    @staticmethod
    def cleared_cookie(secure: bool) -> bytes:
        flags = f"; Path={COOKIE_PATH.decode()}; Max-Age=0; HttpOnly; SameSite=Strict"
        return (COOKIE_NAME.decode() + "=" + flags + ("; Secure" if secure else "")).encode()
