"""An Ollama client key, signing exactly as the Go server does (``auth.Sign`` in Ollama's ``auth`` package).

The key pair is what ``~/.ollama/id_ed25519`` holds; the public line is ``id_ed25519.pub``
(``ssh-ed25519 <base64 SSH key blob> <comment>``).  A signature is sent as
``<base64 SSH key blob>:<base64 64-byte ed25519 signature>``, and a token request signs
``GET,<token URL>,<base64(hex(sha256("")))>``.  :func:`token_url` builds the token URL from a
``WWW-Authenticate`` challenge as ``registryChallenge.URL()`` does (realm + service, scope, ts and a
base64url nonce, keys sorted by ``url.Values.Encode``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

EMPTY_BODY_HASH = base64.b64encode(hashlib.sha256(b"").hexdigest().encode()).decode()


class OllamaKey:
    def __init__(self, comment: str = "ollama@test", private: Ed25519PrivateKey | None = None) -> None:
        self.private = private or Ed25519PrivateKey.generate()
        self.comment = comment
        line = self.private.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
        self.public_b64 = line.split()[1]

    def public_line(self) -> str:
        """The ``id_ed25519.pub`` line an operator adds to the mirror's authorized-keys file."""
        return f"ssh-ed25519 {self.public_b64} {self.comment}"

    def sign(self, data: bytes) -> str:
        return f"{self.public_b64}:{base64.b64encode(self.private.sign(data)).decode()}"

    def token_request_authorization(self, url: str) -> str:
        return self.sign(f"GET,{url},{EMPTY_BODY_HASH}".encode())


def parse_challenge(header: str) -> dict[str, str]:
    """``Bearer realm="..",service="..",scope=".."`` → its parameters."""
    text = header.strip()
    if text.lower().startswith("bearer "):
        text = text[7:]
    return {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', text)}


def token_url(challenge: dict[str, str], now: float | None = None, nonce: str | None = None) -> str:
    realm = urlsplit(challenge["realm"])
    values = parse_qsl(realm.query, keep_blank_values=True)
    values.append(("service", challenge.get("service", "")))
    values.extend(("scope", s) for s in challenge.get("scope", "").split(" "))
    values.append(("ts", str(int(time.time() if now is None else now))))
    values.append(("nonce", nonce or base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()))
    values.sort(key=lambda kv: kv[0])  # Go's url.Values.Encode sorts by key (stable within a key)
    return urlunsplit((realm.scheme, realm.netloc, realm.path, urlencode(values), ""))
