"""Requests the mirror sent itself, refused: an upstream whose name or address leads back to the mirror
(transparent mode without an address override) answers 508 instead of looping.

Every upstream request carries ``Via: 1.1 ollama-mirror-<id of this cache>`` (the cache's marker); a
request that arrives with it came from this very mirror.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ..upstream.client import LOOP_HEADER, LOOP_STATUS
from .errors import ollama_error, registry_error

log = Logger(namespace="ollama_mirror.upstreams")  # pinned: log names are public


class LoopGuard(Resource):
    """A leaf wrapper (around the Klein root) that refuses requests this mirror sent itself."""

    isLeaf = True

    def __init__(self, wrapped: IResource, marker: str) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._token = marker.split(" ", 1)[1].encode("ascii")

    def render(self, request: Request) -> Any:
        via = b",".join(request.requestHeaders.getRawHeaders(b"via") or [])
        if self._token not in via:
            return self._wrapped.render(request)
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        message = (
            f"request loop: this request came from this mirror itself (Host {host}); an upstream's "
            "name or address leads back to the mirror: give it an address override (upstream.address, "
            "or address in upstream.hosts) that reaches the real registry"
        )
        log.error(
            "refused {method} {path}: {message}",
            method=request.method.decode(),
            path=request.path.decode("latin-1"),
            message=message,
        )
        request.setHeader(LOOP_HEADER, b"refused")
        if request.path.startswith(b"/v2"):
            return registry_error(request, LOOP_STATUS, "UNAVAILABLE", message)
        return ollama_error(request, LOOP_STATUS, message)
