"""Logs: one line per request (also for requests that never finish), fill lines, level, format, rotation."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import Application
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ollama_mirror.config import LoggingConfig, load_config
from ollama_mirror.ops.accesslog import AccessLog, FillLog, RequestObserver, RequestRecord
from ollama_mirror.ops.logoutput import json_line, log_observer, twistd_destination
from ollama_mirror.ops.metrics import MirrorMetrics
from ollama_mirror.tap import _Daemon
from ollama_mirror.web.routes import ROUTES, route_of

from .fakeregistry import FakeRegistry
from .harness import Harness


def lines_of(events: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("log_namespace") == namespace]


def logging_config(**values: str) -> LoggingConfig:
    return load_config(None, {}, {f"logging.{k}": v for k, v in values.items()}).logging


# --- request lines -------------------------------------------------------------------------------------------


def test_one_line_per_request_with_cache_outcome(tmp_path: Path, events: list[dict[str, Any]]) -> None:
    registry = FakeRegistry()
    registry.add_model("library/tiny", "latest", [os.urandom(100_000)])
    manifest = json.loads(registry.manifests[("library/tiny", "latest")])
    digest = manifest["layers"][0]["digest"]
    h = Harness(tmp_path, registry)
    h.request("GET", "/v2/library/tiny/manifests/latest")
    h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers={"range": ["bytes=0-99"]})
    h.request("GET", "/nowhere\x01?q=1")
    access = lines_of(events, "ollama_mirror.access")
    assert [e["cache"] for e in access] == ["upstream", "fill", "hit", "-"]
    cold, warm, ranged_status = access[1], access[2], access[2]["status"]
    assert (cold["method"], cold["status"], cold["sent"]) == ("GET", 200, 100_000)
    assert cold["uri"] == f"/v2/library/tiny/blobs/{digest}" and cold["client"] == "127.0.0.1"
    assert ranged_status == 206 and warm["sent"] == 100
    assert all(e["duration"] >= 0 and e["complete"] for e in access)
    text = formatEvent(warm)
    assert text.startswith("127.0.0.1 GET /v2/library/tiny/blobs/sha256:") and "206 100 B" in text
    assert text.endswith("cache=hit")
    assert access[3]["uri"] == "/nowhere%01?q=1" and access[3]["route"] == "other"


class _Stalls(Resource):
    """Sends the headers and a few bytes, then nothing: the client gives up."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        request.setHeader(b"x-mirror-cache", b"fill")
        request.setHeader(b"content-length", b"1000")
        request.write(b"x" * 10)
        return NOT_DONE_YET  # type: ignore[no-any-return]


