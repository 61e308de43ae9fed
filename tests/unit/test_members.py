"""The roster of a cluster's nodes, on a fake clock over a Redis in a dict: who is alive, and the totals."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from ollama_mirror.cluster.members import ClusterReport, Membership, cluster_totals
from tests.unit.fakeredis import FakeRedis


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    return box[0]


def traffic(served_cache: int, served_fill: int, upstream: int, hits: int, misses: int) -> dict[str, Any]:
    return {
        "requests": hits + misses,
        "cache_hits": {"blob": hits, "manifest": 0},
        "cache_misses": {"blob": misses, "manifest": 0},
        "bytes_served": {"cache": served_cache, "fill": served_fill, "upstream": 0},
        "bytes_from_upstream": upstream,
    }


def node(redis: FakeRedis, clock: Clock, name: str, report: dict[str, Any] | None = None) -> Membership:
    return Membership(redis, clock, f"http://{name}:11434", 15, "test", lambda: dict(report or {}))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_every_node_that_beats_is_listed_alive_with_what_it_reported(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a = node(redis, clock, "a", {"fills": [{"digest": "sha256:" + "1" * 64}]})
    b = node(redis, clock, "b")
    result(ensureDeferred(a.beat()))
    result(ensureDeferred(b.beat()))
    nodes = result(ensureDeferred(a.read()))
    assert [n["url"] for n in nodes] == ["http://a:11434", "http://b:11434"]
    assert all(n["alive"] for n in nodes)
    assert [n["self"] for n in nodes] == [True, False]
    assert nodes[0]["fills"] == [{"digest": "sha256:" + "1" * 64}]
    assert [(n["url"], n["self"]) for n in b.nodes] == [("http://a:11434", False), ("http://b:11434", True)]


def test_a_node_that_stops_beating_drops_out_within_twice_the_lease_time(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b = node(redis, clock, "a"), node(redis, clock, "b")
    heartbeats = a.service()
    heartbeats.startService()  # a beats every 5 s; b beats once, then dies
    result(ensureDeferred(b.beat()))
    clock.advance(29)
    assert [n["url"] for n in a.nodes] == ["http://a:11434", "http://b:11434"]
    clock.advance(5)  # 30 s (twice the lease) after b's last beat, and a's next beat reads the roster
    assert [n["url"] for n in a.nodes] == ["http://a:11434"]
    assert redis.sets["test:nodes"] == {"http://a:11434"}  # the dead node left the set too
    heartbeats.stopService()


def test_a_node_that_stops_cleanly_leaves_at_once(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a, b = node(redis, clock, "a"), node(redis, clock, "b")
    service = b.service()
    service.startService()
    result(ensureDeferred(a.beat()))
    assert len(result(ensureDeferred(a.read()))) == 2
    result(service.stopService())
    assert [n["url"] for n in result(ensureDeferred(a.read()))] == ["http://a:11434"]


def test_heartbeats_go_on_after_redis_comes_back(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a = node(redis, clock, "a")
    service = a.service()
    service.startService()
    redis.down = True
    clock.advance(40)  # (each failed beat is logged; none stops the timer)
    assert result(ensureDeferred(ClusterReport(a, "s3://b").summary()))["error"].startswith(
        "the cluster's Redis failed"
    )
    redis.down = False
    clock.advance(5)
    assert [n["url"] for n in a.nodes] == ["http://a:11434"]
    service.stopService()


def test_totals_add_up_the_nodes_and_the_ratios_come_from_the_sums() -> None:
    nodes = [
        {"url": "a", "traffic": traffic(300, 100, 100, 3, 1), "cache": {"size": 1000}, "fills": [{}]},
        {"url": "b", "traffic": traffic(100, 0, 0, 1, 0), "cache": {"size": 1000}, "fills": []},
    ]
    totals = cluster_totals(nodes)
    assert totals["nodes"] == 2
    assert totals["active_fills"] == 1
    assert totals["bytes_served"] == {"cache": 400, "fill": 100, "upstream": 0, "total": 500}
    assert totals["bytes_from_upstream"] == 100
    assert totals["bytes_saved"] == 400
    assert totals["hit_ratio"] == 0.8  # 4 hits of 5 answers
    assert totals["byte_hit_ratio"] == 0.8
    assert totals["cache_size"] == 2000
    assert cluster_totals([])["hit_ratio"] is None


def test_the_cluster_metrics_tell_about_every_live_node(clock: Clock) -> None:
    redis = FakeRedis(clock)
    a = node(redis, clock, "a", {"traffic": traffic(10, 0, 5, 1, 1)})
    b = node(redis, clock, "b", {"traffic": traffic(20, 0, 0, 2, 0)})
    result(ensureDeferred(b.beat()))
    result(ensureDeferred(a.beat()))
    registry = CollectorRegistry()
    registry.register(ClusterReport(a, "s3://bucket").collector())
    assert registry.get_sample_value("ollama_mirror_cluster_nodes") == 2
    assert registry.get_sample_value("ollama_mirror_cluster_served_bytes", {"source": "cache"}) == 30
    assert registry.get_sample_value("ollama_mirror_cluster_upstream_received_bytes") == 5
    assert registry.get_sample_value("ollama_mirror_cluster_cache_hits", {"kind": "blob"}) == 3
    assert registry.get_sample_value("ollama_mirror_cluster_node_up", {"node": "http://b:11434"}) == 1
