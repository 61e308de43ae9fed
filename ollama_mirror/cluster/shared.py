"""The cluster's shared copy of blobs and manifests, in an S3-compatible store.

Every node keeps its cache directory, now a read-through cache of the shared copy:

- a download reads a blob from the shared copy when it holds it, and from the upstream only when it
  does not (:meth:`SharedStore.source`), through the same Fill (ranges, resume, verification);
- a tag this node has never seen is looked for in the shared copy before the upstream
  (:meth:`SharedStore.read_manifest`);
- what this node verifies goes into the shared copy: each blob once it is published here (uploaded
  from the local file, whole or in parts, visible only when complete), and each tag's manifest once all
  its blobs are in the shared copy, never before; the same rule as ``manifests/``.

Objects use the models-directory layout under the configured prefix: ``blobs/sha256-<hex>`` and
``manifests/<host>/<namespace>/<model>/<tag>``.  Uploads run in the background, two at a time; a node
that dies mid-upload leaves at most an unfinished multipart upload (aborted when it fails here; a
bucket lifecycle rule for incomplete uploads is the backstop, see the README).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from ..cache.blobs import BlobSource
from ..cache.store import Store, manifest_blobs
from ..events import Events, FillView
from ..names import ModelName
from ..runner import Runner
from ..upstream.errors import UpstreamError
from .leases import Leases
from .peers import PeerSource
from .s3 import S3Client

if TYPE_CHECKING:
    pass

log = Logger(namespace="ollama_mirror.cluster")

# Seconds a blob found missing in the shared copy is believed missing (another node may add it).
ABSENT_FOR = 5.0
# Seconds a blob found in the shared copy is believed there (the sweep of the shared copy may remove it).
HELD_FOR = 300.0
UPLOADS_AT_ONCE = 2
REDIRECT_SECONDS = 3600  # how long a presigned blob URL works (a slow client's parts need it that long)
MAX_HOLDERS_TRIED = 3  # holders that stopped answering, one after another, before fetching alone


def blob_name(hexdigest: str) -> str:
    return f"blobs/sha256-{hexdigest}"


def manifest_name(name: ModelName) -> str:
    return posixpath.join("manifests", name.host, name.namespace, name.model, name.tag)


class SharedStore(Events):
    def __init__(
        self,
        s3: S3Client,
        store: Store,
        clock: IReactorTime,
        runner: Runner,
        leases: Leases | None = None,
        peer: Callable[[str], PeerSource] | None = None,
    ) -> None:
        """*leases* and *peer* (a source reading from the node at a URL) make one upstream transfer per
        blob for the whole cluster; without them each node fetches what the shared copy lacks."""
        self.s3 = s3
        self._store = store
        self._clock = clock
        self._runner = runner
        self.leases = leases
        self.peer = peer
        self._held: dict[str, tuple[int, float]] = {}  # hex digest -> (size, when seen) in the shared copy
        self._absent: dict[str, float] = {}  # hex digest -> when it was found missing
        self._uploading: dict[str, list[Deferred[bool]]] = {}  # hex digest -> who waits for its upload
        self._gate = DeferredSemaphore(UPLOADS_AT_ONCE)
        self.followed: set[str] = set()  # blobs read from the node holding their lease
        self.silent: set[tuple[str, str]] = set()  # (blob, holder) pairs already logged as not answering
        self.uploaded_bytes = 0

    # --- reading -------------------------------------------------------------------------------

    async def holds(self, hexdigest: str) -> int | None:
        """The blob's size in the shared copy, or ``None`` when it is not there (asked at most every few
        seconds per blob)."""
        held = self._held.get(hexdigest)
        if held is not None and self._clock.seconds() - held[1] < HELD_FOR:
            return held[0]
        missing_since = self._absent.get(hexdigest)
        if missing_since is not None and self._clock.seconds() - missing_since < ABSENT_FOR:
            return None
        size = await self.s3.size(self.s3.storage.key(blob_name(hexdigest)))
        if size is None:
            self._absent[hexdigest] = self._clock.seconds()
        else:
            self._held[hexdigest] = (size, self._clock.seconds())
            self._absent.pop(hexdigest, None)
        return size

    def source(self, fallback: BlobSource) -> BlobSource:
        return _TieredSource(self, fallback)

    async def open_range(self, hexdigest: str, start: int, end: int | None) -> IResponse:
        try:
            return await self.s3.open_range(self.s3.storage.key(blob_name(hexdigest)), start, end)
        except UpstreamError as e:
            if e.status == 404:  # (swept meanwhile): look again next time
                self._held.pop(hexdigest, None)
            raise

    async def redirect(self, hexdigest: str) -> str | None:
        """``cluster.redirect_to_storage``: a presigned URL of the blob when the shared copy holds it (a
        store that fails now answers ``None``: the node streams the blob itself)."""
        try:
            held = await self.holds(hexdigest)
        except UpstreamError:
            return None
        if held is None:
            return None
        return self.s3.presigned_get(self.s3.storage.key(blob_name(hexdigest)), REDIRECT_SECONDS)

    async def read_manifest(self, name: ModelName) -> bytes | None:
        return await self.s3.get_document(self.s3.storage.key(manifest_name(name)))

    async def remove_manifest(self, name: ModelName) -> bool:
        """Remove the tag from the shared copy (its blobs go with the next sweep once no tag references
        them); whether it was there."""
        key = self.s3.storage.key(manifest_name(name))
        if await self.s3.size(key) is None:
            return False
        await self.s3.delete(key)
        log.info("manifest of {name} removed from {where}", name=str(name), where=self.s3.storage.describe())
        return True

    # --- adding what this node verified ----------------------------------------------------------

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        hexdigest = fill.hexdigest
        followed = hexdigest in self.followed
        self.followed.discard(hexdigest)
        self.silent = {pair for pair in self.silent if pair[0] != hexdigest}
        if error is not None:
            self._release(hexdigest)  # another node may take it from here
            return
        if followed and self.leases is not None and not self.leases.holds(hexdigest):
            return  # (read from the holder, which stores it in the shared copy)
        stored = self.add_blob(hexdigest).addErrback(self._failed, f"blob {fill.digest}")
        stored.addBoth(lambda _: self._release(hexdigest))  # held until the shared copy has it

    def _release(self, hexdigest: str) -> None:
        if self.leases is not None and self.leases.holds(hexdigest):
            self.leases.release(hexdigest)

    def manifest_published(self, name: ModelName) -> None:
        Deferred.fromCoroutine(self.add_manifest(name)).addErrback(self._failed, f"the manifest of {name}")

    def add_blob(self, hexdigest: str) -> Deferred[bool]:
        """Upload a blob published here unless the shared copy holds it; fires True once it does (one
        upload per blob at a time; everyone who asks meanwhile gets its outcome)."""
        waiting = Deferred[bool]()
        if hexdigest in self._uploading:
            self._uploading[hexdigest].append(waiting)
        else:
            self._uploading[hexdigest] = [waiting]  # (before the upload starts: it may end at once)
            Deferred.fromCoroutine(self._upload(hexdigest)).addBoth(self._uploaded, hexdigest)
        return waiting

    def _uploaded(self, outcome: bool | Failure, hexdigest: str) -> None:
        for waiting in self._uploading.pop(hexdigest, []):
            if isinstance(outcome, Failure):
                waiting.errback(outcome)
            else:
                waiting.callback(outcome)

    async def _upload(self, hexdigest: str) -> bool:
        size = self._store.blob_size(hexdigest)
        if size is None:
            return False  # (evicted meanwhile)
        self._absent.pop(hexdigest, None)
        if await self.holds(hexdigest) == size:
            return True
        await self._gate.acquire()
        try:
            path = self._store.blob_path(hexdigest)
            await self.s3.upload_file(self.s3.storage.key(blob_name(hexdigest)), path, size)
        finally:
            self._gate.release()
        self._held[hexdigest] = (size, self._clock.seconds())
        self.uploaded_bytes += size
        log.info(
            "blob sha256:{hexdigest} stored in {where}", hexdigest=hexdigest, where=self.s3.storage.describe()
        )
        return True

    async def add_manifest(self, name: ModelName) -> None:
        """Upload a tag's manifest once all its blobs are in the shared copy (uploading those that are
        only here); a tag whose blobs cannot all be there is left out."""
        data = await self._runner.run(self._store.read_manifest, name)
        if data is None or not self._store.blobs_present(data):
            return
        for digest, _ in manifest_blobs(data):
            if not await self.add_blob(digest.removeprefix("sha256:")):
                return
        key = self.s3.storage.key(manifest_name(name))
        if await self.s3.get_document(key) == data:
            return
        await self.s3.put_document(key, data, "application/vnd.docker.distribution.manifest.v2+json")
        log.info("manifest of {name} stored in {where}", name=str(name), where=self.s3.storage.describe())

    async def share(self, names: list[ModelName]) -> int:
        """Add the tags this node holds to the shared copy, with the blobs it lacks (at start: a node
        joining with a full cache directory, or one filled by ``import``, shares what it has); how many
        tags were added."""
        added = 0
        for name in names:
            key = self.s3.storage.key(manifest_name(name))
            try:
                if await self.s3.size(key) is None:
                    await self.add_manifest(name)
                    added += await self.s3.size(key) is not None
            except UpstreamError as e:
                log.warn("could not share {name}: {reason}", name=str(name), reason=e.message)
        return added

    def _failed(self, failure: Failure, what: str) -> None:
        error = failure.value
        reason = error.message if isinstance(error, UpstreamError) else failure.getErrorMessage()
        log.warn("could not store {what} in the shared storage: {reason}", what=what, reason=reason)


class _TieredSource:
    """A download's source: the shared copy when it holds the blob; else, in a cluster with leases, the
    node that holds the blob's lease (or the upstream, when this node holds it); else the upstream."""

    def __init__(self, shared: SharedStore, fallback: BlobSource) -> None:
        self._shared = shared
        self._fallback = fallback
        self.origin = "upstream"  # where the latest range came from (for the fill's log line)
        self.kind = "upstream"  # the same, for the counters: upstream, storage or node

    async def open_range(self, repository: str, digest: str, start: int, end: int | None) -> IResponse:
        hexdigest = digest.removeprefix("sha256:")
        shared = self._shared
        try:
            held = await shared.holds(hexdigest)
        except UpstreamError as e:
            log.warn(
                "shared storage failed ({error}); reading sha256:{hexdigest} elsewhere",
                error=e.message,
                hexdigest=hexdigest,
            )
            held = None
        if held is not None:
            self._from("storage", "the shared storage")
            try:
                return await shared.open_range(hexdigest, start, end)
            except UpstreamError as e:
                if e.status != 404:
                    raise  # (else it was swept from the shared copy meanwhile: read it elsewhere)
        self._from("upstream", "upstream")
        if shared.leases is None or shared.peer is None:
            return await self._fallback.open_range(repository, digest, start, end)
        return await self._from_the_holder(shared.leases, shared.peer, repository, digest, start, end)

    async def honours_ranges(self, digest: str) -> bool:
        """Whether ranges of the blob will be answered with 206 without a probe: the shared copy holds it
        (asking the store at most once: :meth:`open_range` then knows).  Should it be swept meanwhile, a
        fallback that ignores ranges fails the range with 502, retried, and the next download probes."""
        try:
            return await self._shared.holds(digest.removeprefix("sha256:")) is not None
        except UpstreamError:
            return False  # (open_range logs it)

    def _from(self, kind: str, origin: str) -> None:
        self.kind, self.origin = kind, origin

    async def _from_the_holder(
        self,
        leases: Leases,
        peer: Callable[[str], PeerSource],
        repository: str,
        digest: str,
        start: int,
        end: int | None,
    ) -> IResponse:
        hexdigest = digest.removeprefix("sha256:")
        try:
            claim = await leases.claim(hexdigest)
        except Exception as e:  # Redis away: fetch on our own (two transfers, never a failed pull)
            log.warn(
                "cluster leases failed ({error}); fetching sha256:{hexdigest} alone",
                error=e,
                hexdigest=hexdigest,
            )
            return await self._fallback.open_range(repository, digest, start, end)
        for _ in range(MAX_HOLDERS_TRIED):
            if claim.ours:
                break
            self._shared.followed.add(hexdigest)
            self._from("node", f"node {claim.holder}")
            source = peer(claim.holder)
            try:
                return await source.open_range(repository, digest, start, end)
            except UpstreamError as e:
                if e.status is not None:
                    raise  # (it answered: the usual retries apply)
                if (hexdigest, claim.holder) not in self._shared.silent:  # (once, not per connection)
                    self._shared.silent.add((hexdigest, claim.holder))
                    log.warn(
                        "node {node} holding sha256:{hexdigest} does not answer; waiting for its lease",
                        node=claim.holder,
                        hexdigest=hexdigest,
                    )
                claim = await leases.wait_for_takeover(hexdigest, claim.holder, source.answers)
        self._shared.followed.discard(hexdigest)  # ours now (or no holder answers): from the upstream
        self._from("upstream", "upstream")
        return await self._fallback.open_range(repository, digest, start, end)
