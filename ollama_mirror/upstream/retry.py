"""One retry policy for every upstream request.

Registries, and the CDNs behind them, answer 429, 502, 503 or 504 now and then, and connections drop.
Every request the mirror sends upstream (a token, a manifest, a blob's HEAD, a blob or chunk GET, a
redirect's target) goes through :meth:`RetryPolicy.run`: a transient failure (no answer, a timeout,
408, 429, a 5xx other than 501 and 505) is tried again after an exponential backoff with jitter, or after
what ``Retry-After`` asks if that is longer (capped); any other answer is final at once.
``upstream.retry_attempts`` retries in all, the first after ``upstream.retry_delay`` seconds.  The caller
sees an error only when the budget is spent, and the error says what the upstream answered last and after
how many attempts.

A download's body can still break after its answer began (a cut, a stall); the Fill resumes it from the
bytes it has, under the same policy (:mod:`ollama_mirror.fill.fetch`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .errors import UpstreamError

log = Logger(namespace="ollama_mirror.upstream")  # pinned: log names are public

T = TypeVar("T")
MAX_DELAY = 30.0  # the backoff stops growing here
RETRY_AFTER_CAP = 60.0  # a Retry-After longer than this is waited this long


class RetryPolicy:
    def __init__(
        self,
        clock: IReactorTime,
        attempts: int,
        delay: float,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """*attempts*: retries after the first try; *delay*: seconds before the first retry (doubling);
        *jitter* draws in [0, 1): the wait is between half and all of the backoff, so that a fleet of
        mirrors does not retry in step."""
        self.clock = clock
        self.attempts = attempts
        self.delay = delay
        self._jitter = jitter

    def wait_before(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number *retry* (1, 2, ...)."""
        backoff: float = min(MAX_DELAY, self.delay * 2.0 ** (retry - 1))
        wait = backoff * (0.5 + self._jitter() / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, RETRY_AFTER_CAP))
        return wait

    async def run(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        retried: Callable[[Exception], None] | None = None,
    ) -> T:
        """The result of *attempt*, tried again on transient :class:`UpstreamError` while the budget
        lasts; *what* names the request in the log line of each retry; *retried* hears of each."""
        failures = 0
        while True:
            try:
                return await attempt()
            except UpstreamError as e:
                if not e.transient or failures >= self.attempts:
                    raise e.after(failures + 1) from None
                failures += 1
                wait = self.wait_before(failures, e.retry_after)
                log.warn(
                    "{what}: {error}; retry {n} of {max} in {wait:.1f} s",
                    what=what,
                    error=e.message,
                    n=failures,
                    max=self.attempts,
                    wait=wait,
                )
                if retried is not None:
                    retried(e)
                await deferLater(self.clock, wait)


def parse_retry_after(value: bytes | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` asks for (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
