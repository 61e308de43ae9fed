"""Caching a whole model on the mirror: the manifest, then every blob through the shared Fills.

One code path for ``/api/pull``, the daemon's prefetch list and ``ollama-mirror prefetch
--cache-dir``.  Progress is reported as the lines ``/api/pull`` streams (``status``, ``digest``,
``total``, ``completed``), so every caller can show it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater

from ..cache.manifests import ManifestCache, ManifestUnknown
from ..cache.space import NoSpace
from ..cache.store import Store, manifest_blobs
from ..events import Events
from ..names import ModelName
from ..upstream.client import AsClient
from ..upstream.errors import UpstreamError
from ..upstream.hosts import Upstreams
from .errors import FillFailed, PullFailed
from .manager import FillManager

PROGRESS_INTERVAL = 0.1  # Ollama reports about every 60 ms; clients redraw at this pace
HEARTBEAT = 1.0  # a line at least this often, even when nothing moved
WAIT_NOTICE = 5.0  # while the manifest is awaited: a line this often, after the first such wait

T = TypeVar("T")

Emit = Callable[[dict[str, Any]], None]


class ModelPuller:
    """Brings one model into the cache (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        manifests: ManifestCache,
        fills: FillManager,
        upstreams: Upstreams,
        clock: IReactorTime,
        events: Events | None = None,
    ) -> None:
        self._store = store
        self._manifests = manifests
        self._fills = fills
        self._upstreams = upstreams
        self._clock = clock
        self._events = events or Events()

    async def pull(self, name: ModelName, emit: Emit, user_agent: str | None = None) -> list[str]:
        """Cache *name*, reporting as Ollama does; the hex digests of the blobs that were fetched.

        *user_agent* is the asking client's, sent upstream for what is fetched on its behalf.  A caller
        that stops waiting (a client hanging up) stops only this report: the downloads it started go on.
        """
        found = self._upstreams.for_model_host(name.host)
        if found is None:
            served = ", ".join(u.host for u in self._upstreams)
            raise PullFailed(f"no upstream is configured for {name.host} (this mirror serves {served})")
        upstream = AsClient(found, user_agent)
        emit({"status": "pulling manifest"})
        try:
            manifest = await self._while_waiting(
                Deferred.fromCoroutine(self._manifests.by_tag(name, None, user_agent)),
                {"status": f"pulling manifest: waiting for {found.url} to answer"},
                emit,
            )
        except ManifestUnknown:
            raise PullFailed("pull model manifest: file does not exist") from None
        except UpstreamError as e:
            raise PullFailed(f"pull model manifest: {e.message}") from None
        self._events.model_used(name, True)
        blobs = manifest_blobs(manifest.data)
        if not blobs:
            raise PullFailed("pull model manifest: the upstream sent an unreadable manifest")
        ordered = [*blobs[1:], blobs[0]]  # layers first, then the config, as Ollama pulls them
        fetched = []
        for digest, size in ordered:  # start every download now; the fill gate spaces them out
            hexdigest = digest.removeprefix("sha256:")
            if self._store.blob_size(hexdigest) is None:
                self._fills.fill(hexdigest, size, name.repository, upstream)
                fetched.append(hexdigest)
        for digest, size in ordered:
            await self._report_blob(name, upstream, digest, size, emit)
        emit({"status": "verifying sha256 digest"})
        emit({"status": "writing manifest"})
        try:
            published = await self._manifests.publish(name, manifest)
        except NoSpace as e:
            raise PullFailed(e.message, 507) from None
        if not published:
            raise PullFailed(
                f"writing manifest: a blob of {name.display()} left the cache meanwhile; pull again"
            )
        emit({"status": "success"})
        return fetched

    async def _while_waiting(self, work: Deferred[T], notice: dict[str, Any], emit: Emit) -> T:
        """*work*'s result; meanwhile, after a few seconds and then every few seconds, *notice*: a slow
        or silent upstream shows as a wait (Ollama's CLI shows the status; proxies see a live stream)."""
        ticker = LoopingCall(emit, notice)
        ticker.clock = self._clock
        ticker.start(WAIT_NOTICE, now=False)
        try:
            return await work
        finally:
            ticker.stop()

    async def _report_blob(
        self, name: ModelName, upstream: AsClient, digest: str, size: int, emit: Emit
    ) -> None:
        hexdigest = digest.removeprefix("sha256:")
        status = f"pulling {hexdigest[:12]}"

        def line(completed: int) -> dict[str, Any]:
            report: dict[str, Any] = {"status": status, "digest": digest}
            if size:
                report["total"] = size
            if completed:
                report["completed"] = completed
            return report

        if self._store.blob_size(hexdigest) is not None:
            emit(line(size))
            return
        fill = self._fills.active(hexdigest) or self._fills.fill(hexdigest, size, name.repository, upstream)
        last, last_time = -1, self._clock.seconds()
        while not fill.ended:
            completed = fill.completed_bytes()
            if completed != last or self._clock.seconds() - last_time >= HEARTBEAT:
                emit(line(completed))
                last, last_time = completed, self._clock.seconds()
            await deferLater(self._clock, PROGRESS_INTERVAL)
        if fill.failure is not None:
            reason = fill.failure.getErrorMessage() if fill.failure.check(FillFailed) else "download failed"
            raise PullFailed(reason, 507 if fill.failure.check(NoSpace) else 500)
        emit(line(size))
