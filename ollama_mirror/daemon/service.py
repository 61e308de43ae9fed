"""The service tree: everything the daemon runs, built from a :class:`Config` and a reactor.

``build_service(config, reactor)`` is the one entry point for twistd, ``python -m
ollama_mirror`` and applications that embed the mirror; tests pass a fake reactor.  With
``server.workers`` above 1 the daemon's own process is :func:`ollama_mirror.daemon.workers.build_supervisor`
instead, which imports none of this.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.server import Site

from ..cache.lock import CacheBusy, CacheLock
from ..config import Config, ConfigError
from ..ops.accesslog import MirrorSite
from ..runner import Reactor, Runner
from ..security.hardening import harden
from ..security.tls import ServerTLS, is_managed_tls, listener
from .mirror import Mirror
from .startup import StartupError, log_start

log = Logger(namespace="ollama_mirror.service")  # pinned: log names are public


class ListeningService(MultiService):
    """The endpoints the site listens on; a taken port stops start-up with a readable message."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise StartupError(f"cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}") from None


class MirrorService(MultiService):
    """The top of the tree; holds the :class:`Mirror` so embedders can reach its parts."""

    def __init__(self, mirror: Mirror, tls: ServerTLS | None = None) -> None:
        super().__init__()
        self.mirror = mirror
        self.tls = tls  # the certificate of the `ssl:` listeners, if any
        self._lock = CacheLock(mirror.store.work_dir)

    def reload_certificates(self) -> bool:
        """Read ``server.tls_*`` again (the daemon does it on SIGHUP); False if it could not be."""
        if self.tls is None:
            log.info("reload asked, but no TLS certificate is configured")
            return False
        return self.tls.reload()

    def privilegedStartService(self) -> None:
        """Share the cache with other daemons and imports, never with a maintenance command."""
        try:
            self._lock.acquire(exclusive=False)
        except CacheBusy as e:
            raise StartupError(f"cannot use cache {self.mirror.store.root}: {e}") from None
        super().privilegedStartService()

    def startService(self) -> None:
        self.mirror.start()  # worker threads first: services use them as they start
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """Stop every service (they stop together), then the worker threads they relied on."""
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addBoth(lambda result: self.mirror.close().addCallback(lambda _: result))
        d.addBoth(self._unlock)
        return d

    def _unlock(self, result: object) -> object:
        self._lock.release()
        return result


class AdoptedUnixPort(unix.Port):
    """A listening Unix socket a worker inherited: the supervisor made its file and owns it.

    Twisted's Port would chmod the file when it starts (to its own default 0666, over the endpoint's
    ``mode=``; and a worker that twistd has moved to another ``--uid`` may not chmod a file the
    supervisor made as root at all) and unlink it when it stops, so one worker stopping would take the
    socket away from every other.  This one starts listening on the inherited socket as it is and
    leaves the file alone.
    """

    def startListening(self) -> None:
        skt = self._preexistingSocket
        if skt is None:
            raise CannotListenError(None, self._bindPath, "no inherited socket to listen on")
        self._preexistingSocket = None
        tcp._reservedFD.reserve()  # as Port.startListening: the spare descriptor for EMFILE
        assert self.factory is not None
        self.factory.doStart()
        skt.listen(self.backlog)
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]  # as Port.startListening does
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        tcp.Port.connectionLost(self, reason)  # (unix.Port's would unlink the supervisor's socket file)


class AdoptedPortService(Service):
    """Serve *site* on a listening socket inherited from the supervisor (``server.workers``)."""

    def __init__(self, reactor: Reactor, fd: int, family: int, site: Site) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._site = site
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        if self._family == socket.AF_UNIX:
            self._port = AdoptedUnixPort._fromListeningDescriptor(self._reactor, self._fd, self._site)
            self._port.startListening()
        else:
            self._port = self._reactor.adoptStreamPort(
                self._fd, socket.AddressFamily(self._family), self._site
            )
        os.close(self._fd)  # the port has its own copy

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        port, self._port = self._port, None
        return maybeDeferred(port.stopListening) if port is not None else None


def build_service(
    config: Config,
    reactor: Reactor,
    *,
    agent: IAgent | None = None,
    runner: Runner | None = None,
    inherited: Sequence[tuple[str, int, int]] | None = None,
    maintenance: bool = True,
) -> MirrorService:
    """Build the daemon's service tree on *reactor* without starting anything.

    *agent* (an ``IAgent``) and *runner* replace the upstream HTTP client and the thread pool,
    for tests and for applications that bring their own.  A worker process (``server.workers``)
    passes the listening sockets it *inherited* (``(role, fd, family)``, role ``main`` or
    ``metrics``) instead of binding the endpoints, and ``maintenance=False`` unless it is the
    worker that runs the eviction sweep and the prefetch list.
    """
    tls = _server_tls(config)
    mirror = Mirror(config, reactor, agent=agent, runner=runner)
    top = MirrorService(mirror, tls)
    site = harden(
        MirrorSite(mirror.resource(), reactor=reactor), config.server, mirror.connections, mirror.bodies
    )
    for child in mirror.services(maintenance=maintenance):
        child.setServiceParent(top)
    listening = ListeningService()  # added last: it starts last and stops first
    observability = mirror.observability  # /metrics on a listener of its own, if configured
    metrics = observability.metrics_resource()
    if config.security.protect_metrics:
        metrics = mirror.access.wrap(metrics, as_path="/metrics")
    metrics_site = harden(MirrorSite(observability.observe(metrics), reactor=reactor), config.server)
    if inherited is not None:
        for role, fd, family in inherited:
            chosen = metrics_site if role == "metrics" else site
            AdoptedPortService(reactor, fd, family, chosen).setServiceParent(listening)
        listening.setServiceParent(top)
        return top
    for description in config.listen_endpoints():
        try:
            listener(description, site, reactor, tls).setServiceParent(listening)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"server.listen: cannot use endpoint {description!r}: {e}") from None
    for description in observability.metrics_endpoints():
        try:
            listener(description, metrics_site, reactor, tls).setServiceParent(listening)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"server.metrics_listen: cannot use endpoint {description!r}: {e}") from None
    listening.setServiceParent(top)
    log_start(config, tls)
    return top


def _server_tls(config: Config) -> ServerTLS | None:
    """The certificate for ``ssl:`` listeners; a file that cannot be used is a configuration error."""
    server = config.server
    endpoints = [*config.listen_endpoints(), *config.server.metrics_listen]
    if not server.tls_certificate:
        return None
    if not any(is_managed_tls(e) for e in endpoints):
        log.warn("server.tls_certificate is set, but no ssl: listener in server.listen serves it")
    return ServerTLS(server.tls_certificate, server.tls_key, server.tls_chain)
