"""Logs an operator can use: one line per request, fill start/progress/end, and where it all goes.

Requests are observed by :class:`RequestObserver`, a wrapper around the root resource rather than
``Site.log``: the Site only logs requests that *finish*, and the ones an operator most needs to
see do not (a client hanging up mid-blob, the Go client dropping its discovery GET, a corrupt
download aborted on purpose).  Being a resource, it also works for applications that mount
:meth:`Mirror.resource` in a Site of their own, and under ``StubTreq`` in tests.  Each finished or
broken-off request becomes one :class:`RequestRecord`, handed to every listener (the access log,
the metrics, the stats).

Under twistd, :func:`log_observer` builds the daemon's log observer from ``logging.*`` (level,
file with size rotation, text or JSON lines), and the tap installs it as the application's
``ILogObserver``, the hook twistd documents for this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    Logger,
)
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ..events import Events, FillView
from ..units import human_size

access_log = Logger(namespace="ollama_mirror.access")
fill_log = Logger(namespace="ollama_mirror.fill")
log = Logger(namespace="ollama_mirror.logs")  # pinned: log names are public

FILL_PROGRESS_INTERVAL = 10.0
MAX_LOGGED_PATH = 300

# --- one record per request ----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """What one request did, as the access log, the metrics and the stats see it."""

    method: str
    uri: str  # as the client sent it, control characters escaped, cut to MAX_LOGGED_PATH
    route: str  # one of a small fixed set of labels (see ``RequestObserver``'s *route_of*)
    status: int | None  # None: the client hung up before an answer began
    sent: int  # body bytes written
    duration: float  # seconds, on the mirror's clock
    cache: str | None  # the x-mirror-cache header: hit/fill (blobs), cache/upstream/stale (manifests)
    client: str
    complete: bool  # False: the response never ended cleanly (client gone, or aborted on purpose)

    @property
    def status_class(self) -> str:
        return "none" if self.status is None else f"{self.status // 100}xx"

    @property
    def kind(self) -> str | None:
        """``blob`` or ``manifest`` for the registry's content routes, else ``None``."""
        return {"registry_blob": "blob", "registry_manifest": "manifest"}.get(self.route)

    @property
    def source(self) -> str | None:
        """Where the body came from: ``cache``, ``fill`` (a download in progress) or ``upstream``."""
        return _SOURCES.get(self.cache or "") if self.kind else None

    @property
    def hit(self) -> bool | None:
        """Was it answered from the cache (``None``: not a cacheable answer)?"""
        source = self.source
        return None if source is None else source == "cache"


_SOURCES = {"hit": "cache", "cache": "cache", "stale": "cache", "fill": "fill", "upstream": "upstream"}


RequestListener = Callable[[RequestRecord], None]


def _printable(text: str) -> str:
    """A client-controlled string made safe for one log line."""
    if text.isascii() and text.isprintable():  # the usual case: nothing to escape (" " to "~")
        cleaned = text
    else:
        cleaned = "".join(c if " " <= c < "\x7f" else f"\\x{ord(c):02x}" for c in text)
    return cleaned if len(cleaned) <= MAX_LOGGED_PATH else cleaned[:MAX_LOGGED_PATH] + "..."


def _client(request: IRequest) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return str(host) if host is not None else type(address).__name__.removesuffix("Address").lower()


class RequestObserver:
    """Times every request on the mirror's clock and tells the listeners how it ended.

    *route_of* names the route of a request path from a small fixed set (a safe metrics label: never
    the raw path, a model name or a digest); the web layer knows its routes (``web.routes``).
    """

    def __init__(
        self, clock: IReactorTime, route_of: Callable[[bytes], str], listeners: Iterable[RequestListener] = ()
    ) -> None:
        self._clock = clock
        self._route_of = route_of
        self._listeners = list(listeners)
        self.in_flight = 0

    def listen(self, listener: RequestListener) -> None:
        self._listeners.append(listener)

    def wrap(self, resource: IResource) -> IResource:
        """The root resource to serve instead of *resource* (a Klein app's resource, a leaf)."""
        return _ObservedResource(resource, self)

    def track(self, request: Request) -> None:
        started = self._clock.seconds()
        self.in_flight += 1
        request.notifyFinish().addBoth(self._ended, request, started)

    def _ended(self, result: object, request: Request, started: float) -> None:
        self.in_flight -= 1
        cache = request.responseHeaders.getRawHeaders(b"x-mirror-cache")
        record = RequestRecord(
            method=_printable(request.method.decode("latin-1")),
            uri=_printable(request.uri.decode("latin-1")),
            route=self._route_of(request.path),
            status=request.code if request.startedWriting else None,
            sent=request.sentLength,
            duration=max(0.0, self._clock.seconds() - started),
            cache=cache[0].decode("latin-1") if cache else None,
            client=_client(request),
            complete=not isinstance(result, Failure),
        )
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener's bug must not break serving
                log.failure("request listener {listener} failed", listener=listener)


class _ObservedResource(Resource):
    """A leaf wrapper: starts tracking, then lets the wrapped leaf (the Klein root) render."""

    isLeaf = True

    def __init__(self, wrapped: IResource, observer: RequestObserver) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._observer = observer

    def render(self, request: Request) -> Any:
        self._observer.track(request)
        return self._wrapped.render(request)


