"""Leases on a fake clock, over a dict that expires keys as Redis does."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from ollama_mirror.cluster.leases import Claim, Leases
from tests.unit.fakeredis import FakeRedis

HEX = "a" * 64


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    return box[0]


def claim(leases: Leases, hexdigest: str = HEX) -> Claim:
    found = result(ensureDeferred(leases.claim(hexdigest)))
    assert isinstance(found, Claim), found
    return found


@pytest.fixture
def clock() -> Clock:
    return Clock()


def nodes(clock: Clock, redis: FakeRedis, *names: str) -> list[Leases]:
    return [Leases(redis, clock, f"http://{name}:11434", 15, "test") for name in names]


def test_one_node_holds_a_blob_and_the_others_learn_who(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b, c = nodes(clock, redis, "a", "b", "c")
    assert claim(a) == Claim("http://a:11434", True)
    assert claim(b) == Claim("http://a:11434", False)
    assert claim(c) == Claim("http://a:11434", False)
    assert claim(a, "b" * 64).ours and claim(b, "c" * 64).ours  # one lease per blob


def test_a_living_holder_keeps_its_lease_by_renewing_it(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b = nodes(clock, redis, "a", "b")
    claim(a)
    for _ in range(20):  # a minute: four lease lives
        clock.advance(3)
        assert claim(b).holder == "http://a:11434"


def test_a_dead_holders_lease_expires_and_a_waiting_node_takes_over_within_the_lease_time(
    clock: Clock,
) -> None:
    redis = FakeRedis(clock)
    a, b = nodes(clock, redis, "a", "b")
    claim(a)
    a._renewals.pop(HEX).stop()  # a dies: nobody renews its lease any more

    async def holder_answers() -> bool:
        return False

    waiting = ensureDeferred(b.wait_for_takeover(HEX, "http://a:11434", holder_answers))
    clock.pump([1.0] * 14)
    assert not waiting.called  # still a's
    clock.pump([1.0] * 2)
    assert result(waiting) == Claim("http://b:11434", True) and b.holds(HEX)


def test_released_leases_are_free_at_once_and_never_someone_elses(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b = nodes(clock, redis, "a", "b")
    claim(a)
    result(a.release(HEX))
    assert claim(b).ours
    result(a.release(HEX))  # (a no longer holds it: b's lease stays)
    assert claim(a).holder == "http://b:11434"


def test_a_lease_lost_while_cut_off_is_given_up_not_fought_for(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b = nodes(clock, redis, "a", "b")
    claim(a)
    redis.down = True  # a cannot reach Redis for longer than the lease
    clock.pump([5.0] * 4)
    redis.down = False
    assert claim(b).ours  # expired: b takes it
    clock.advance(5)  # a's next renewal finds b's lease
    assert not a.holds(HEX) and claim(b).ours


def test_a_store_that_fails_makes_the_claim_fail(clock: Clock) -> None:
    redis = FakeRedis(clock)
    (a,) = nodes(clock, redis, "a")
    redis.down = True
    failed = result(ensureDeferred(a.claim(HEX)))
    assert failed.check(ConnectionError)
