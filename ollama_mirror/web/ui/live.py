"""The live downloads for the web page, pushed as Server-Sent Events; and the last errors.

:class:`FillFeed` listens to the mirror's events: it keeps the last errors and tells its subscribers when
something changed (a download started or ended, a tag was published, models were evicted).  Each open
page holds one :class:`EventStream`: a ``text/event-stream`` response left open (``NOT_DONE_YET``) that
sends a ``fills`` event at once, then whenever a download starts or ends, and every second while
downloads run (only when it differs from the last one sent); a ``changed`` event when the cache's contents
changed (the page then reloads its tables); and a comment line as a heartbeat when nothing else was
sent for a while, so that proxies and the daemon's idle timeout keep the connection.  It stops when the
client goes (``notifyFinish``).  Writes are small and rare, so the socket's backpressure is not needed.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ...events import Events, FillView
from ...names import ModelName
from ...ops.stats import fill_progress, iso_time

log = Logger(namespace="ollama_mirror.web.ui")

UPDATE_INTERVAL = 1.0  # while downloads run, the page's progress bars move this often
HEARTBEAT_INTERVAL = 15.0
ERRORS_KEPT = 20

Listener = Callable[[str], None]  # called with "fills" or "changed"


class FillFeed(Events):
    """What the page's streams send (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        fills: Callable[[], Iterable[FillView]],
        readers: Callable[[str], int],
    ) -> None:
        """*fills*: the downloads of this process; *readers*: how many client responses read a blob
        (by hex digest) right now."""
        self._clock = clock
        self._fills = fills
        self._readers = readers
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self._listeners: list[Listener] = []

    # --- what the page shows -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self._clock.seconds()
        fills = []
        for fill in self._fills():
            if fill.ended:
                continue
            entry = fill_progress(fill, now)
            entry["clients"] = self._readers(fill.hexdigest)
            entry["origin"] = fill.origin
            fills.append(entry)
        fills.sort(key=lambda entry: (entry["repository"], entry["digest"]))
        return {"fills": fills, "errors": list(reversed(self.errors))}

    def running(self) -> bool:
        return any(not fill.ended for fill in self._fills())

    # --- subscribers ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self, what: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(what)
            except Exception:  # one broken stream must not stop the others, nor the download
                log.failure("a live page stream failed")

    def _error(self, kind: str, message: str, subject: str = "") -> None:
        self.errors.append(
            {"at": iso_time(self._clock.seconds()), "kind": kind, "subject": subject, "message": message}
        )

    # --- events --------------------------------------------------------------------------------

    def fill_started(self, fill: FillView) -> None:
        self._tell("fills")

    def fill_ended(self, fill: FillView, error: str | None) -> None:
        if error is not None:
            self._error("download", error, f"{fill.repository} {fill.digest}")
        self._tell("fills")
        self._tell("changed")

    def digest_mismatch(self, fill: FillView) -> None:
        self._error(
            "digest", "the bytes did not hash to the digest (discarded)", f"{fill.repository} {fill.digest}"
        )

    def disk_full(self, message: str, path: str, free: int | None) -> None:
        self._error("disk", message, path)
        self._tell("fills")

    def upstream_error(self, kind: str) -> None:
        self._error("upstream", f"an upstream request failed ({kind}); retried as configured")

    def manifest_published(self, name: ModelName) -> None:
        self._tell("changed")

    def evicted(self, models: int, blobs: int, size: int, reason: str) -> None:
        if models or blobs:
            self._tell("changed")

    def error(self, kind: str, message: str, subject: str = "") -> None:
        """An error the page's own actions met (a pull it started failed)."""
        self._error(kind, message, subject)
        self._tell("fills")


class EventStream(Resource):
    """One page's stream (see the module docstring); a fresh one per request."""

    isLeaf = True

    def __init__(
        self,
        feed: FillFeed,
        clock: IReactorTime,
        update: float = UPDATE_INTERVAL,
        heartbeat: float = HEARTBEAT_INTERVAL,
    ) -> None:
        super().__init__()
        self._feed = feed
        self._clock = clock
        self._update = update
        self._heartbeat = heartbeat

    def render_GET(self, request: Request) -> object:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")  # (nginx in front: do not hold the events back)
        _Subscriber(request, self._feed, self._clock, self._update, self._heartbeat).start()
        return NOT_DONE_YET


class _Subscriber:
    def __init__(
        self, request: Request, feed: FillFeed, clock: IReactorTime, update: float, heartbeat: float
    ) -> None:
        self._request = request
        self._feed = feed
        self._clock = clock
        self._heartbeat = heartbeat
        self._last_sent = ""
        self._last_write = clock.seconds()
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self._interval = update
        self._done = False

    def start(self) -> None:
        self._write(b"retry: 3000\n\n")  # (how soon a browser reconnects after a restart)
        self._send_fills()
        self._feed.subscribe(self._heard)
        self._request.notifyFinish().addBoth(self._finished)
        self._ticker.start(self._interval, now=False)

    def _heard(self, what: str) -> None:
        if what == "changed":
            self._event("changed", "{}")
        else:
            self._send_fills()

    def _tick(self) -> None:
        if self._feed.running():
            self._send_fills()
        if self._clock.seconds() - self._last_write >= self._heartbeat:
            self._write(b": keep-alive\n\n")

    def _send_fills(self) -> None:
        data = json.dumps(self._feed.snapshot(), separators=(",", ":"))
        if data != self._last_sent:
            self._last_sent = data
            self._event("fills", data)

    def _event(self, name: str, data: str) -> None:
        self._write(f"event: {name}\ndata: {data}\n\n".encode())

    def _write(self, data: bytes) -> None:
        if self._done:
            return
        self._last_write = self._clock.seconds()
        self._request.write(data)

    def _finished(self, result: Failure | None) -> None:
        """The client went (or the daemon is stopping): stop sending."""
        self._done = True
        self._feed.unsubscribe(self._heard)
        if self._ticker.running:
            self._ticker.stop()
