"""``/mirror/health``: is the mirror able to do its job, and if not, what is wrong.

Checks and what they mean for the answer:

- ``cache_writable`` — the cache directory exists and a file can be written in it.  If not, the
  mirror cannot cache anything: ``failing`` (503), so that a load balancer takes it out.
- ``disk_space`` — free space against ``cache.min_free_gb``.  Too little: ``degraded`` (downloads
  will be refused, cached models are still served).
- ``upstream`` — the upstream registry answers HTTP.  Down: ``degraded`` (cached models still work).
- ``shared_storage`` and ``redis`` — in a cluster (``cluster.*``), the object store and the Redis the
  nodes share.  Down: ``degraded`` (the node serves what it holds, fetches alone what it lacks).
- ``backend`` — the backend Ollama answers, when the inference proxy is on.  Down: ``degraded`` once
  the proxy is in use (the backend answered since start, or a client asked for inference); before
  that, ``absent``, which leaves the answer alone: a cache-only mirror is healthy.

The disk checks run per request in a worker thread (cheap, and they must see a disk that just
went read-only), one at a time however many probes arrive, and bounded in time.  The network
checks are never made per request: :class:`ReachabilityProbe` asks on a timer and remembers.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import TimeoutError as NetworkTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from .. import __version__
from ..cache.space import free_bytes, is_no_space
from ..cache.store import Store
from ..runner import Runner
from ..upstream.client import LOOP_HEADER, LOOP_STATUS, as_timeout, discard, network_reason
from .diskfull import DiskFullWatch
from .stats import SharedRun

log = Logger(namespace="ollama_mirror.health")  # pinned: log names are public

OK, DEGRADED, FAILING, PENDING, ABSENT = "ok", "degraded", "failing", "pending", "absent"
_RANK = {OK: 0, PENDING: 0, ABSENT: 0, DEGRADED: 1, FAILING: 2}
PROBE_INTERVAL = 30.0
PROBE_TIMEOUT = 10.0
DISK_CHECK_TIMEOUT = 5.0


@dataclass
class ProbeState:
    """The last answer of a reachability probe."""

    status: str = PENDING
    detail: str = "not checked yet"
    checked_at: float | None = None
    latency: float | None = None

    def document(self, url: str) -> dict[str, Any]:
        document: dict[str, Any] = {"status": self.status, "url": url, "detail": self.detail}
        if self.checked_at is not None:
            document["checked_at"] = datetime.fromtimestamp(self.checked_at, tz=UTC).isoformat(
                timespec="seconds"
            )
        if self.latency is not None:
            document["latency_seconds"] = round(self.latency, 4)
        return document

    @property
    def up(self) -> float | None:
        """1/0 for a gauge, ``None`` before the first answer."""
        return None if self.status == PENDING else float(self.status == OK)


class Probe:
    """Asks one dependency on a timer whether it answers; ``state`` holds the last answer.

    Subclasses say how to ask (:meth:`_ask`): :class:`ReachabilityProbe` for an HTTP service,
    :class:`CallProbe` for anything with a client of its own (the cluster's Redis and object store).
    """

    def __init__(self, name: str, url: str, clock: IReactorTime, *, timeout: float = PROBE_TIMEOUT) -> None:
        """*url* says where the dependency is, for the health document and log lines (no secrets)."""
        self.name = name
        self.url = url
        self._clock = clock
        self._timeout = timeout
        self._asking: Deferred[None] | None = None
        self.state = ProbeState()
        self.answered_once = False  # the dependency answered OK at least once since start

    async def _ask(self) -> tuple[str, str]:
        """(status, detail) of one question; raising means unreachable."""
        raise NotImplementedError

    def check(self) -> Deferred[None]:
        """Probe once and record the result; never fails.  Cancelling it (at shutdown) records nothing."""
        started = self._clock.seconds()
        asking = Deferred.fromCoroutine(self._ask())
        asking.addTimeout(self._timeout, self._clock, onTimeoutCancel=as_timeout)

        def record(result: tuple[str, str]) -> None:
            status, detail = result
            self._record(status, detail, started)

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            if failure.check(TimeoutError, NetworkTimeout):
                detail = f"no answer within {self._timeout:g} s"
            else:
                detail = f"unreachable: {network_reason(failure.value)}"
            self._record(DEGRADED, detail, started)

        def done(result: object) -> None:
            if self._asking is checked:
                self._asking = None

        checked: Deferred[None] = asking.addCallbacks(record, failed)  # the same Deferred, now of None
        checked.addErrback(lambda failure: log.failure("{name} probe failed", failure, name=self.name))
        checked.addBoth(done)
        if not checked.called:
            self._asking = checked
        return checked

    def tick(self) -> None:
        """The timer's call: start a probe unless one is still out.  It does not wait for the answer,
        so stopping the timer never waits on a network that does not answer."""
        if self._asking is None:
            self.check()

    def cancel(self) -> None:
        """Give up the probe in flight, if any (shutdown)."""
        if self._asking is not None:
            self._asking.cancel()

    def _record(self, status: str, detail: str, started: float) -> None:
        now = self._clock.seconds()
        was = self.state.status
        self.state = ProbeState(status, detail, now, now - started)
        self.answered_once |= status == OK
        if status != was and not (was == PENDING and status == OK):
            (log.info if status == OK else log.warn)(
                "{name} {url} {change}: {detail}",
                name=self.name,
                url=self.url,
                change="answers again" if status == OK else "is not answering",
                status=status,
                detail=detail,
            )

    def service(self, interval: float = PROBE_INTERVAL) -> TimerService:
        return _ProbeTimer(self, interval)


class ReachabilityProbe(Probe):
    """An HTTP service: any answer below 500 counts as reachable (a registry answers ``/v2/`` with 401
    when it wants a token); a 5xx, a refused connection or no answer within the timeout does not."""

    def __init__(
        self,
        name: str,
        url: str,
        agent: IAgent,
        clock: IReactorTime,
        *,
        ok_statuses: range = range(100, 500),
        timeout: float = PROBE_TIMEOUT,
        via: str = "",
    ) -> None:
        """*via*: the mirror's ``Via`` marker, so that a probe that reaches this mirror itself (an
        upstream that loops back, as in transparent mode without ``upstream.address``) says so."""
        super().__init__(name, url, clock, timeout=timeout)
        self._agent = agent
        self._ok_statuses = ok_statuses
        self._via = via.encode("latin-1")

    async def _ask(self) -> tuple[str, str]:
        headers = Headers({b"user-agent": [f"ollama-mirror/{__version__} (health probe)".encode()]})
        if self._via:
            headers.setRawHeaders(b"via", [self._via])
        response = await self._agent.request(b"GET", self.url.encode("ascii"), headers, None)
        await discard(response)
        if response.code == LOOP_STATUS and response.headers.hasHeader(LOOP_HEADER):
            return DEGRADED, "request loop: this address leads back to this mirror (set upstream.address)"
        if response.code in self._ok_statuses:
            return OK, f"answered {response.code}"
        return DEGRADED, f"answered {response.code}"


class CallProbe(Probe):
    """A dependency asked through its own client: *ask* returns what it answered, or raises why not."""

    def __init__(
        self,
        name: str,
        url: str,
        ask: Callable[[], Awaitable[str]],
        clock: IReactorTime,
        *,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        super().__init__(name, url, clock, timeout=timeout)
        self._call = ask

    async def _ask(self) -> tuple[str, str]:
        try:
            return OK, await self._call()
        except (CancelledError, TimeoutError, NetworkTimeout):
            raise
        except Exception as e:
            return DEGRADED, str(e) or type(e).__name__


class _ProbeTimer(TimerService):
    """Probes on a timer; stopping cancels the probe in flight."""

    def __init__(self, probe: Probe, interval: float) -> None:
        super().__init__(interval, probe.tick)
        self.clock = probe._clock
        self._probe = probe

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        self._probe.cancel()
        return stopped


@dataclass(frozen=True)
class DiskState:
    exists: bool
    writable: bool
    write_error: str | None
    free_bytes: int | None
    full: bool = False  # writing found no space: a matter of disk space, not of permissions


def inspect_cache(store: Store) -> DiskState:
    """Can the cache be written, and how much room is left?  (Blocking: runs in a thread.)

    A file is really written in the work area, on the same filesystem as ``blobs/``: ``os.access``
    cannot see exhausted inodes or a network filesystem that refuses writes.  A full disk is told apart:
    the cache is still served from, so it is a matter of ``disk_space``, not of ``cache_writable``.
    ``blobs/`` and ``manifests/`` are only checked with ``access``, so that nothing appears there
    that Ollama would have to ignore.
    """
    if not os.path.isdir(store.root):
        return DiskState(False, False, f"{store.root} does not exist", None)
    error: str | None = None
    full = False
    try:
        fd, path = tempfile.mkstemp(dir=store.work_dir, prefix=".health-")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
    except OSError as e:
        full = is_no_space(e)
        if not full:
            error = f"cannot write in {store.work_dir}: {e.strerror or e}"
    if error is None:
        for directory in (store.blobs_dir, store.manifests_dir):
            if not os.access(directory, os.W_OK | os.X_OK):
                error = f"{directory} is not writable"
                break
    try:
        free: int | None = free_bytes(store.root)
    except OSError:
        free = None
    return DiskState(True, error is None, error, free, full)


@dataclass
class HealthReport:
    status: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def http_status(self) -> int:
        return 503 if self.status == FAILING else 200

    def document(self) -> dict[str, Any]:
        return {"status": self.status, "checks": self.checks}


class HealthCheck:
    """Puts the checks together into one :class:`HealthReport`."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        clock: IReactorTime,
        *,
        min_free_bytes: int,
        upstream: ReachabilityProbe,
        backend: ReachabilityProbe | None = None,
        backend_asked: Callable[[], bool] = lambda: False,
        disk_full: DiskFullWatch | None = None,
        dependencies: Sequence[Probe] = (),
    ) -> None:
        """*backend_asked*: whether a client asked for inference since start (the proxy is in use);
        *disk_full* knows whether writes into the cache are failing for want of space; *dependencies*
        are further services the mirror uses (a cluster's Redis and object store), each a check."""
        self._store = store
        self._backend_asked = backend_asked
        self._clock = clock
        self._min_free = min_free_bytes
        self._disk: SharedRun[DiskState] = SharedRun(runner, lambda: inspect_cache(store))
        self.upstream = upstream
        self.backend = backend
        self.last_disk: DiskState | None = None
        self._disk_full = disk_full
        self.dependencies = tuple(dependencies)

    async def _disk_state(self) -> DiskState | str:
        """The disk's state, or why it could not be had."""
        waiting = self._disk()
        waiting.addTimeout(DISK_CHECK_TIMEOUT, self._clock)
        try:
            state = await waiting
        except TimeoutError:
            return f"checking {self._store.root} took longer than {DISK_CHECK_TIMEOUT:g} s"
        except Exception as e:
            return f"checking {self._store.root} failed: {e}"
        self.last_disk = state
        return state

    async def report(self) -> HealthReport:
        disk = await self._disk_state()
        checks: dict[str, dict[str, Any]] = {}
        if isinstance(disk, str):
            checks["cache_writable"] = {"status": FAILING, "path": self._store.root, "detail": disk}
            checks["disk_space"] = {"status": PENDING, "detail": disk}
        else:
            checks["cache_writable"] = {
                "status": OK if disk.writable else FAILING,
                "path": self._store.root,
                "detail": disk.write_error or "writable",
            }
            checks["disk_space"] = self._space(disk.free_bytes, disk.full)
        checks["upstream"] = self.upstream.state.document(self.upstream.url)
        if self.backend is not None:
            checks["backend"] = self._backend_check(self.backend)
        for dependency in self.dependencies:
            checks[dependency.name] = dependency.state.document(dependency.url)
        worst = max((check["status"] for check in checks.values()), key=lambda s: _RANK.get(s, 0))
        return HealthReport(OK if worst == PENDING else worst, checks)

    def _backend_check(self, backend: ReachabilityProbe) -> dict[str, Any]:
        document = backend.state.document(backend.url)
        in_use = backend.answered_once or self._backend_asked()
        if document["status"] == DEGRADED and not in_use:
            document["status"] = ABSENT
            document["detail"] = (
                f"no backend Ollama: {document['detail']} (pulls and the cache do not need one; the "
                "inference routes answer 502 until one runs)"
            )
        return document

    def _space(self, free: int | None, full: bool = False) -> dict[str, Any]:
        if self._disk_full is not None:
            if free is not None and not full:
                self._disk_full.free_space_seen(free)
            episode = self._disk_full.health()
            if episode is not None:
                return episode if free is None else {**episode, "free_bytes": free}
        if full:
            return {
                "status": DEGRADED,
                "free_bytes": free,
                "min_free_bytes": self._min_free,
                "detail": "the disk is full: cached models are served, nothing new can be stored",
            }
        if free is None:
            return {"status": PENDING, "detail": "free space unknown"}
        low = free < self._min_free
        return {
            "status": DEGRADED if low else OK,
            "free_bytes": free,
            "min_free_bytes": self._min_free,
            "detail": "below cache.min_free_gb: new downloads will not fit" if low else "enough",
        }
