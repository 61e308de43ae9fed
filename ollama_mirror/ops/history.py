"""Traffic over time, for the web page's chart: the running totals sampled every few seconds.

The totals (:class:`~ollama_mirror.ops.stats.TrafficTally`) only grow; a ring buffer of samples turns
them into what happened in each interval (bytes served, bytes fetched upstream, the hit ratio) over the
last hour, in memory of fixed size, with no external time-series service.  Each process keeps its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime

from .stats import TrafficTally

SAMPLE_INTERVAL = 10.0
SAMPLES = 360  # an hour at one sample every ten seconds


@dataclass(frozen=True)
class Sample:
    at: float
    served: int  # body bytes sent to clients, from every source
    from_cache: int
    upstream: int  # body bytes received from upstreams
    hits: int
    answers: int


class TrafficHistory:
    """The samples, taken by :meth:`sample` (on a ``TimerService`` on the injected clock)."""

    def __init__(
        self,
        tally: TrafficTally,
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        length: int = SAMPLES,
    ) -> None:
        self._tally = tally
        self._clock = clock
        self.interval = interval
        self._samples: deque[Sample] = deque(maxlen=length + 1)  # (+1: the first is only a baseline)

    def sample(self) -> None:
        self._samples.append(self._now())

    def _now(self) -> Sample:
        tally = self._tally
        hits = sum(tally.hits.values())
        return Sample(
            at=self._clock.seconds(),
            served=sum(tally.served.values()),
            from_cache=tally.served["cache"],
            upstream=tally.upstream_received,
            hits=hits,
            answers=hits + sum(tally.misses.values()),
        )

    def document(self, live: bool = False) -> list[dict[str, Any]]:
        """One entry per interval, oldest first: its end time (Unix seconds) and what happened in it;
        *live* adds the interval running now, up to this instant (so a chart has something at once)."""
        samples = list(self._samples)
        if live and samples and self._clock.seconds() > samples[-1].at:
            samples.append(self._now())
        points = []
        for before, after in pairwise(samples):
            answers = after.answers - before.answers
            points.append(
                {
                    "at": round(after.at, 3),
                    "served": after.served - before.served,
                    "from_cache": after.from_cache - before.from_cache,
                    "upstream": after.upstream - before.upstream,
                    "hit_ratio": round((after.hits - before.hits) / answers, 4) if answers else None,
                }
            )
        return points

    def service(self) -> TimerService:
        timer = TimerService(self.interval, self.sample)  # (sample cannot raise: it only adds numbers)
        timer.clock = self._clock
        return timer
