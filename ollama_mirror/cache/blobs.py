"""The storage seam: where blobs and manifests live, and the blobs still arriving.

The web layer serves blobs from a :class:`BlobStore` (complete, verified ones) or from a
:class:`GrowingBlob` (a download in progress, which a :class:`BlobFetches` starts or joins), and
manifests through the manifest cache from a :class:`ManifestStore`; a download publishes into the
blob store once its sha256 is verified.  Today one implementation stands behind the stores: the local
models directory (:class:`ollama_mirror.cache.store.Store`), whose files the web layer sends with
``sendfile``.  A shared tier (an S3-compatible store in a cluster) slots in behind the same interfaces:
as a :class:`BlobSource` that downloads read before the upstream, as a store a verified blob is also
published to, and as a place clients may be redirected to; the local directory stays the read-through
cache the web layer serves from (:class:`SharedTier`).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ..names import ModelName


class BlobStore(Protocol):
    """Complete, verified blobs by hex digest."""

    def blob_size(self, hexdigest: str) -> int | None:
        """The blob's size, or ``None`` when the store does not hold it."""

    def open_blob(self, hexdigest: str) -> int:
        """A read-only descriptor of the blob's bytes, of the caller's own (``FileNotFoundError``)."""

    def publish_blob(self, hexdigest: str, fd: int) -> None:
        """Make the verified file behind *fd* the blob, atomically (blocking: runs in a thread)."""


class ManifestStore(Protocol):
    """Manifests, by tag (``<host>/<namespace>/<model>/<tag>``) and by digest, as upstream bytes."""

    def read_manifest(self, name: ModelName) -> bytes | None: ...

    def manifest_stamp(self, name: ModelName) -> tuple[int, int, int] | None:
        """Something that changes whenever the tag's manifest is rewritten (a stat, locally)."""

    def write_manifest(self, name: ModelName, data: bytes) -> bool:
        """Keep a tag's manifest; whether it is published (all its blobs are held) or waits for them."""

    def read_digest_manifest(self, hexdigest: str) -> bytes | None: ...

    def write_digest_manifest(self, hexdigest: str, data: bytes) -> None: ...


class GrowingBlob(Protocol):
    """A blob being downloaded, as its readers see it: how much is on disk, and when more will be."""

    size: int
    complete: bool
    failure: Failure | None

    def available(self, offset: int) -> int:
        """Bytes from *offset* on that can be read now."""

    def wait(self, offset: int) -> Deferred[None]:
        """Fires (a Deferred of the caller's own) when bytes at *offset* are readable; fails with the
        download."""

    def when_done(self) -> Deferred[None]:
        """Fires when the blob is verified and published; fails if it never will be."""

    def open_reader(self) -> int:
        """A read-only descriptor of the blob's bytes for one reader, valid across the publish."""


class BlobSource(Protocol):
    """Where a download gets bytes from: the upstream registry, or a shared storage tier."""

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse: ...


class SharedTier(Protocol):
    """The cluster's shared copy of blobs and manifests (an S3-compatible store), read before the upstream;
    what this node verifies is added to it (:mod:`ollama_mirror.cluster.shared`)."""

    def source(self, fallback: BlobSource) -> BlobSource:
        """A source that reads a blob from the shared copy when it holds it, else from *fallback*."""

    async def read_manifest(self, name: ModelName) -> bytes | None:
        """The tag's manifest in the shared copy (whose blobs are all there too), or ``None``."""


class BlobFetches(Protocol):
    """Who brings blobs into the store: at most one download per blob, joined by everyone who asks."""

    def active(self, hexdigest: str) -> GrowingBlob | None:
        """The blob's download in progress, if any."""

    def fill(
        self, hexdigest: str, size: int, repository: str, source: BlobSource | None = None
    ) -> GrowingBlob:
        """The blob's download in progress, or a new one from *source* (the default source if None)."""
