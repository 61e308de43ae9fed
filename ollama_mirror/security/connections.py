"""How many connections one client address, and all clients together, may hold open.

Every connection costs a file descriptor, and a process has a limit: one address that opens thousands of
idle connections would otherwise leave nothing for anyone else (accept would fail with EMFILE, and a normal
pull from another address with it).  Two caps, counted per process:

- ``server.max_connections_per_client``: open connections from one address (fleets behind one NAT address
  pull with 16 connections per server, hence the generous default);
- ``server.max_connections``: open connections in all, by default what the descriptor limit allows after
  room for the files and upstream connections those connections need (two descriptors per client
  connection: its socket and the blob it reads).

A connection over a cap is answered at once with 503 and a ``Retry-After`` (an HTTP client retries, a
flood learns nothing) and closed; it never reaches a route.  The soft descriptor limit is raised to the hard
one at start, as Go programs do, since a mirror's work is connections.
"""

from __future__ import annotations

import resource
from collections import Counter

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..events import Events

log = Logger(namespace="ollama_mirror.hardening")  # pinned: log names are public

RESERVED_DESCRIPTORS = 256  # files, upstream connections, the index, logs, listening sockets
MIN_AUTOMATIC = 64
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about one address being refused
MAX_LOGGED_ADDRESSES = 4096
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A ``tcp:``/``ssl:`` strports *description* with a listen queue of LISTEN_BACKLOG unless it names
    one: Twisted's default of 50 drops connections a burst of clients (or a flood) makes at once, and a
    dropped handshake costs a client seconds of retries (the kernel caps it at ``net.core.somaxconn``)."""
    kind = description.partition(":")[0]
    if kind not in ("tcp", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={LISTEN_BACKLOG}"


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def descriptor_limit() -> int:
    """This process's soft limit of open files."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def automatic_total(descriptor_limit: int) -> int:
    """``server.max_connections`` when it is 0: half of what the descriptor limit leaves after the reserve."""
    return max(MIN_AUTOMATIC, (descriptor_limit - RESERVED_DESCRIPTORS) // 2)


class ConnectionLimits:
    """Counts open connections by client address and in all; says no beyond the caps (0: no cap)."""

    def __init__(
        self, clock: IReactorTime, per_client: int, total: int, events: Events | None = None
    ) -> None:
        self._clock = clock
        self._events = events or Events()
        self.per_client = per_client
        self.total = total
        self.open: Counter[str] = Counter()
        self.open_total = 0
        self.refused = 0
        self._logged: dict[str, float] = {}  # address -> when its refusal was last logged

    def admit(self, client: str | None) -> str | None:
        """Count a new connection from *client* (``None``: no address, a Unix socket); or, over a cap,
        do not count it and say why (the words of the 503 it gets)."""
        if self.total and self.open_total >= self.total:
            return self._refuse(
                client, f"the mirror has {self.open_total} open connections (server.max_connections)"
            )
        if client is not None and self.per_client and self.open[client] >= self.per_client:
            return self._refuse(
                client,
                f"{self.open[client]} connections are open from {client} (server.max_connections_per_client)",
            )
        self.open_total += 1
        if client is not None:
            self.open[client] += 1
        return None

    def closed(self, client: str | None) -> None:
        """A connection counted by :meth:`admit` is gone."""
        self.open_total -= 1
        if client is not None:
            self.open[client] -= 1
            if self.open[client] <= 0:
                del self.open[client]

    def _refuse(self, client: str | None, reason: str) -> str:
        self.refused += 1
        self._events.connection_refused()
        key = client or "-"
        now = self._clock.seconds()
        if now - self._logged.get(key, float("-inf")) >= REFUSAL_LOG_INTERVAL:
            if len(self._logged) >= MAX_LOGGED_ADDRESSES:  # many addresses: forget the old ones
                self._logged = {k: t for k, t in self._logged.items() if now - t < REFUSAL_LOG_INTERVAL}
            self._logged[key] = now
            log.warn("refusing new connections: {reason}; retry later", reason=reason)
        return reason
