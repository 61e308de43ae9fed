"""twistd glue: command-line options and ``makeService``.

``twistd -n ollama-mirror --config etc/mirror.json`` lands here.  This is the only module that
imports the global reactor, and only inside :func:`makeService`, after twistd installed it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from .config import Config, ConfigError, load_config
from .runner import Reactor

_FLAGS = {
    "host": "server.host",
    "port": "server.port",
    "cache-dir": "cache.directory",
    "upstream-url": "upstream.url",
    "log-level": "logging.level",
}


class Options(usage.Options):
    """Options of ``twistd ollama-mirror``; every setting can also come from JSON or the environment."""

    synopsis = "[--config FILE] [--listen ENDPOINT]... [--set SECTION.KEY=VALUE]..."
    longdesc = (
        "Every setting can also come from the JSON file (--config) or OLLAMA_MIRROR_* variables; "
        "flags win (README: Configuration)."
    )
    optParameters = [
        ["config", "c", None, "JSON configuration file (see etc/mirror.json)."],
        ["host", None, None, "Address to listen on (server.host)."],
        ["port", "p", None, "Port to listen on (server.port)."],
        ["cache-dir", None, None, "Cache directory (cache.directory)."],
        ["upstream-url", None, None, "Upstream registry URL (upstream.url)."],
        ["log-level", None, None, "Log level (logging.level)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[str, str] = {}
        self.listen: list[str] = []
        self.config: Config | None = None
        self.sources: tuple[str | None, dict[str, str]] = (None, {})

    def opt_set(self, assignment: str) -> None:
        """Set any configuration key: --set cache.retention_days=7 (repeatable)."""
        key, sep, value = assignment.partition("=")
        if not sep or "." not in key:
            raise usage.UsageError(f"--set wants SECTION.KEY=VALUE, not {assignment!r}")
        self.overrides[key.strip()] = value

    def opt_version(self) -> NoReturn:
        """Print the version of ollama-mirror (and of the Twisted it runs on), then exit."""
        import twisted

        from . import __version__

        sys.stdout.write(f"ollama-mirror {__version__} (Twisted {twisted.__version__})\n")
        raise SystemExit(0)

    def opt_listen(self, endpoint: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:11434:interface=127.0.0.1 (repeatable)."""
        self.listen.append(endpoint)

    def postOptions(self) -> None:
        self._no_pidfile_in_the_foreground()
        overrides = {_FLAGS[flag]: self[flag] for flag in _FLAGS if self[flag] is not None}
        if self.listen:
            overrides["server.listen"] = ",".join(self.listen)
        overrides.update(self.overrides)
        self.sources = (self["config"], overrides)  # what worker processes load their configuration from
        try:
            self.config = load_config(self["config"], os.environ, overrides)
        except ConfigError as e:
            fail(f"configuration error: {e}")

    def _no_pidfile_in_the_foreground(self) -> None:
        """``twistd -n`` writes ``twistd.pid`` into the working directory by default, where it is of no
        use (the process is in the foreground; systemd tracks it itself) and is left behind: without an
        explicit ``--pidfile``, a foreground daemon writes none.  A daemonized one keeps it."""
        server = getattr(self, "parent", None)
        if server is not None and server.get("nodaemon") and server.get("pidfile") == "twistd.pid":
            server["pidfile"] = ""


def fail(message: str) -> NoReturn:
    """Stop start-up with one line on stderr and exit status 2 (no usage text, no traceback)."""
    sys.stderr.write(f"ollama-mirror: {message}\n")
    raise SystemExit(2)


class _Daemon(MultiService):
    """Under twistd, a failed listen (port taken) ends start-up with one clear line, not a traceback.

    It also brings the daemon's log observer (``logging.*``): twistd uses the application's
    ``ILogObserver`` component instead of building its own, and the application is the parent
    twistd gives this service.
    """

    def __init__(self, log_observer: ILogObserver | None = None, reactor: Reactor = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._log_observer = log_observer
        self._previous_hup: Any = None

    def setServiceParent(self, parent: IServiceCollection) -> None:
        super().setServiceParent(parent)
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)

    def privilegedStartService(self) -> None:
        from .daemon.startup import StartupError

        try:
            super().privilegedStartService()
        except StartupError as e:
            fail(str(e))

    def startService(self) -> None:
        """SIGHUP reloads the TLS certificate (the daemon's own; embedders keep their handlers)."""
        super().startService()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: Any) -> None:
        if self._reactor is not None:
            self._reactor.callFromThread(self.reload_certificates)

    def reload_certificates(self) -> None:
        """What SIGHUP does: every child that serves a certificate reads it again."""
        for child in self:
            reload = getattr(child, "reload_certificates", None)
            if reload is not None:
                reload()

    def stopService(self) -> Any:
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        return super().stopService()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # twistd has installed the chosen reactor by now

    from .security.connections import raise_descriptor_limit

    assert options.config is not None
    raise_descriptor_limit()  # (before the workers start: they inherit it)
    try:
        if options.config.cluster.storage_url:  # a bad endpoint, bucket or key: say so now, exit 2
            _check_storage(options.config)
        if options.config.server.workers > 1:
            from .daemon.workers import build_supervisor

            mirror: IService = build_supervisor(options.config, reactor, *options.sources)
        else:
            from .daemon.service import build_service

            mirror = build_service(options.config, reactor)
    except ConfigError as e:
        fail(f"configuration error: {e}")
    daemon = _Daemon(_log_observer(options), reactor)
    mirror.setServiceParent(daemon)
    return daemon


def _check_storage(config: Config) -> None:
    from .cluster import missing_extra

    try:
        from .cluster.redis import check_redis
        from .cluster.s3 import check_storage
    except ImportError as e:
        raise missing_extra(e) from None
    check_storage(config.cluster)
    if config.cluster.redis_url:
        check_redis(config.cluster.redis_url)


def _log_observer(options: Options) -> ILogObserver | None:
    """The observer for ``logging.*``, writing where twistd would have (``logfiles.twistd_destination``)."""
    from .ops.logoutput import log_observer, twistd_destination

    assert options.config is not None
    twistd_options = getattr(options, "parent", None)  # twistd's own options (--logfile, -n, --syslog)
    try:
        destination = twistd_destination(options.config.logging, twistd_options)
    except OSError as e:
        fail(f"configuration error: logging.file: cannot open {options.config.logging.file}: {e.strerror}")
    return None if destination is None else log_observer(options.config.logging, destination)
