"""Manifests: cached verbatim, revalidated after a TTL, served from the cache when upstream is away.

Tags are mutable, so a cached tag is checked against the upstream once ``cache.manifest_ttl``
has passed since it was last confirmed.  If the upstream cannot be reached (or fails), the cached
bytes are served anyway and the event is logged: that is what keeps an air-gapped site working.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..events import Events
from ..names import ModelName, PrivateNamespaces
from ..runner import Runner
from ..upstream.client import Upstream, media_type_of
from ..upstream.errors import UpstreamError
from ..upstream.hosts import Upstreams
from .blobs import SharedTier
from .space import is_no_space, no_space
from .store import Store, manifest_blobs

log = Logger(namespace="ollama_mirror.manifests")  # pinned: log names are public


class ManifestUnknown(Exception):
    """Neither the cache nor the upstream has this manifest."""


@dataclass(frozen=True)
class Manifest:
    data: bytes
    media_type: str
    source: str  # "cache", "upstream" or "stale" (cached, served because upstream failed)

    @cached_property
    def hexdigest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def digest(self) -> str:
        return "sha256:" + self.hexdigest


class ManifestCache:
    def __init__(
        self,
        store: Store,
        upstreams: Upstreams,
        runner: Runner,
        clock: IReactorTime,
        ttl: float,
        events: Events | None = None,
        shared: SharedTier | None = None,
        private: PrivateNamespaces | None = None,
    ) -> None:
        """*shared*: the cluster's copy, where a tag this node has never seen is looked for before the
        upstream (then it is a cached copy like any other: revalidated after the TTL, served when the
        upstream is away); *private*: the namespaces pushed here, never asked of an upstream."""
        self._private = private if private is not None else PrivateNamespaces()
        self._events = events or Events()
        self._shared = shared
        self._store = store
        self._upstreams = upstreams
        self._runner = runner
        self._clock = clock
        self._ttl = ttl
        self._confirmed: dict[ModelName, float] = {}  # when a cached tag last matched upstream
        self._revalidating: dict[ModelName, _Shared] = {}
        # The last cached manifest read per tag, with the file's stamp when it was read: a fresh hit is a
        # stat and a dict lookup, not a read, a JSON parse and a sha256 per request.
        self._read: dict[ModelName, tuple[tuple[int, int, int], Manifest]] = {}
        self.blob_sizes: dict[str, int] = {}  # hex digest -> size, from every manifest seen

    def _upstream(self, name: ModelName) -> Upstream:
        """The upstream of the name's host (the cache keeps each host's manifests apart)."""
        upstream = self._upstreams.for_model_host(name.host)
        if upstream is None:
            raise UpstreamError(f"no upstream is configured for {name.host}", kind="config", lasting=True)
        return upstream

    def _remember_sizes(self, data: bytes) -> None:
        for digest, size in manifest_blobs(data):
            if digest.startswith("sha256:"):
                self.blob_sizes[digest[7:]] = size

    def expire(self, name: ModelName) -> None:
        """Forget that the cached tag was confirmed: the next ask goes to the upstream (a refresh)."""
        self._confirmed.pop(name, None)

    def fresh(self, name: ModelName) -> Manifest | None:
        """The cached manifest of a tag confirmed upstream less than ``cache.manifest_ttl`` ago, at once
        (``None``: :meth:`by_tag` must look further).  The file is stat'ed on every call, so a manifest
        another worker rewrote or the sweeper removed is never served from memory."""
        confirmed = self._confirmed.get(name)
        if confirmed is None or self._clock.seconds() - confirmed >= self._ttl:
            return None
        stamp = self._store.manifest_stamp(name)
        if stamp is None:
            self._read.pop(name, None)
            return None
        known = self._read.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        data = self._store.read_manifest(name)
        if data is None:
            return None
        self._remember_sizes(data)
        manifest = Manifest(data, media_type_of(data, ""), "cache")
        self._read[name] = (stamp, manifest)
        return manifest

    def in_hand(self, name: ModelName) -> bool:
        """Whether a request for this tag needs no upstream request of its own: it was confirmed upstream
        less than ``cache.manifest_ttl`` ago, or a fetch of it is under way (the request shares its
        answer).  No disk access: this is asked of every request, before it is answered."""
        if name in self._revalidating:
            return True
        confirmed = self._confirmed.get(name)
        return confirmed is not None and self._clock.seconds() - confirmed < self._ttl

    async def by_tag(
        self, name: ModelName, accept: list[str] | None = None, user_agent: str | None = None
    ) -> Manifest:
        hit = self.fresh(name)
        if hit is not None:
            return hit
        if self._private.holds(name):
            return await self._private_tag(name)
        cached = self._store.read_manifest(name)
        running = self._revalidating.get(name)
        if running is None:  # the first asker fetches; everyone asking meanwhile shares its answer
            running = self._revalidating[name] = _Shared(self._revalidate(name, cached, accept, user_agent))
            running.done.addBoth(lambda _: self._revalidating.pop(name, None))
        return await running.wait()

    async def _private_tag(self, name: ModelName) -> Manifest:
        """A pushed tag: what is here (or in a cluster's shared storage), or unknown (there is no upstream
        to ask)."""
        data = await self._runner.run(self._store.read_manifest, name)
        if data is None and self._shared is not None:  # (pushed to another node of the cluster)
            data = await self._from_shared(name)
        if data is None:
            raise ManifestUnknown(f"manifest unknown: {name} (a private model that was never pushed)")
        self._remember_sizes(data)
        return Manifest(data, media_type_of(data, ""), "cache")

    async def _revalidate(
        self, name: ModelName, cached: bytes | None, accept: list[str] | None, user_agent: str | None
    ) -> Manifest:
        if cached is None and self._shared is not None:
            cached = await self._from_shared(name)
        try:
            # with a cached copy to fall back on, one try: the upstream's trouble must not delay it
            upstream = self._upstream(name)
            fetched = await upstream.manifest(
                name.repository, name.tag, accept, user_agent, patient=cached is None
            )
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
            kept = await self._keep(f"the manifest of {name}", self._store.write_manifest, name, fetched.data)
            if kept and cached is not None:
                log.info("tag {name} changed upstream; cached the new manifest", name=str(name))
        self._confirmed[name] = self._clock.seconds()
        self._events.manifest_revalidated(name)
        self._remember_sizes(fetched.data)
        return Manifest(fetched.data, fetched.media_type, "upstream" if fetched.data != cached else "cache")

    async def _from_shared(self, name: ModelName) -> bytes | None:
        """The tag from the cluster's copy, kept here too (staged until its blobs are on this node)."""
        try:
            data = await self._shared.read_manifest(name) if self._shared is not None else None
        except UpstreamError as e:
            log.warn(
                "shared storage failed for {name} ({error}); asking the upstream",
                name=str(name),
                error=e.message,
            )
            return None
        if data is not None:
            await self._keep(f"the manifest of {name}", self._store.write_manifest, name, data)
        return data

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
        if self._private.holds(name):
            raise ManifestUnknown(f"manifest unknown: {name.repository}@sha256:{hexdigest}")
        try:
            fetched = await self._upstream(name).manifest(
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
        await self._keep(
            f"manifest sha256:{hexdigest}", self._store.write_digest_manifest, hexdigest, fetched.data
        )
        self._remember_sizes(fetched.data)
        return Manifest(fetched.data, fetched.media_type, "upstream")

    async def publish(self, name: ModelName, manifest: Manifest) -> bool:
        """Write a tag's manifest at the end of a whole-model pull, so that it is in ``manifests/``
        whether it was staged or could not be kept when it was fetched; False if a blob it lists is not
        cached after all (then it stays staged).  Raises :class:`NoSpace` when the disk is full."""
        try:
            published = await self._runner.run(self._store.write_manifest, name, manifest.data)
        except Exception as e:
            if not is_no_space(e):
                raise
            full = no_space(f"the manifest of {name}", getattr(e, "filename", None) or self._store.root)
            self._events.disk_full(full.message, full.path, full.free)
            raise full from None
        if published:
            self._events.manifest_published(name)
        return bool(published)

    async def _keep(self, what: str, write: Callable[[Any, bytes], object], key: Any, data: bytes) -> bool:
        """Write a fetched manifest into the cache; whether it was.  On a full disk the manifest is
        still served (it is in hand), only not kept: the disk-full event tells the operator.  A tag
        published with it (its blobs all here) is announced."""
        try:
            published = await self._runner.run(write, key, data)
        except Exception as e:
            if not is_no_space(e):
                raise
            full = no_space(what, getattr(e, "filename", None) or self._store.root)
            self._events.disk_full(full.message, full.path, full.free)
            return False
        if published is True and isinstance(key, ModelName):
            self._events.manifest_published(key)
        return True


class _Shared:
    """One running fetch whose outcome many requests wait for, each on a Deferred of its own, so that
    a client hanging up (Klein cancels its handler) never cancels the fetch for the others."""

    def __init__(self, work: Coroutine[Any, Any, Manifest]) -> None:
        self._waiters: list[Deferred[Manifest]] = []
        self._outcome: Manifest | Failure | None = None
        self.done: Deferred[None] = Deferred.fromCoroutine(work).addBoth(self._finished)

    def _finished(self, outcome: Manifest | Failure) -> None:
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def wait(self) -> Deferred[Manifest]:
        waiter: Deferred[Manifest] = Deferred(
            lambda d: self._waiters.remove(d) if d in self._waiters else None
        )
        if isinstance(self._outcome, Failure):
            waiter.errback(self._outcome)
        elif self._outcome is not None:
            waiter.callback(self._outcome)
        else:
            self._waiters.append(waiter)
        return waiter
