"""What a request asks for, read the way the routers will read it: its path, key, model and repository.

The access guard (:mod:`.access`) decides on these before any route runs, so each must agree with how the
routes themselves parse the request: the path segments as Klein routes them, the ``Bearer`` credential,
the model a JSON body names (read without consuming it), the registry or push route a path is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.server import Request

from ..names import InvalidName, ModelName

_PEEK_LIMIT = 1 << 20


def routed_path(request: Request) -> str:
    """The path as the routers match it: each segment unquoted, then joined with ``/``."""
    segments = [s.decode("utf-8") for s in (request.prepath or []) + (request.postpath or [])]
    return "/" + "/".join(segments)


def ambiguous_path(request: Request) -> bool:
    """Whether the path has a segment that routes differently from how it reads (see
    :mod:`.access`): an encoded slash, or an empty segment anywhere but at the end."""
    segments = (request.prepath or []) + (request.postpath or [])
    return any(b"/" in s for s in segments) or any(not s for s in segments[:-1])


def routed_path_lenient(request: Request) -> str:
    segments = [s.decode("utf-8", "replace") for s in (request.prepath or []) + (request.postpath or [])]
    return "/" + "/".join(segments)


def header_text(request: IRequest, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else ""


def bearer(request: IRequest) -> str | None:
    scheme, _, credential = header_text(request, b"authorization").strip().partition(" ")
    return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None


def model_in_body(request: Request) -> ModelName | None:
    """The model a ``/api/pull`` or ``/api/show`` body names (``model``, or the older ``name``)."""
    body = peek_json(request)
    text = None if body is None else body.get("model") or body.get("name")
    if not isinstance(text, str):
        return None
    try:
        return ModelName.parse(text)
    except InvalidName:
        return None


def peek_json(request: Request) -> dict[str, Any] | None:
    """The JSON body, read without consuming it (the route reads it again); ``None`` if unusable."""
    content = request.content
    if content is None:
        return None
    try:
        data = content.read(_PEEK_LIMIT + 1)
    finally:
        content.seek(0)
    try:
        document = json.loads(data or b"{}")
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


@dataclass(frozen=True)
class RegistryPath:
    """``/v2/<namespace>/<model>/<manifests|blobs>/<reference>``, split."""

    namespace: str
    model: str
    kind: str  # manifests | blobs
    reference: str


def registry_path(path: str) -> RegistryPath | None:
    parts = path.split("/")  # "", "v2", ns, model, kind, reference
    if len(parts) != 6 or parts[4] not in ("manifests", "blobs"):
        return None
    return RegistryPath(parts[2], parts[3], parts[4], parts[5])


_PUSH_PATH = re.compile(r"/v2/([^/]+/[^/]+)/(?:blobs/uploads/[^/]*|manifests/[^/]+)")


def push_repository(path: str) -> str | None:
    """The repository (``namespace/model``) a push route names, or ``None``."""
    match = _PUSH_PATH.fullmatch(path)
    return match.group(1) if match else None


WEB_UI_PATH = "/mirror/ui"


def is_web_ui(path: str) -> bool:
    """Whether *path* is the web page's (``/mirror/ui`` and below), which checks its sessions itself."""
    return path == WEB_UI_PATH or path.startswith(WEB_UI_PATH + "/")
