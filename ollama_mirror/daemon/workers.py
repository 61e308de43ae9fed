"""``server.workers``: several processes serving one set of listening sockets.

One reactor thread moves bytes on one core.  With ``server.workers`` above 1, the process twistd
runs becomes a supervisor: it binds every listening endpoint itself (so that a taken port still
stops start-up, and a worker that restarts never loses the port), then starts that many worker
processes (``python -m ollama_mirror.workers``) that adopt the listening sockets
(``reactor.adoptStreamPort``) and each run the whole mirror on the shared cache; the kernel hands
each new connection to one of them.  A worker loads its configuration as the supervisor did (the
same file, environment and command-line overrides, which reach it through its standard input); its
standard input then stays open: its end tells the worker that the supervisor is gone.  Worker log lines go
to the supervisor, which logs them with the worker's number.  A worker that dies is started again;
SIGTERM to the supervisor stops every worker, then the supervisor.

One download per blob across the workers comes from the Fill itself (an ``flock`` on the partial
file, see :mod:`ollama_mirror.fill.coordinator`).  Each worker keeps its own counters (``/mirror/stats``,
``/metrics``); only worker 0 runs the eviction sweep and the prefetch list.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel, eventAsText
from twisted.python.failure import Failure

from ..config import Config, ConfigError
from ..runner import Reactor
from ..security.connections import with_backlog
from .startup import StartupError, log_start

log = Logger(namespace="ollama_mirror.workers")  # pinned: log names are public

SHAREABLE = ("tcp", "unix")  # endpoint kinds whose listening socket a worker can adopt
STOP_TIMEOUT = 15.0  # seconds a worker gets to stop after SIGTERM before it is killed
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
QUICK_DEATH = 10.0  # a worker that dies sooner than this after its start is restarted more slowly
_LEVEL = re.compile(r"^\[[^\]#]*#(\w+)\] ")


def check_shareable(config: Config) -> None:
    """Workers can share plain sockets only: refuse other endpoints at start-up, naming them."""
    for description in [*config.listen_endpoints(), *config.server.metrics_listen]:
        kind = description.split(":", 1)[0].lower()
        if kind not in SHAREABLE:
            raise ConfigError(
                f"server.workers = {config.server.workers}: workers share tcp: and unix: endpoints only, "
                f"not {description!r} (run one worker, or put the TLS terminator in front)"
            )


class _NoConnections(Factory):
    """The supervisor's own factory: it never accepts (its ports stop reading at once)."""

    protocol = Protocol


@dataclasses.dataclass
class _Listener:
    role: str  # "main" or "metrics"
    description: str
    port: Any  # the IListeningPort bound by the supervisor
    family: int


class WorkerPool(Service):
    """The supervisor: binds the endpoints, runs ``count`` workers, restarts them, stops them."""

    def __init__(
        self, config: Config, reactor: Reactor, config_file: str | None, overrides: dict[str, str]
    ) -> None:
        check_shareable(config)
        self.config = config
        self.sources = {
            "config_file": os.path.abspath(config_file) if config_file else None,
            "overrides": dict(overrides),
        }
        self.reactor = reactor
        self.count = config.server.workers
        self.listeners: list[_Listener] = []
        self.workers: dict[int, _Worker] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False

    # --- listening -----------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every endpoint now (before twistd drops privileges); a taken port stops start-up."""

        super().privilegedStartService()
        roles = [("main", d) for d in self.config.listen_endpoints()]
        roles += [("metrics", d) for d in self.config.server.metrics_listen]
        for role, description in roles:
            results: list[Any] = []
            endpoint = serverFromString(self.reactor, with_backlog(description))
            endpoint.listen(_NoConnections()).addBoth(results.append)
            result = results[0] if results else None
            if isinstance(result, Failure):
                e = result.value
                if isinstance(e, error.CannotListenError):
                    raise StartupError(f"cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}")
                raise StartupError(f"cannot listen on {description!r}: {e}")
            assert IListeningPort.providedBy(result)
            port: Any = result
            port.stopReading()  # the workers accept; the supervisor only holds the socket
            family = getattr(port, "addressFamily", socket.AF_UNIX)
            self.listeners.append(_Listener(role, description, port, int(family)))

    # --- workers -------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        log.info(
            "starting {count} workers on {endpoints}",
            count=self.count,
            endpoints=", ".join(listener.description for listener in self.listeners),
        )
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        specs = []
        for n, listener in enumerate(self.listeners):
            child_fds[3 + n] = listener.port.fileno()
            specs.append(f"{listener.role}:{3 + n}:{listener.family}")
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        args = [sys.executable, "-m", "ollama_mirror.workers", "--index", str(index), *specs]
        worker = _Worker(self, index, self.reactor.seconds())
        self.workers[index] = worker
        self.reactor.spawnProcess(worker, sys.executable, args, env=env, childFDs=child_fds)
        document = json.dumps(self.sources).encode() + b"\n"
        assert worker.transport is not None
        worker.transport.write(document)  # stdin stays open: its end tells the worker we are gone

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        worker.ended.callback(None)
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started
        delay = self._delays.get(worker.index, RESTART_DELAY)
        delay = min(MAX_RESTART_DELAY, delay * 2) if lived < QUICK_DEATH else RESTART_DELAY
        self._delays[worker.index] = delay
        log.warn(
            "worker {index} (pid {pid}) ended: {why}; starting it again in {delay:g} s",
            index=worker.index,
            pid=worker.pid,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self) -> Deferred[Any]:
        """SIGTERM every worker, SIGKILL those still there after a while, then close the sockets."""
        super().stopService()
        self._stopping = True
        waits = []
        for worker in list(self.workers.values()):
            waits.append(worker.ended)
            worker.signal("TERM")
            killer = self.reactor.callLater(STOP_TIMEOUT, worker.signal, "KILL")
            worker.ended.addBoth(_cancel_timer, killer)
        d: Deferred[Any] = DeferredList(waits) if waits else succeed(None)

        def close(result: object) -> object:
            for listener in self.listeners:
                listener.port.stopListening()
            return result

        return d.addBoth(close)


