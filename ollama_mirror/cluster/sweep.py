"""Keeping the shared copy within the retention rules, for the whole cluster, one sweeper at a time.

Every node notes in Redis when it served each tag (at most once a minute per tag), so "last used" is the
cluster's, not one node's.  Every ``cache.cleanup_interval`` seconds each node tries to take the
sweeper's lease, a Redis key that lives nine tenths of the interval: one node sweeps per interval,
whichever gets it, and a node that dies mid-sweep leaves the next one to another.  The sweep:

- removes the manifest of every tag no node used for ``cache.retention_days`` (the last note, or when the
  manifest was written, whichever is later);
- removes every blob no remaining manifest lists, written more than an hour ago (a blob goes in before
  the manifests that list it: a younger one may be waiting for its manifest);
- aborts every multipart upload started more than a day ago (a node that died mid-upload).

``cache.max_size_gb`` bounds each node's own disk; the shared copy is bounded by retention alone.
"""

from __future__ import annotations

import posixpath
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..cache.store import manifest_blobs
from ..events import Events
from ..names import InvalidName, ModelName
from ..units import human_size
from .s3 import S3Client

log = Logger(namespace="ollama_mirror.cluster")

DAY = 86400.0
NOTE_EVERY = 60.0  # seconds between two notes of one tag's use by one node
BLOB_GRACE = 3600.0  # a blob younger than this may still be waiting for its manifest
UPLOAD_GRACE = DAY  # a multipart upload older than this was abandoned


class SweepStore(Protocol):
    """The Redis operations of the sweep: the sweeper's lease and the notes of use."""

    def set_if_absent(self, key: str, value: str, ttl_ms: int) -> Awaitable[bool]: ...

    def mark_used(self, key: str, name: str, when: float) -> Awaitable[None]: ...

    def used(self, key: str) -> Awaitable[dict[str, float]]: ...

    def forget_used(self, key: str, name: str) -> Awaitable[None]: ...


@dataclass
class SharedSweepReport:
    tags: int = 0
    blobs: int = 0
    freed_bytes: int = 0
    uploads: int = 0


class SharedSweep(Events):
    def __init__(
        self,
        s3: S3Client,
        store: SweepStore,
        clock: IReactorTime,
        node: str,
        namespace: str,
        retention_days: float,
        interval: float,
    ) -> None:
        self._s3 = s3
        self._store = store
        self._clock = clock
        self._node = node
        self._lease_key = f"{namespace}:sweeper"
        self._used_key = f"{namespace}:used"
        self._retention = retention_days * DAY
        self.interval = interval
        self._noted: dict[str, float] = {}  # tag -> when this node last noted its use
        self._sweeping: Deferred[object] | None = None

    # --- notes of use --------------------------------------------------------------------------

    def model_used(self, name: ModelName, pulled: bool) -> None:
        now = self._clock.seconds()
        tag = str(name)
        if now - self._noted.get(tag, -NOTE_EVERY) < NOTE_EVERY:
            return
        self._noted[tag] = now
        noted = Deferred.fromCoroutine(_await(self._store.mark_used(self._used_key, tag, now)))
        noted.addErrback(lambda failure: None)  # (a lost note: the tag looks older, never younger)

    # --- the sweep -----------------------------------------------------------------------------

    async def sweep(self) -> SharedSweepReport | None:
        """Sweep the shared copy if this node gets the sweeper's lease; ``None`` if another has it."""
        ttl_ms = int(self.interval * 0.9 * 1000)
        if not await self._store.set_if_absent(self._lease_key, self._node, ttl_ms):
            return None
        report = SharedSweepReport()
        now = self._clock.seconds()
        kept = await self._expire_tags(now, report)
        await self._drop_unlisted_blobs(kept, now, report)
        for upload in await self._s3.list_uploads(self._s3.storage.key("")):
            if now - upload.initiated > UPLOAD_GRACE:
                await self._s3.abort_upload(upload.key, upload.upload_id)
                report.uploads += 1
        if report.tags or report.blobs or report.uploads:
            log.info(
                "swept the shared storage: {tags} tags past retention, {blobs} blobs no tag lists "
                "({size}), {uploads} abandoned uploads",
                tags=report.tags,
                blobs=report.blobs,
                size=human_size(report.freed_bytes),
                uploads=report.uploads,
            )
        return report

    async def _expire_tags(self, now: float, report: SharedSweepReport) -> list[str]:
        """Remove the manifests of tags past retention; the keys of those kept."""
        manifests = self._s3.storage.key("manifests/")
        used = await self._store.used(self._used_key)
        kept: list[str] = []
        for entry in await self._s3.list_objects(manifests):
            name = _tag_of(entry.key.removeprefix(manifests))
            last = max(entry.modified, used.get(str(name), 0.0))
            if name is None or self._retention <= 0 or now - last <= self._retention:
                kept.append(entry.key)
                continue
            await self._s3.delete(entry.key)
            await self._store.forget_used(self._used_key, str(name))
            report.tags += 1
            log.info(
                "removed {name} from the shared storage: unused for cache.retention_days", name=str(name)
            )
        return kept

    async def _drop_unlisted_blobs(self, manifests: list[str], now: float, report: SharedSweepReport) -> None:
        """Remove the blobs none of *manifests* lists (once past their grace time)."""
        listed: set[str] = set()
        for key in manifests:
            document = await self._s3.get_document(key)
            if document is not None:
                listed.update(digest.removeprefix("sha256:") for digest, _ in manifest_blobs(document))
        for entry in await self._s3.list_objects(self._s3.storage.key("blobs/")):
            hexdigest = entry.key.rsplit("sha256-", 1)[-1]
            if hexdigest not in listed and now - entry.modified > BLOB_GRACE:
                await self._s3.delete(entry.key)
                report.blobs += 1
                report.freed_bytes += entry.size

    def tick(self) -> None:
        """The timer's call: one sweep at a time; a failed one is logged, the next interval tries again."""
        if self._sweeping is None:
            self._sweeping = Deferred.fromCoroutine(self.sweep())
            self._sweeping.addErrback(self._failed).addBoth(self._swept)

    def _swept(self, _: object) -> None:
        self._sweeping = None

    def _failed(self, failure: Failure) -> None:
        log.warn("sweeping the shared storage failed: {error}", error=failure.getErrorMessage())

    def service(self) -> TimerService:
        timer = TimerService(self.interval, self.tick)
        timer.clock = self._clock
        return timer


def _tag_of(path: str) -> ModelName | None:
    """``<host>/<namespace>/<model>/<tag>`` (a manifest's key below ``manifests/``) → the tag's name."""
    parts = path.split("/")
    if len(parts) != 4:
        return None
    try:
        return ModelName.parse(f"{posixpath.join(*parts[:3])}:{parts[3]}")
    except InvalidName:
        return None


async def _await(awaitable: Awaitable[None]) -> None:
    await awaitable
