"""Where the daemon's log lines go: ``logging.*`` made into a twistd log observer (level, file with
size rotation, text or JSON lines).

Kept apart from :mod:`ollama_mirror.ops.accesslog` (the request and fill lines) so that the ``server.workers``
supervisor, which only relays its workers' lines, does not import the web stack to set up its log.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

from ..config import LoggingConfig

LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARNING": LogLevel.warn,
    "ERROR": LogLevel.error,
    "CRITICAL": LogLevel.critical,
}


def json_line(event: dict[str, Any]) -> str:
    """One event as one JSON object on one line: time, level, logger, message, then its fields.

    Twisted's own ``eventAsJSON`` serialises its internals (``log_level`` as a class reference,
    the format string, the logger object); log shippers want the plain fields.
    """
    document: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), tz=UTC).isoformat(timespec="milliseconds"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "logger": event.get("log_namespace", ""),
        "message": event[TEXT_KEY] if isinstance(event.get(TEXT_KEY), str) else formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in document or key in ("format", "message", "isError"):
            continue
        if value is None or isinstance(value, str | int | float | bool):
            document[key] = value
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        document["traceback"] = failure.getTraceback()
    return json.dumps(document, default=str) + "\n"


TEXT_KEY = "log_text"  # an event's message, already made by its emitter (the access log, per request)


class ClassicText:
    """Twisted's classic text line (``formatEventAsClassicLogText``: ``time [namespace#level] message``),
    made cheaply: the time is formatted once per second, and a message its emitter already made
    (``log_text``) is used as it is instead of being formatted again from ``log_format``."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            self._stamp = formatTime(second, timeFormatRFC3339)
            self._second = second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        text = event.get(TEXT_KEY)
        if not isinstance(text, str) or "log_failure" in event:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._time(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def open_log_file(path: str, config: LoggingConfig) -> LogFile:
    """The log file, rotated when it reaches ``max_file_size``, keeping ``backup_count`` old ones."""
    path = os.path.abspath(path)
    return LogFile(
        os.path.basename(path),
        os.path.dirname(path),
        rotateLength=config.max_file_size,
        maxRotatedFiles=config.backup_count,
    )


def log_observer(
    config: LoggingConfig,
    destination: IO[Any],
    format_event: Callable[[dict[str, Any]], str | None] | None = None,
) -> ILogObserver:
    """An observer writing events at ``logging.level`` and above to *destination* as text or JSON lines
    (or as *format_event* makes them)."""
    if format_event is not None:
        observer: ILogObserver = FileLogObserver(destination, format_event)
    elif config.format == "json":
        observer = FileLogObserver(destination, json_line)
    else:
        observer = FileLogObserver(destination, ClassicText())
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[config.level])
    return FilteringLogObserver(observer, [predicate, _QuietConnectionFactories()])


@implementer(ILogFilterPredicate)
class _QuietConnectionFactories:
    """Pooled HTTP client connections come and go all day; their "Starting/Stopping factory" lines
    say nothing an operator needs (upstream failures are logged where they matter)."""

    def __call__(self, event: dict[str, Any]) -> Any:
        namespace = str(event.get("log_namespace", ""))
        if "HTTP11ClientFactory" in namespace and event.get("log_level") == LogLevel.info:
            return PredicateResult.no
        return PredicateResult.maybe


def twistd_destination(config: LoggingConfig, twistd_options: Any) -> IO[Any] | None:
    """Where the daemon logs: ``logging.file`` if set; else where twistd itself would (standard
    output with ``-n``, its ``--logfile``, or ``twistd.log``), with our rotation.  ``None`` means
    leave logging to twistd (``--syslog``, or ``--logger``, which twistd puts first anyway)."""
    if config.file:
        return cast(IO[Any], open_log_file(config.file, config))  # file-like, as twistd uses it
    options = twistd_options if twistd_options is not None else {}
    if options.get("syslog") or options.get("logger"):
        return None
    logfile = options.get("logfile") or ""
    foreground = bool(options.get("nodaemon")) or twistd_options is None
    if logfile == "-" and not foreground:
        return None  # twistd refuses this itself, with its own message
    if logfile == "-" or (not logfile and foreground):
        return sys.stdout
    return cast(IO[Any], open_log_file(logfile or "twistd.log", config))
