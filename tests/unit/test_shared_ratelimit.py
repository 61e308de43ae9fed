"""The rate limit counted across a cluster's nodes, on a fake clock over a Redis in a dict."""

from __future__ import annotations

from twisted.internet.task import Clock

from ollama_mirror.cluster.ratelimit import SharedRateLimiter
from ollama_mirror.security.ratelimit import RateLimiter
from tests.unit.fakeredis import FakeRedis


def nodes(clock: Clock, redis: FakeRedis, count: int, requests: int = 10) -> list[SharedRateLimiter]:
    return [SharedRateLimiter(RateLimiter(clock, requests, 60), redis, clock, "test") for _ in range(count)]


def allowed(limiter: SharedRateLimiter, times: int, client: str = "10.0.0.7") -> int:
    return sum(limiter.take(client) is None for _ in range(times))


def test_a_client_spread_over_three_nodes_gets_the_allowance_once() -> None:
    clock = Clock()
    a, b, c = nodes(clock, FakeRedis(clock), 3)
    passed = allowed(a, 4) + allowed(b, 4) + allowed(c, 4)
    assert passed == 10
    # a node learns the others' charges with the answer to its own: at most one more each, then none
    late = allowed(a, 5) + allowed(b, 5) + allowed(c, 5)
    assert late <= 2, late
    assert allowed(a, 5) + allowed(b, 5) + allowed(c, 5) == 0
    assert a.take("10.0.0.8") is None  # another client has its own allowance


def test_the_refusal_says_when_the_window_ends_and_the_allowance_comes_back() -> None:
    clock = Clock()
    clock.advance(30)  # halfway into the first window
    a, b = nodes(clock, FakeRedis(clock), 2)
    assert allowed(a, 5) + allowed(b, 5) == 10
    wait = b.take("10.0.0.7")
    assert wait is not None and 29 <= wait <= 31
    clock.advance(wait)
    assert b.take("10.0.0.7") is None


def test_each_node_keeps_its_own_limit_when_redis_is_away() -> None:
    clock = Clock()
    redis = FakeRedis(clock)
    redis.down = True
    a, b = nodes(clock, redis, 2)
    assert allowed(a, 15) == 10  # (a's own smooth limit)
    assert allowed(b, 15) == 10  # without Redis the nodes cannot know of each other


def test_a_zero_limit_is_no_limit() -> None:
    clock = Clock()
    (a,) = nodes(clock, FakeRedis(clock), 1, requests=0)
    assert allowed(a, 100) == 100
