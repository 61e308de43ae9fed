"""Per-client request rate limits, and which address a request really comes from.

The limiter is GCRA (the "generic cell rate algorithm"): for each client it keeps one number, the
theoretical arrival time of its next request, so memory is constant per client and a client may
burst up to the whole allowance and then go on at the steady rate.  Time comes from the injected
clock.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import IReactorTime

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8``, ``::1``, ``192.168.1.7`` → networks (already validated by the config)."""
    return tuple(ipaddress.ip_network(text.strip(), strict=False) for text in texts)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().removeprefix("[").split("]")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(text: str, networks: Sequence[Network]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in networks)


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the rightmost
    ``X-Forwarded-For`` entry that is not itself a trusted proxy (entries left of it could be
    forged by the client)."""
    if not trusted or not in_networks(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if _address(hop) is None:
            return peer  # garbage in the header: fall back to what we know
        if not in_networks(hop, trusted):
            return hop
    return hops[0] if hops else peer


class RateLimiter:
    """At most *requests* per *window* seconds per key (0 requests: no limit)."""

    PRUNE_EVERY = 1024

    def __init__(self, clock: IReactorTime, requests: int, window: float) -> None:
        self._clock = clock
        self.requests = requests
        self.window = window
        self._interval = window / requests if requests else 0.0
        self._next: dict[str, float] = {}  # key -> theoretical arrival time
        self._calls = 0

    def take(self, key: str, cost: float = 1.0) -> float | None:
        """Count a request of *cost* units for *key*: ``None`` if allowed, else the seconds to wait."""
        if not self.requests:
            return None
        now: float = self._clock.seconds()
        self._calls += 1
        if self._calls % self.PRUNE_EVERY == 0:
            self._prune(now)
        after = max(self._next.get(key, now), now) + self._interval * cost
        if after - now > self.window + 1e-9:
            return after - now - self.window
        self._next[key] = after
        return None

    def _prune(self, now: float) -> None:
        """Forget clients whose allowance has fully come back (they behave as new ones)."""
        for key in [k for k, t in self._next.items() if t <= now]:
            del self._next[key]

    def __len__(self) -> int:
        return len(self._next)
