"""The rate limit counted across the cluster: ``security.rate_limit_requests`` per client for all nodes.

A request is judged at once, without waiting on Redis: each node keeps its own smooth limit (the GCRA of
:class:`~ollama_mirror.security.ratelimit.RateLimiter`, which alone holds when Redis is away), and also
the client's total for the cluster in the current window of ``security.rate_limit_window`` seconds: the
total Redis last told this node plus what this node charged since.  Every charge is added to the
client's counter in Redis (one ``INCRBYFLOAT``, not waited for), and the answer becomes the new total.
So a client spread over N nodes gets the allowance once, not N times, give or take one request per
node (a node learns the others' charges with the answer to its own) and those in flight (a round trip
to Redis); like any fixed window, up to twice the allowance may pass around a window's edge.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..security.ratelimit import RateLimiter

log = Logger(namespace="ollama_mirror.cluster")

PRUNE_EVERY = 1024
QUIET_FOR = 60.0  # seconds between two log lines about failing counters


class Counters(Protocol):
    def add(self, key: str, amount: float, ttl_ms: int) -> Awaitable[float]:
        """Add *amount* to the counter *key*: the new total (raises when the store fails)."""


class SharedRateLimiter:
    def __init__(self, local: RateLimiter, counters: Counters, clock: IReactorTime, namespace: str) -> None:
        """*local* is this node's own limit (the same settings); *namespace* keeps clusters apart."""
        self._local = local
        self._counters = counters
        self._clock = clock
        self._namespace = namespace
        self.requests = local.requests
        self.window = local.window
        self._totals: dict[str, tuple[int, float]] = {}  # client -> (window number, cluster total)
        self._calls = 0
        self._complained_at: float | None = None

    def take(self, key: str, cost: float = 1.0) -> float | None:
        """Count a request of *cost* units for *key*: ``None`` if allowed, else the seconds to wait."""
        if not self.requests:
            return None
        wait = self._local.take(key, cost)
        if wait is not None:
            return wait
        now = self._clock.seconds()
        window = int(now // self.window)
        self._calls += 1
        if self._calls % PRUNE_EVERY == 0:
            self._totals = {k: v for k, v in self._totals.items() if v[0] == window}
        known = self._totals.get(key)
        total = known[1] if known is not None and known[0] == window else 0.0
        if total + cost > self.requests + 1e-9:
            return (window + 1) * self.window - now
        self._totals[key] = (window, total + cost)
        self._charge(key, window, cost)
        return None

    def _charge(self, key: str, window: int, cost: float) -> None:
        counter = f"{self._namespace}:rate:{key}:{window}"
        ttl_ms = int(2 * self.window * 1000)
        charged = Deferred.fromCoroutine(_add(self._counters, counter, cost, ttl_ms))
        charged.addCallbacks(self._learned, self._failed, callbackArgs=(key, window))

    def _learned(self, total: float, key: str, window: int) -> None:
        known = self._totals.get(key)
        if known is not None and known[0] == window:
            self._totals[key] = (window, max(known[1], total))  # (our own charges may still be on the way)
        elif known is None or known[0] < window:
            self._totals[key] = (window, total)

    def _failed(self, failure: Failure) -> None:
        now = self._clock.seconds()
        if self._complained_at is None or now - self._complained_at >= QUIET_FOR:
            self._complained_at = now
            log.warn(
                "the cluster's rate-limit counters failed ({error}): each node counts on its own meanwhile",
                error=failure.getErrorMessage(),
            )

    def __len__(self) -> int:
        return len(self._totals)


async def _add(counters: Counters, key: str, amount: float, ttl_ms: int) -> float:
    return await counters.add(key, amount, ttl_ms)
