"""Manifests: cached verbatim, revalidated after a TTL, served from the cache when upstream is away.

Tags are mutable, so a cached tag is checked against the upstream once ``cache.manifest_ttl``
has passed since it was last confirmed.  If the upstream cannot be reached (or fails), the cached
bytes are served anyway and the event is logged: that is what keeps an air-gapped site working.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from .events import Events
from .names import ModelName
from .runner import Runner
from .store import Store, manifest_blobs
from .upstream import Upstream, UpstreamError, media_type_of

log = Logger()


class ManifestUnknown(Exception):
    """Neither the cache nor the upstream has this manifest."""


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    source: str  # "cache", "upstream" or "stale" (cached, served because upstream failed)

    @property
    def hexdigest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hexdigest


class ManifestCache:
    def __init__(
        self,
        store: Store,
        upstream: Upstream,
        runner: Runner,
        clock: Any,
        ttl: float,
        events: Events | None = None,
    ) -> None:
        self._events = events or Events()
        self._store = store
        self._upstream = upstream
        self._runner = runner
        self._clock = clock
        self._ttl = ttl
        self._confirmed: dict[ModelName, float] = {}  # when a cached tag last matched upstream
        self.blob_sizes: dict[str, int] = {}  # hex digest -> size, from every manifest seen

    def _remember_sizes(self, data: bytes) -> None:
        for digest, size in manifest_blobs(data):
            if digest.startswith("sha256:"):
                self.blob_sizes[digest[7:]] = size

    async def by_tag(
        self, name: ModelName, accept: list[str] | None = None, user_agent: str | None = None
    ) -> Manifest:
        cached = self._store.read_manifest(name)
        confirmed = self._confirmed.get(name)
        if cached is not None and confirmed is not None and self._clock.seconds() - confirmed < self._ttl:
            self._remember_sizes(cached)
            return Manifest(cached, media_type_of(cached, ""), "cache")
        try:
            fetched = await self._upstream.manifest(name.repository, name.tag, accept, user_agent)
        except UpstreamError as e:
            if e.status == 404:
                raise ManifestUnknown(f"manifest unknown: {name}") from None
            if cached is None:
                raise
            log.warn(
                "upstream failed for {name} ({error}); serving the cached manifest",
                name=str(name),
                error=e.message,
            )
            self._remember_sizes(cached)
            return Manifest(cached, media_type_of(cached, ""), "stale")
        if fetched.data != cached:
            await self._runner.run(self._store.write_manifest, name, fetched.data)
            if cached is not None:
                log.info("tag {name} changed upstream; cached the new manifest", name=str(name))
        self._confirmed[name] = self._clock.seconds()
        self._events.manifest_revalidated(name)
        self._remember_sizes(fetched.data)
        return Manifest(fetched.data, fetched.media_type, "upstream" if fetched.data != cached else "cache")

    async def by_digest(
        self, name: ModelName, hexdigest: str, accept: list[str] | None = None, user_agent: str | None = None
    ) -> Manifest:
        """A manifest by its digest: immutable, so the cached copy never needs revalidation."""
        cached = self._store.read_digest_manifest(hexdigest)
        if cached is None:
            tagged = self._store.read_manifest(name)
            if tagged is not None and hashlib.sha256(tagged).hexdigest() == hexdigest:
                cached = tagged
        if cached is not None:
            self._remember_sizes(cached)
            return Manifest(cached, media_type_of(cached, ""), "cache")
        try:
            fetched = await self._upstream.manifest(
                name.repository, "sha256:" + hexdigest, accept, user_agent
            )
        except UpstreamError as e:
            if e.status == 404:
                raise ManifestUnknown(f"manifest unknown: {name.repository}@sha256:{hexdigest}") from None
            raise
        if fetched.digest != "sha256:" + hexdigest:
            raise UpstreamError(
                f"upstream sent a manifest with digest {fetched.digest} for sha256:{hexdigest}", 502
            )
        await self._runner.run(self._store.write_digest_manifest, hexdigest, fetched.data)
        self._remember_sizes(fetched.data)
        return Manifest(fetched.data, fetched.media_type, "upstream")
