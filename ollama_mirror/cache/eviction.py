"""Keeping the cache within its limits: retention, a size cap by least recent use, admission.

A sweep (every ``cache.cleanup_interval`` seconds, and on demand) removes models unused for
``cache.retention_days``, then least recently used models until the cache is under
``cache.max_size_gb``, then blobs no manifest references and partial downloads nobody resumed.
A blob another kept model references stays; so does anything being downloaded or served.  Pinned
tags (:mod:`.pins`) and private models are never evicted.

Before a download starts, :meth:`Sweeper.admit` makes room for it or refuses it with a clear
reason (larger than the whole cache, or not enough free disk even after evicting).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import CacheConfig
from ..events import Events, FillView
from ..names import ModelName, PrivateNamespaces
from ..runner import Runner
from .catalog import CachedModel, Catalog
from .index import CacheIndex
from .lock import staging_in_use
from .pins import Pins
from .space import NoSpace, free_bytes, is_no_space
from .store import Store, pid_alive, prune_empty_dirs, same_file

log = Logger(namespace="ollama_mirror.eviction")  # pinned: log names are public

GB = 10**9
DAY = 86400.0
ORPHAN_GRACE = 3600.0  # a blob fetched by digest alone may get its manifest a little later
PARTIAL_GRACE = DAY  # a partial download nobody resumed for a day is abandoned
TEMP_GRACE = 3600.0  # temporary files left by a crash during an atomic write
INDEX_FLUSH_INTERVAL = 5.0
_BLOB_NAME = re.compile(r"sha256-([0-9a-f]{64})")
_PARTIAL_NAME = re.compile(r"sha256-([0-9a-f]{64})\.(part|json)")
_WANTS_NAME = re.compile(r"sha256-[0-9a-f]{64}\.part\.wants\.([0-9]{1,10})-[0-9]{1,10}")


class NoRoom(NoSpace):
    """A download the cache cannot take: larger than the cap, or the disk is too full (the download
    fails with these words, answered 507 Insufficient Storage)."""


@dataclass
class SweepReport:
    removed_models: list[str] = field(default_factory=list)
    removed_blobs: int = 0
    freed_bytes: int = 0
    removed_partials: int = 0
    cache_bytes: int = 0
    models: int = 0
    seconds: float = 0.0
    by_reason: dict[str, list[int]] = field(default_factory=dict)  # reason -> [models, blobs, bytes]
    index_skipped: bool = False  # the disk was full: the index was not updated (the files were swept)

    def count(self, reason: str, models: int = 0, blobs: int = 0, size: int = 0) -> None:
        totals = self.by_reason.setdefault(reason, [0, 0, 0])
        totals[0] += models
        totals[1] += blobs
        totals[2] += size
        self.removed_blobs += blobs
        self.freed_bytes += size


class Sweeper(Events):
    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        index: CacheIndex,
        config: CacheConfig,
        runner: Runner,
        clock: IReactorTime,
        events: Events,
        protected: Callable[[], set[str]],
        private: PrivateNamespaces | None = None,
        pins: Pins | None = None,
    ) -> None:
        """*private*: the namespaces whose models were pushed here, the only copy: never evicted, nor
        emptied with the cache (only removed on purpose, one by one).  *pins*: the tags an operator
        pinned, kept the same way."""
        self.private = private if private is not None else PrivateNamespaces()
        self.pins = pins
        self.store = store
        self.catalog = catalog
        self.index = index
        self.config = config
        self.runner = runner
        self.clock = clock
        self.events = events
        self.protected = protected  # hex digests being downloaded or served right now
        self.cache_bytes = 0  # blobs on disk, as of the last sweep plus downloads since
        self._lock = DeferredLock()
        self.last_report: SweepReport | None = None

    @property
    def cap(self) -> int:
        return int(self.config.max_size_gb * GB)

    # --- listening -----------------------------------------------------------------------------

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        if error is None:
            self.cache_bytes += fill.size

    # --- sweeping ------------------------------------------------------------------------------

    async def sweep(self, room: int = 0) -> SweepReport:
        """One sweep; *room* asks for that many bytes under the cap for a download about to start."""
        await self._lock.acquire()
        try:
            protected = set(self.protected())
            pending = self.index.take_pending()
            now = self.clock.seconds()
            report: SweepReport = await self.runner.run(self._sweep, protected, pending, now, room)
        finally:
            self._lock.release()
        self.cache_bytes = report.cache_bytes
        self.last_report = report
        if report.index_skipped:
            log.warn("sweep: the cache index was not updated: the disk is full (the next sweep catches up)")
        for reason, (models, blobs, size) in report.by_reason.items():
            self.events.evicted(models, blobs, size, reason)
        if report.removed_models or report.removed_blobs or report.removed_partials:
            log.info(
                "sweep: removed {models} models, {blobs} blobs ({freed} bytes), {partials} partial files "
                "in {seconds:.2f} s; cache now {size} bytes in {count} models",
                models=len(report.removed_models),
                blobs=report.removed_blobs,
                freed=report.freed_bytes,
                partials=report.removed_partials,
                seconds=report.seconds,
                size=report.cache_bytes,
                count=report.models,
            )
        return report

    async def sweep_logging_errors(self) -> None:
        """For the TimerService: a failing sweep is logged, and the next one still runs."""
        try:
            await self.sweep()
        except Exception:  # the loop must survive anything one sweep runs into
            log.failure(
                "cache sweep failed; the next one runs in {interval} s", interval=self.config.cleanup_interval
            )

    def _sweep(self, protected: set[str], pending: Any, now: float, room: int) -> SweepReport:
        """The sweep proper (worker thread)."""
        started = time.monotonic()
        report = SweepReport()
        self._index_write(report, self.index.flush, pending)
        self._settle_manifests(protected)
        models = self.catalog.models(complete_only=False)
        blobs = _blob_files(self.store.blobs_dir)
        self._index_write(report, self.index.reconcile, models, blobs)
        usage = self.index.model_usage()
        refs: Counter[str] = Counter(digest for m in models for digest, _ in m.blobs)
        remaining = {str(m.name): m for m in models}
        total = sum(size for size, _ in blobs.values())

        def remove(model: CachedModel, reason: str) -> None:
            nonlocal total
            name = str(model.name)
            if not self._unlink_manifest(model):
                return
            del remaining[name]
            report.removed_models.append(name)
            report.count(reason, models=1)
            for digest, _ in model.blobs:
                refs[digest] -= 1
                if refs[digest] <= 0 and digest not in protected and digest in blobs:
                    freed = self._unlink_blob(digest, blobs)
                    total -= freed
                    report.count(reason, blobs=1, size=freed)

        def last_used(model: CachedModel) -> float:
            found = usage.get(str(model.name))
            return found.last_used if found is not None else model.modified

        cutoff = now - self.config.retention_days * DAY
        kept = self._kept_on_purpose()
        evictable = [m for m in remaining.values() if not kept(m.name)]
        for model in sorted(evictable, key=last_used):
            if last_used(model) < cutoff and not _in_use(model, protected):
                remove(model, "retention")
        limit = self.cap - room
        for model in sorted(evictable, key=last_used):
            if total <= limit:
                break
            if str(model.name) in remaining and not _in_use(model, protected):
                remove(model, "size")
        blob_used = self.index.blob_last_used()
        for digest, (_size, mtime) in list(blobs.items()):
            if refs[digest] > 0 or digest in protected:
                continue
            if now - max(mtime, blob_used.get(digest, 0.0)) >= ORPHAN_GRACE:
                freed = self._unlink_blob(digest, blobs)
                total -= freed
                report.count("orphan", blobs=1, size=freed)
        report.removed_partials = self._remove_abandoned(protected, now)
        self._index_write(report, self.index.forget_models, report.removed_models)
        gone = [d for d in self.index.blob_last_used() if d not in blobs]
        self._index_write(report, self.index.forget_blobs, gone)
        report.cache_bytes = total
        report.models = len([m for m in remaining.values() if m.complete])
        report.seconds = time.monotonic() - started
        return report

    def _kept_on_purpose(self) -> Callable[[ModelName], bool]:
        """(thread) Whether a model is removed on purpose alone: private (the only copy) or pinned (the
        operator's wish).  The pins are read afresh: ``ollama-mirror pin`` may have changed them."""
        pinned = self.pins.names() if self.pins is not None else frozenset()
        return lambda name: self.private.holds(name) or str(name) in pinned

    @staticmethod
    def _index_write(report: SweepReport, write: Callable[..., None], *args: Any) -> None:
        """(thread) An update of the index; on a full disk it is skipped and the sweep goes on, since
        the sweep is what frees space (the files are the truth: the next sweep brings the index back)."""
        try:
            write(*args)
        except Exception as e:
            if not is_no_space(e):
                raise
            report.index_skipped = True

    def _unlink_manifest(self, model: CachedModel) -> bool:
        try:
            os.unlink(model.path)
        except FileNotFoundError:
            return False
        root = self.store.staged_dir if model.staged else self.store.manifests_dir
        prune_empty_dirs(os.path.dirname(model.path), root)
        return True

    def _settle_manifests(self, protected: set[str]) -> None:
        """(thread) Keep ``manifests/`` a models directory Ollama can run: a tag there whose blobs are
        not all cached (an older cache, a blob removed by hand) waits among the staged again, unless one
        of its blobs is arriving; a staged tag whose blobs are all here now is published."""
        for model in self.catalog.models(complete_only=False):
            if not model.staged and not model.complete and not _in_use(model, protected):
                self.store.stage_manifest(model.name)
        self.catalog.promote()

    def _unlink_blob(self, digest: str, blobs: dict[str, tuple[int, float]]) -> int:
        size, _ = blobs.pop(digest, (0, 0.0))
        try:
            os.unlink(self.store.blob_path(digest))
        except FileNotFoundError:
            return 0
        return size

    def _remove_abandoned(self, protected: set[str], now: float) -> int:
        """Partial downloads nobody resumed for a while, and temporary files left by a crash.

        A partial file goes only while the sweep holds its download lock (so no worker can be
        downloading into it, nor lock it between our look and the unlink), and its record with it.
        A record goes with its file, or alone once it is old and its file is gone.
        """
        removed = 0
        partial_dir = self.store.partial_dir
        entries = _scan(partial_dir)
        names = {entry.name for entry in entries}
        for entry in entries:
            match = _PARTIAL_NAME.fullmatch(entry.name)
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            wants = _WANTS_NAME.fullmatch(entry.name)
            if wants is not None:  # a follower's list of wanted chunks: kept while its process lives
                if not pid_alive(int(wants.group(1))):
                    removed += _unlink_counted(entry.path)
                continue
            if match is None:
                if age >= TEMP_GRACE and not staging_in_use(partial_dir, entry.name):
                    removed += _unlink_counted(entry.path)
                continue
            hexdigest, kind = match.group(1), match.group(2)
            if age < PARTIAL_GRACE or hexdigest in protected:
                continue
            if kind == "json":
                if f"sha256-{hexdigest}.part" not in names:  # (else it goes with its file, below)
                    removed += _remove_lone_record(self.store.partial_path(hexdigest), entry.path, now)
                continue
            removed += _remove_partial(entry.path, self.store.state_path(hexdigest))
        for root in (self.store.manifests_dir, self.store.staged_dir):
            for directory, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(directory, name)
                    if name.startswith(".tmp-") and now - os.stat(path).st_mtime >= TEMP_GRACE:
                        os.unlink(path)
                        removed += 1
        return removed

    # --- admission -----------------------------------------------------------------------------

    async def admit(self, fill: FillView) -> None:
        """Make room for a download, or refuse it with :class:`NoRoom` saying why."""
        if fill.size > self.cap:
            raise NoRoom(
                f"blob {fill.digest} is {fill.size} bytes, more than the whole cache may hold "
                f"(cache.max_size_gb = {self.config.max_size_gb:g})",
                self.store.root,
            )
        if self.cache_bytes + fill.size > self.cap:
            await self.sweep(room=fill.size)
        free = await self.runner.run(free_bytes, self.store.root)
        # what the partial file already takes on disk is ours: never count it against the download
        needed = fill.size - max(fill.resumed_bytes, fill.allocated_bytes) + int(self.config.min_free_gb * GB)
        if free < needed:
            await self.sweep(room=fill.size + needed - free)
            free = await self.runner.run(free_bytes, self.store.root)
            if free < needed:
                raise NoRoom(
                    f"not enough disk space for blob {fill.digest}: {fill.size} bytes wanted, {free} free, "
                    f"and cache.min_free_gb = {self.config.min_free_gb:g} must stay free",
                    self.store.root,
                    free,
                )

    # --- removing on request -------------------------------------------------------------------

    async def delete_model(self, name: ModelName) -> list[str] | None:
        """Remove one model (``/api/delete``), keeping blobs other models or running work use.

        The removed blobs' hex digests, or ``None`` when the model is not cached.  Runs under the
        sweep lock, so it never races an eviction.
        """
        await self._lock.acquire()
        try:
            removed: list[str] | None = await self.runner.run(
                self.catalog.delete, name, frozenset(self.protected())
            )
            if removed is not None:
                await self.runner.run(self.index.forget_models, [str(name)])
                if self.pins is not None:  # removed on purpose: a later pull of it is not kept forever
                    await self.runner.run(self.pins.unpin, name)
        finally:
            self._lock.release()
        if removed is not None:
            self.events.evicted(1, len(removed), 0, "admin")
        return removed

    # --- emptying ------------------------------------------------------------------------------

    async def clear(self) -> SweepReport:
        """Remove every model and blob (``DELETE /mirror/cache``), except what is in use right now."""
        await self._lock.acquire()
        try:
            protected = set(self.protected())
            report: SweepReport = await self.runner.run(self._clear, protected)
        finally:
            self._lock.release()
        self.cache_bytes = report.cache_bytes
        self.events.evicted(len(report.removed_models), report.removed_blobs, report.freed_bytes, "admin")
        self.last_report = report
        log.info(
            "cache emptied: {models} models, {blobs} blobs, {freed} bytes",
            models=len(report.removed_models),
            blobs=report.removed_blobs,
            freed=report.freed_bytes,
        )
        return report

    def _clear(self, protected: set[str]) -> SweepReport:
        report = SweepReport()
        kept = self._kept_on_purpose()
        for model in self.catalog.models(complete_only=False):
            if kept(model.name):
                protected.update(digest for digest, _ in model.blobs)
                continue
            if self._unlink_manifest(model):
                report.removed_models.append(str(model.name))
        for name in self.catalog.staged():  # (those a published manifest of the same tag hid)
            path = self.store.staged_manifest_path(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            prune_empty_dirs(os.path.dirname(path), self.store.staged_dir)
        blobs = _blob_files(self.store.blobs_dir)
        report.count("admin", models=len(report.removed_models))
        for digest in list(blobs):
            if digest not in protected:
                report.count("admin", blobs=1, size=self._unlink_blob(digest, blobs))
        report.removed_partials = self._remove_abandoned(protected, float("inf"))
        self._index_write(report, self.index.forget_models, report.removed_models)
        report.cache_bytes = sum(size for size, _ in blobs.values())
        return report


def _in_use(model: CachedModel, protected: set[str]) -> bool:
    return any(digest in protected for digest, _ in model.blobs)


def _scan(directory: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as entries:
            return [e for e in entries if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _blob_files(directory: str) -> dict[str, tuple[int, float]]:
    """Every complete blob file: hex digest -> (size, mtime).  Other names are Ollama's business."""
    found = {}
    for entry in _scan(directory):
        match = _BLOB_NAME.fullmatch(entry.name)
        if match:
            st = entry.stat()
            found[match.group(1)] = (st.st_size, st.st_mtime)
    return found


class CacheLifecycle(MultiService):
    """The sweep on its ``TimerService`` and the index flushes, started and stopped with the daemon."""

    def __init__(self, sweeper: Sweeper, clock: IReactorTime, sweeps: bool = True) -> None:
        super().__init__()
        self.sweeper = sweeper
        if sweeps:  # (of several worker processes, one sweeps)
            timer = TimerService(sweeper.config.cleanup_interval, self._sweep)
            timer.clock = clock
            timer.setServiceParent(self)
        self._flusher = LoopingCall(self._flush)
        self._flusher.clock = clock

    def _sweep(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.sweeper.sweep_logging_errors())

    def _flush(self) -> Deferred[None]:
        index = self.sweeper.index
        d = self.sweeper.runner.run(index.flush, index.take_pending())
        d.addErrback(self._flush_failed)
        return d

    @staticmethod
    def _flush_failed(failure: Failure) -> None:
        if failure.value is not None and is_no_space(failure.value):
            log.warn("cache index: recent use times not recorded: the disk is full")
        else:
            log.failure("cache index update failed", failure)

    def startService(self) -> None:
        super().startService()
        self._flusher.start(INDEX_FLUSH_INTERVAL, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop the timers, then write the last usage and close the index (the thread pool is still up)."""
        if self._flusher.running:
            self._flusher.stop()
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._flush())
        d.addBoth(lambda _: self.sweeper.runner.run(self.sweeper.index.close))
        return d


def _unlink_counted(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


def _remove_partial(partial: str, record: str) -> int:
    """Remove an abandoned partial file and its record while holding the file's download lock;
    nothing if a worker holds it.  The number of files removed."""
    try:
        fd = os.open(partial, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a worker is downloading (or resuming) it
        if not same_file(partial, fd):
            return 0  # replaced meanwhile by a download that just started
        return _unlink_counted(partial) + _unlink_counted(record)
    finally:
        os.close(fd)


def _remove_lone_record(partial: str, record: str, now: float) -> int:
    """Remove a record whose partial file is gone (a crash between two unlinks), unless a download
    has started meanwhile (its file exists, or it wrote the record anew)."""
    if os.path.exists(partial):
        return 0
    try:
        if now - os.stat(record).st_mtime < PARTIAL_GRACE:
            return 0
    except FileNotFoundError:
        return 0
    return _unlink_counted(record)
