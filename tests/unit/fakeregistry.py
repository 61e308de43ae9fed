"""A small in-memory registry for unit tests, served to the mirror through ``StubTreq``.

It answers like the real ones where the mirror cares: manifests need the v2 ``Accept`` header
(the distribution registry's 400 otherwise), blobs honour one ``Range``, and optional modes add
Basic auth, a Bearer token service, or registry.ollama.ai's 307 to a storage host elsewhere.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Seen:
    method: str
    host: str
    path: str
    authorization: str | None
    range: str | None
    via: str | None = None
    user_agent: str | None = None


@dataclass
class FakeRegistry(Resource):
    isLeaf = True

    manifests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str = ""  # "", "basic" or "bearer"
    credentials: tuple[str, str] = ("user", "secret")
    redirect_to: str = ""  # e.g. "http://storage.example": blob GETs answer 307 there
    redirect_status: int = 307  # hf.co answers 302
    ignore_range: bool = False
    fail_with: int = 0  # answer every registry request with this status
    # (status, Retry-After, how many times, path substring): answer matching requests so, then normally
    faults: list[list[Any]] = field(default_factory=list)
    hold_manifests: bool = False  # answer manifest requests only at release(), to make them overlap
    stall_manifests: int = 0  # so many manifest answers send half their body, the rest only at release()
    damage_manifests: int = 0  # so many manifest answers have a byte flipped (their digest header is right)
    held: list[tuple[Request, bytes]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    tokens_issued: int = 0

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def add_model(
        self, repository: str, tag: str, layers: list[bytes], media_types: list[str] | None = None
    ) -> bytes:
        """Add a model; every layer is a ``model`` layer unless *media_types* says otherwise."""
        config = json.dumps(
            {
                "model_format": "gguf",
                "model_family": "llama",
                "model_families": ["llama"],
                "model_type": "1B",
                "file_type": "Q4_0",
            }
        ).encode()
        types = ["application/vnd.docker.container.image.v1+json"]
        types += media_types or ["application/vnd.ollama.image.model"] * len(layers)
        entries = []
        for data, media_type in zip([config, *layers], types, strict=True):
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.blobs[digest] = data
            entries.append({"mediaType": media_type, "digest": digest, "size": len(data)})
        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": entries[0], "layers": entries[1:]}
        ).encode()
        self.manifests[(repository, tag)] = manifest
        return manifest

    def _authorized(self, request: Request) -> bool:
        header = (request.getHeader(b"authorization") or b"").decode()
        if self.auth == "basic":
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            return header == expected
        if self.auth == "bearer":
            return header == "Bearer good-token"
        return True

    def _challenge(self, request: Request, repository: str) -> bytes:
        request.setResponseCode(401)
        if self.auth == "basic":
            request.setHeader(b"www-authenticate", b'Basic realm="registry"')
        else:
            challenge = (
                f'Bearer realm="http://auth.example/token",service="registry.example",'
                f'scope="repository:{repository}:pull"'
            )
            request.setHeader(b"www-authenticate", challenge.encode())
        return b'{"errors":[{"code":"UNAUTHORIZED"}]}'

    def render(self, request: Request) -> bytes:
        host = (request.getHeader(b"host") or b"").decode()
        path = request.path.decode()
        self.seen.append(
            Seen(
                request.method.decode(),
                host,
                path + (("?" + request.uri.decode().split("?", 1)[1]) if b"?" in request.uri else ""),
                (request.getHeader(b"authorization") or b"").decode() or None,
                (request.getHeader(b"range") or b"").decode() or None,
                (request.getHeader(b"via") or b"").decode() or None,
                (request.getHeader(b"user-agent") or b"").decode() or None,
            )
        )
        for fault in self.faults:
            status, retry_after, times, where = fault
            if times > 0 and where in f"{host}{path}":
                fault[2] -= 1
                request.setResponseCode(status)
                if retry_after is not None:
                    request.setHeader(b"retry-after", str(retry_after).encode())
                return b'{"errors":[{"code":"UNAVAILABLE"}]}'
        if host == "auth.example":
            return self._token(request)
        if host == "storage.example":
            return self._blob(request, path.rsplit("/", 1)[-1])
        if self.fail_with:
            request.setResponseCode(self.fail_with)
            return b'{"errors":[{"code":"UNAVAILABLE"}]}'
        match = re.fullmatch(r"/v2/([^/]+/[^/]+)/(manifests|blobs)/([^/]+)", path)
        if match is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"NAME_UNKNOWN"}]}'
        repository, kind, reference = match.groups()
        if not self._authorized(request):
            return self._challenge(request, repository)
        if kind == "manifests":
            return self._manifest(request, repository, reference)
        if self.redirect_to:
            request.setResponseCode(self.redirect_status)
            request.setHeader(b"location", f"{self.redirect_to}/presigned/{reference}?X-Sig=abc".encode())
            return b""
        return self._blob(request, reference)

    def _token(self, request: Request) -> bytes:
        header = (request.getHeader(b"authorization") or b"").decode()
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if header != expected:
            request.setResponseCode(401)
            return b"{}"
        self.tokens_issued += 1
        return b'{"token":"good-token"}'

    def _manifest(self, request: Request, repository: str, reference: str) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode()
        if MANIFEST_V2 not in accept:
            request.setResponseCode(400)
            return b'{"errors":[{"code":"MANIFEST_INVALID"}]}'
        data = self.manifests.get((repository, reference))
        if data is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        request.setHeader(b"content-type", MANIFEST_V2.encode())
        request.setHeader(b"docker-content-digest", ("sha256:" + hashlib.sha256(data).hexdigest()).encode())
        if self.damage_manifests > 0:
            self.damage_manifests -= 1
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if self.stall_manifests > 0:
            self.stall_manifests -= 1
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data[: len(data) // 2])
            self.held.append((request, data[len(data) // 2 :]))
            return NOT_DONE_YET  # type: ignore[no-any-return]
        if self.hold_manifests:
            self.held.append((request, data))
            return NOT_DONE_YET  # type: ignore[no-any-return]
        return data

    def digests(self, repository: str = "library/tiny", tag: str = "latest") -> list[str]:
        """The config's digest, then each layer's, as the model's manifest lists them."""
        manifest = json.loads(self.manifests[(repository, tag)])
        return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]

    def release(self) -> None:
        held, self.held = self.held, []
        for request, data in held:
            request.write(data)
            request.finish()

    def _blob(self, request: Request, digest: str) -> bytes:
        data = self.blobs.get(digest)
        if data is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
        request.setHeader(b"content-length", str(len(data)).encode())
        wanted = (request.getHeader(b"range") or b"").decode()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        if match and not self.ignore_range:
            first = int(match.group(1))
            last = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{len(data)}".encode())
            request.setHeader(b"content-length", str(last - first + 1).encode())
            data = data[first : last + 1]
        return b"" if request.method == b"HEAD" else data
