"""The page's static files, shipped inside the package and served under names that carry their hash.

``app.css`` is served as ``app.<hash>.css``: the page names the current hash, so browsers may keep a file a
year (``immutable``) and still get a new one the moment an upgrade changes it.  Nothing is fetched from
anywhere else (the page must work on an air-gapped site).  The files are read once, at start-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from twisted.web.server import Request

from ..errors import ollama_error

PACKAGE = "ollama_mirror.web.ui"
STATIC_PATH = "/mirror/ui/static/"
LONG_LIVED = b"public, max-age=31536000, immutable"
_TYPES = {
    "css": b"text/css; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "svg": b"image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    name: str  # as shipped: app.js
    hashed: str  # as served: app.0123456789ab.js
    body: bytes
    content_type: bytes

    @property
    def url(self) -> str:
        return STATIC_PATH + self.hashed


def _read(package: str, directory: str) -> dict[str, Asset]:
    found = {}
    for entry in resources.files(package).joinpath(directory).iterdir():
        stem, _, extension = entry.name.rpartition(".")
        if extension not in _TYPES or not entry.is_file():
            continue
        body = entry.read_bytes()
        hashed = f"{stem}.{hashlib.sha256(body).hexdigest()[:12]}.{extension}"
        found[entry.name] = Asset(entry.name, hashed, body, _TYPES[extension])
    return found


def read_template(name: str) -> str:
    return resources.files(PACKAGE).joinpath("templates", name).read_text("utf-8")


class Assets:
    """``/mirror/ui/static/<name>.<hash>.<ext>``: the files, with long-lived cache headers."""

    def __init__(self) -> None:
        self.files = _read(PACKAGE, "static")
        self._by_hashed = {asset.hashed: asset for asset in self.files.values()}

    def url(self, name: str) -> str:
        return self.files[name].url

    def render(self, request: Request, name: str) -> bytes:
        """The answer to a GET or HEAD of *name*, as served (hashed)."""
        asset = self._by_hashed.get(name)
        if asset is None:
            request.setHeader(b"cache-control", b"no-store")
            return ollama_error(
                request, 404, "no such file (the page may be older than the daemon: reload it)"
            )
        etag = f'"{asset.hashed}"'.encode()
        request.setHeader(b"content-type", asset.content_type)
        request.setHeader(b"cache-control", LONG_LIVED)
        request.setHeader(b"etag", etag)
        request.setHeader(b"x-content-type-options", b"nosniff")
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-length", str(len(asset.body)).encode())
        return asset.body if request.method != b"HEAD" else b""
