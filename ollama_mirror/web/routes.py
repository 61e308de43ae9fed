"""The mirror's routes by name: the labels requests carry in logs and metrics, and the inference routes.

A label comes from a small fixed set (never the raw path, a model name or a digest), so that it is a safe
metrics label; the metrics create every series up front from :data:`ROUTES`.
"""

from __future__ import annotations

PROXIED = (
    "generate",
    "chat",
    "embed",
    "embeddings",
    "ps",
    "create",
    "copy",
    "push",
)  # /api/..., to the backend
_API_ROUTES = ("pull", "tags", "show", "delete", "version")
_API_INFERENCE = frozenset({*PROXIED, "blobs"})
_MIRROR_ROUTES = ("stats", "health", "ui")
ROUTES = (
    "root",
    "registry_version",
    "registry_manifest",
    "registry_blob",
    "registry_other",
    *(f"api_{name}" for name in _API_ROUTES),
    "api_inference",
    "api_other",
    "openai",
    *(f"mirror_{name}" for name in _MIRROR_ROUTES),
    "mirror_other",
    "metrics",
    "other",
)


def route_of(path: bytes) -> str:
    """The route a request path belongs to, from a small fixed set (a safe metrics label: never the
    raw path, a model name or a digest)."""
    if path == b"/":
        return "root"
    parts = path.split(b"/")
    top = parts[1] if len(parts) > 1 else b""
    second = parts[2].decode("latin-1") if len(parts) > 2 else ""
    if top == b"v2":
        if b"/blobs/" in path:
            return "registry_blob"
        if b"/manifests/" in path:
            return "registry_manifest"
        return "registry_version" if path in (b"/v2", b"/v2/") else "registry_other"
    if top == b"api":
        if second in _API_ROUTES and len(parts) == 3:
            return "api_" + second
        return "api_inference" if second in _API_INFERENCE else "api_other"
    if top == b"v1":
        return "openai"
    if top == b"mirror":
        if second == "ui":  # (the page and everything below it: one label)
            return "mirror_ui"
        return "mirror_" + second if second in _MIRROR_ROUTES and len(parts) == 3 else "mirror_other"
    if path == b"/metrics":
        return "metrics"
    return "other"