def _cancel_timer(result: object, timer: Any) -> object:
    if timer.active():
        timer.cancel()
    return result


class _Worker(ProcessProtocol):
    """One worker process: relays its log lines and tells the pool when it ends."""

    def __init__(self, pool: WorkerPool, index: int, started: float) -> None:
        self.pool = pool
        self.index = index
        self.started = started
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None
        self._buffers = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)
        log.info("worker {index} started (pid {pid})", index=self.index, pid=self.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._buffers.get(childFD, b"") + data).split(b"\n")
        self._buffers[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            return
        match = _LEVEL.match(line)
        level = LogLevel.warn if fd == 2 else LogLevel.info
        if match is not None:
            with contextlib.suppress(Exception):  # an unknown level name: keep the default
                level = LogLevel.levelWithName(match.group(1))
        log.emit(level, "worker {index}: {line}", index=self.index, line=line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._buffers.items():
            if rest:
                self._relay(fd, rest)
        self.pool._ended(self, reason)

    def signal(self, name: str) -> None:
        try:
            if self.transport is not None:
                self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


# --- the worker process --------------------------------------------------------------------------


class _SupervisorWatch(Protocol):
    """Standard input of a worker: when it ends, the supervisor is gone, and so goes the worker."""

    def __init__(self, reactor: Reactor) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        if self._reactor.running:
            self._reactor.stop()


def _line_for_supervisor(event: dict[str, Any]) -> str:
    """``[namespace#level] text``: the supervisor adds the time and the worker's number."""
    level = event.get("log_level")
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return f"[{event.get('log_namespace', '-')}#{level.name if level else 'info'}] {text}\n"


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m ollama_mirror.workers --index N ROLE:FD:FAMILY...`` (started by :class:`WorkerPool`)."""
    parser = argparse.ArgumentParser(prog="python -m ollama_mirror.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("listeners", nargs="*", help="ROLE:FD:FAMILY of each adopted listening socket")
    args = parser.parse_args(argv)
    from ..config import load_config

    sources = json.loads(sys.stdin.buffer.readline())
    config = load_config(sources["config_file"], os.environ, sources["overrides"])
    listeners = []
    for spec in args.listeners:
        role, fd, family = spec.split(":")
        listeners.append((role, int(fd), int(family)))

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from ..ops.logoutput import log_observer
    from .service import build_service

    observer = log_observer(config.logging, sys.stdout, _line_for_supervisor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    top = build_service(config, reactor, inherited=listeners, maintenance=args.index == 0)
    top.privilegedStartService()
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)  # type: ignore[attr-defined]
    standard_io: Any = stdio.StandardIO  # (fd 1 stays ours: log lines; the watch writes nowhere)
    standard_io(_SupervisorWatch(reactor), stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor)
    # Once the reactor has installed its handlers: Ctrl-C reaches the supervisor, which stops the
    # workers itself, and a reload (SIGHUP) is the supervisor's business.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)  # type: ignore[attr-defined]
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, signal.SIG_IGN)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


def build_supervisor(
    config: Config, reactor: Reactor, config_file: str | None = None, overrides: dict[str, str] | None = None
) -> MultiService:
    """With ``server.workers`` above 1: the supervisor, which binds the endpoints and runs the workers.

    The workers load their configuration as *config* was loaded: from *config_file*, the
    environment (theirs is the supervisor's) and the command line's *overrides*.  It imports no
    web stack (each process's memory counts: see README, Performance).
    """
    top = MultiService()
    WorkerPool(config, reactor, config_file, overrides or {}).setServiceParent(top)
    log_start(config)
    return top