def test_a_request_that_never_finishes_still_gets_its_line_and_counts(events: list[dict[str, Any]]) -> None:
    clock = Clock()
    records: list[RequestRecord] = []
    metrics = MirrorMetrics(CollectorRegistry(), clock, ROUTES)
    observer = RequestObserver(clock, route_of, [records.append, metrics.request_finished])
    observer.listen(AccessLog())
    site = Site(observer.wrap(_Stalls()), reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /v2/library/tiny/blobs/sha256:abc HTTP/1.1\r\nHost: mirror\r\n\r\n")
    clock.advance(3)
    assert observer.in_flight == 1
    channel.connectionLost(Failure(ConnectionDone()))
    [record] = records
    assert record.complete is False and record.status == 200 and record.sent == 10
    assert record.duration == 3 and record.route == "registry_blob" and record.source == "fill"
    assert observer.in_flight == 0
    assert (
        metrics.registry.get_sample_value(
            "ollama_mirror_http_requests_interrupted_total", {"route": "registry_blob"}
        )
        == 1
    )
    [line] = lines_of(events, "ollama_mirror.access")
    assert formatEvent(line) == (
        "192.168.1.1 GET /v2/library/tiny/blobs/sha256:abc 200 10 B 3.000 s cache=fill (not completed)"
    )


# --- fill lines ----------------------------------------------------------------------------------------------


class _FakeFill:
    def __init__(self, clock: Clock) -> None:
        self.digest = "sha256:" + "c" * 64
        self.repository = "library/big"
        self.size = 100_000_000
        self.resumed_bytes = 0
        self.received_bytes = 0
        self.started_at: float | None = clock.seconds()
        self.clock = clock
        self.ended = False
        self.stopping = False
        self.following = False  # (another worker downloads it)
        self.followed = False
        self.origin = "upstream"

    def completed_bytes(self) -> int:
        return self.resumed_bytes + self.received_bytes


def test_fill_start_progress_and_end_with_rate(events: list[dict[str, Any]]) -> None:
    clock = Clock()
    clock.advance(100)
    fill = _FakeFill(clock)
    reporter = FillLog(clock, lambda: [fill])  # type: ignore[list-item, return-value]
    timer = reporter.service(interval=10)
    reporter.fill_started(fill)  # type: ignore[arg-type]
    timer.startService()
    fill.received_bytes = 25_000_000
    clock.advance(10)
    fill.received_bytes = 50_000_000
    clock.advance(10)
    fill.received_bytes = fill.size
    fill.ended = True
    reporter.fill_ended(fill, None)  # type: ignore[arg-type]
    timer.stopService()
    texts = [formatEvent(e) for e in lines_of(events, "ollama_mirror.fill")]
    assert texts[0] == f"fill {fill.digest[:19]} started: 100.0 MB for library/big, 0 B already on disk"
    progress = [t for t in texts if "%" in t]
    assert progress[-2:] == [
        f"fill {fill.digest[:19]}: 25% (25.0 MB of 100.0 MB) at 2.5 MB/s, about 30 s left",
        f"fill {fill.digest[:19]}: 50% (50.0 MB of 100.0 MB) at 2.5 MB/s, about 20 s left",
    ]
    assert texts[-1].startswith(f"fill {fill.digest[:19]} done: 100.0 MB from upstream in 20.0 s (5.0 MB/s)")
    end = lines_of(events, "ollama_mirror.fill")[-1]
    assert end["result"] == "ok" and end["rate"] == 5_000_000


def test_a_failed_fill_is_a_warning_with_its_reason(events: list[dict[str, Any]]) -> None:
    clock = Clock()
    fill = _FakeFill(clock)
    reporter = FillLog(clock, lambda: [])
    clock.advance(4)
    fill.received_bytes = 1000
    reporter.fill_ended(fill, "upstream answered 503")  # type: ignore[arg-type]
    [end] = lines_of(events, "ollama_mirror.fill")
    assert end["log_level"].name == "warn" and end["result"] == "failed"
    assert end["error"] == "upstream answered 503"


def test_a_fill_stopped_for_shutdown_is_not_reported_as_a_failure(events: list[dict[str, Any]]) -> None:
    clock = Clock()
    fill = _FakeFill(clock)
    fill.stopping = True
    FillLog(clock, lambda: []).fill_ended(fill, "download stopped (shutting down)")  # type: ignore[arg-type]
    [end] = lines_of(events, "ollama_mirror.fill")
    assert end["log_level"].name == "info" and end["result"] == "stopped"


def test_progress_reports_never_raise() -> None:
    def broken() -> list[Any]:
        raise RuntimeError("boom")

    FillLog(Clock(), broken).report_progress()  # logged, not raised: the TimerService keeps going


# --- where lines go: level, format, rotation -----------------------------------------------------------------


def test_the_log_file_rotates_at_the_configured_size_keeping_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "mirror.log"
    path.parent.mkdir()
    config = logging_config(file=str(path), max_file_size="1024", backup_count="2")
    destination = twistd_destination(config, None)
    assert isinstance(destination, LogFile)
    log = Logger(namespace="test", observer=log_observer(config, destination))
    for n in range(200):
        log.info("line {n} of some length to fill the file quickly: {padding}", n=n, padding="x" * 40)
    destination.close()
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["mirror.log", "mirror.log.1", "mirror.log.2"]
    for rotated in ("mirror.log.1", "mirror.log.2"):
        size = (path.parent / rotated).stat().st_size
        assert 1024 <= size < 1024 + 200  # rotated once it reached the size, before the next line
    assert "line 199" in path.read_text()
    assert "line 0 " not in "".join(p.read_text() for p in path.parent.iterdir())  # the oldest are gone


def test_level_filters_what_is_written() -> None:
    out = io.StringIO()
    log = Logger(namespace="test", observer=log_observer(logging_config(level="WARNING"), out))
    log.debug("debug line")
    log.info("info line")
    log.warn("warn line")
    log.error("error line")
    text = out.getvalue()
    assert "warn line" in text and "error line" in text
    assert "info line" not in text and "debug line" not in text


def test_json_lines_carry_the_fields() -> None:
    out = io.StringIO()
    log = Logger(namespace="ollama_mirror.access", observer=log_observer(logging_config(format="json"), out))
    log.info("{method} {uri} {status}", method="GET", uri="/v2/", status=200, weird=object())
    try:
        raise ValueError("bad")
    except ValueError:
        log.failure("it broke")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "GET /v2/ 200" and first["level"] == "info"
    assert first["logger"] == "ollama_mirror.access" and first["status"] == 200 and first["uri"] == "/v2/"
    assert "weird" not in first and first["time"].endswith("+00:00")
    assert second["level"] == "critical" and "ValueError: bad" in second["traceback"]


def test_json_line_is_one_line() -> None:
    line = json_line({"log_format": "a\nb {x}", "x": "c\nd", "log_time": 0.0, "log_namespace": "n"})
    assert line.count("\n") == 1 and json.loads(line)["message"] == "a\nb c\nd"


def test_where_the_daemon_logs(tmp_path: Path) -> None:
    config = logging_config()
    assert twistd_destination(config, {"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_destination(config, {"nodaemon": True, "logfile": "-"}) is sys.stdout
    assert twistd_destination(config, {"nodaemon": False, "logfile": "-"}) is None  # twistd refuses this
    assert twistd_destination(config, {"syslog": True}) is None  # left to twistd
    given = twistd_destination(config, {"nodaemon": True, "logfile": str(tmp_path / "t.log")})
    assert isinstance(given, LogFile) and given.path == str(tmp_path / "t.log")
    assert given.rotateLength == 10_000_000 and given.maxRotatedFiles == 5
    own = twistd_destination(
        logging_config(file=str(tmp_path / "own.log")), {"logfile": str(tmp_path / "t.log")}
    )
    assert isinstance(own, LogFile) and own.path == str(tmp_path / "own.log")  # logging.file wins
    for opened in (given, own):
        opened.close()


def test_the_daemon_gives_twistd_its_log_observer() -> None:
    observer = log_observer(logging_config(), io.StringIO())
    application = Application("ollama-mirror")
    _Daemon(observer).setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer


def test_pooled_connection_chatter_is_filtered_but_warnings_are_not() -> None:
    from ollama_mirror.config import load_config
    from ollama_mirror.ops.logoutput import log_observer

    out = io.StringIO()
    observer = log_observer(load_config().logging, out)
    namespace = "twisted.web.client._HTTP11ClientFactory"
    observer(
        {
            "log_namespace": namespace,
            "log_level": LogLevel.info,
            "log_format": "Starting factory",
            "log_time": 0.0,
        }
    )
    observer(
        {
            "log_namespace": namespace,
            "log_level": LogLevel.warn,
            "log_format": "something wrong",
            "log_time": 0.0,
        }
    )
    assert "Starting factory" not in out.getvalue() and "something wrong" in out.getvalue()


def test_the_cheap_text_line_is_twisteds_classic_line() -> None:
    """logfiles.ClassicText (the daemon's text log) writes exactly what Twisted's classic formatter
    writes, for a message given as a format, as a ready line (the access log), with a system, a
    multi-line message and a failure, across seconds."""
    from twisted.logger import formatEventAsClassicLogText

    from ollama_mirror.ops.logoutput import ClassicText

    failure = Failure(ZeroDivisionError("boom"))
    base = {"log_namespace": "ollama_mirror.access", "log_level": LogLevel.info}
    events: list[dict[str, Any]] = [
        {**base, "log_time": 1_800_000_000.25, "log_format": "{a} and {b:.3f}", "a": "x", "b": 1.5},
        {**base, "log_time": 1_800_000_000.75, "log_format": "{a} {b}", "a": 1, "b": "-", "log_text": "1 -"},
        {**base, "log_time": 1_800_000_001.0, "log_format": "two\nlines", "log_text": "two\nlines"},
        {"log_time": 1_800_000_002.5, "log_system": "worker 1", "log_format": "hi", "log_text": "hi"},
        {"log_format": "no time", "log_text": "no time"},
        {
            **base,
            "log_time": 1_800_000_003.0,
            "log_format": "boom",
            "log_text": "boom",
            "log_failure": failure,
        },
        {**base, "log_time": 1_800_000_003.0, "log_format": "", "log_text": ""},
    ]
    text = ClassicText()
    for event in events:
        assert text(event) == formatEventAsClassicLogText(event), event