class MirrorSite(Site):
    """A Site without Twisted's combined-format access log: :class:`AccessLog` writes one line per
    request instead, including requests that never finish."""

    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


# --- the lines -----------------------------------------------------------------------------------


class AccessLog:
    """One line per request: method, path, status, bytes, duration, cache outcome, client.

    The line is made here once (``log_text``, what ``logfiles.ClassicText`` and ``json_line`` print)
    as well as carried as a format with its fields, for any other observer."""

    def __call__(self, record: RequestRecord) -> None:
        status = record.status if record.status is not None else "-"
        cache = record.cache or "-"
        ending = "" if record.complete else " (not completed)"
        access_log.info(
            "{client} {method} {uri} {status} {sent} B {duration:.3f} s cache={cache}{ending}",
            client=record.client,
            method=record.method,
            uri=record.uri,
            status=status,
            sent=record.sent,
            duration=record.duration,
            cache=cache,
            ending=ending,
            route=record.route,
            complete=record.complete,
            log_text=f"{record.client} {record.method} {record.uri} {status} {record.sent} B "
            f"{record.duration:.3f} s cache={cache}{ending}",
        )


class FillLog(Events):
    """Fill start, progress every few seconds, and end with its rate and result."""

    def __init__(self, clock: IReactorTime, running: Callable[[], Iterable[FillView]]) -> None:
        self._clock = clock
        self._running = running  # the Fills in progress (FillManager.fills.values)
        self._last: dict[str, tuple[float, int]] = {}  # digest -> (when, completed bytes) at the last line

    def fill_started(self, fill: FillView) -> None:
        self._last[fill.digest] = (self._clock.seconds(), fill.completed_bytes())
        if fill.following:
            fill_log.info(
                "fill {short}: another worker downloads it; serving the chunks it finishes",
                short=fill.digest[:19],
                digest=fill.digest,
                repository=fill.repository,
                size=fill.size,
            )
            return
        fill_log.info(
            "fill {short} started: {size_text} for {repository}, {resumed_text} already on disk",
            short=fill.digest[:19],
            digest=fill.digest,
            repository=fill.repository,
            size=fill.size,
            size_text=human_size(fill.size),
            resumed=fill.resumed_bytes,
            resumed_text=human_size(fill.resumed_bytes),
        )

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        self._last.pop(fill.digest, None)
        now = self._clock.seconds()
        elapsed = max(0.0, now - fill.started_at) if fill.started_at is not None else 0.0
        rate = fill.received_bytes / elapsed if elapsed > 0 else 0.0
        fields = {
            "short": fill.digest[:19],
            "digest": fill.digest,
            "repository": fill.repository,
            "size": fill.size,
            "received": fill.received_bytes,
            "received_text": human_size(fill.received_bytes),
            "elapsed": elapsed,
            "rate": rate,
            "rate_text": human_size(rate),
            "result": "ok" if error is None else "failed",
            "error": error,
            "origin": fill.origin,
        }
        if error is None and fill.followed and not fill.received_bytes:
            fill_log.info("fill {short} done: downloaded by another worker, verified and published", **fields)
        elif error is None:
            fill_log.info(
                "fill {short} done: {received_text} from {origin} in {elapsed:.1f} s ({rate_text}/s), "
                "verified and published",
                **fields,
            )
        elif fill.stopping:
            fields["result"] = "stopped"
            fill_log.info(
                "fill {short} stopped for shutdown after {received_text}; it resumes at the next start",
                **fields,
            )
        else:
            fill_log.warn(
                "fill {short} failed after {elapsed:.1f} s, {received_text} received "
                "({rate_text}/s): {error}",
                **fields,
            )

    def report_progress(self) -> None:
        """A line for each running Fill (periodic; never raises, so its TimerService keeps going)."""
        try:
            now = self._clock.seconds()
            for fill in list(self._running()):
                if fill.started_at is None or fill.ended:
                    continue
                completed = fill.completed_bytes()
                since, before = self._last.get(fill.digest, (fill.started_at, fill.resumed_bytes))
                rate = (completed - before) / (now - since) if now > since else 0.0
                self._last[fill.digest] = (now, completed)
                left = (fill.size - completed) / rate if rate > 0 else None
                fill_log.info(
                    "fill {short}: {percent:.0f}% ({completed_text} of {size_text}) at {rate_text}/s{eta}",
                    short=fill.digest[:19],
                    digest=fill.digest,
                    completed=completed,
                    completed_text=human_size(completed),
                    size=fill.size,
                    size_text=human_size(fill.size),
                    percent=100.0 * completed / fill.size if fill.size else 100.0,
                    rate=rate,
                    rate_text=human_size(rate),
                    eta="" if left is None else f", about {left:.0f} s left",
                )
        except Exception:
            log.failure("fill progress report failed")

    def service(self, interval: float = FILL_PROGRESS_INTERVAL) -> TimerService:
        timer = TimerService(interval, self.report_progress)
        timer.clock = self._clock
        return timer
