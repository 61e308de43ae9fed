"""What operators see of a cluster: its live nodes (``GET /mirror/cluster``), the whole cluster's totals in
``/mirror/stats`` and ``/metrics`` on any node, and which of its services is down in ``/mirror/health``.

Real parts: SeaweedFS (S3), ``redis-server`` (one of the session, or one of the test's own when the test
stops it), the distribution registry, and daemons under twistd with ``cluster.lease_seconds`` 3.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import UPSTREAM_SETTINGS, fetch, pull_into_cache, wait_until
from tests.support.cli import run_cli
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import MiB, PushedModel, build_model
from tests.support.ollamakey import OllamaKey
from tests.support.puller import pull
from tests.support.pusher import push
from tests.support.redisserver import RedisServer
from tests.support.registry import free_port
from tests.support.s3server import S3Server

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")

SECRET = "cluster-test-secret-of-enough-length"
LEASE = 3


def cluster_section(s3_server: S3Server, redis_url: str) -> dict[str, Any]:
    return {
        "storage_url": f"s3://{s3_server.bucket}/nodes-{uuid.uuid4().hex[:12]}",
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
        "redis_url": redis_url,
        "lease_seconds": LEASE,
    }


def start_node(mirror_factory: MirrorFactory, proxy: FaultProxy, cluster: dict[str, Any]) -> MirrorDaemon:
    port = free_port()
    config = {
        "upstream": UPSTREAM_SETTINGS,
        "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
        "security": {"signing_secret": SECRET},
    }
    return mirror_factory(upstream_url=proxy.url, config=config, port=port)


def get_json(node: MirrorDaemon, path: str) -> tuple[int | None, Any]:
    got = fetch(node.url + path)
    return got.status, json.loads(got.body) if got.body else None


def listed(node: MirrorDaemon) -> list[str]:
    status, document = get_json(node, "/mirror/cluster")
    assert status == 200, document
    return [entry["url"] for entry in document["nodes"]]


def test_the_cluster_lists_its_live_nodes_and_a_killed_one_drops_out(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    redis_server: RedisServer,
    small_model: PushedModel,
) -> None:
    cluster = cluster_section(s3_server, redis_server.url)
    first, second, third = (start_node(mirror_factory, proxy, cluster) for _ in range(3))
    everyone = sorted(node.url for node in (first, second, third))
    wait_until(lambda: listed(first) == everyone, 10.0, "all three nodes in /mirror/cluster")

    pull_into_cache(second, small_model)  # traffic on one node...
    pull_into_cache(third, small_model)  # ...and on another (from the shared copy or the first node)
    time.sleep(LEASE / 3 + 0.5)  # (a heartbeat carries them)
    _, document = get_json(first, "/mirror/cluster")  # ...is seen from a third one
    entries = {entry["url"]: entry for entry in document["nodes"]}
    assert all(entry["alive"] for entry in entries.values())
    assert entries[first.url]["self"] and not entries[second.url]["self"]
    totals = document["totals"]
    assert totals["nodes"] == 3
    served = sum(entries[n.url]["traffic"]["bytes_served"]["total"] for n in (second, third))
    assert served >= 2 * small_model.total_size
    assert totals["bytes_served"]["total"] >= served
    _, stats = get_json(first, "/mirror/stats")
    assert stats["cluster"]["nodes"] == 3
    assert sorted(stats["cluster"]["node_urls"]) == everyone
    assert stats["cluster"]["bytes_served"]["total"] == totals["bytes_served"]["total"]
    metrics = fetch(first.url + "/metrics").body.decode()
    assert "ollama_mirror_cluster_nodes 3.0" in metrics
    assert f'ollama_mirror_cluster_node_up{{node="{second.url}"}} 1.0' in metrics

    third.kill()  # SIGKILL: no goodbye
    killed_at = time.monotonic()
    wait_until(lambda: third.url not in listed(first), 2 * LEASE + 5, "the killed node out of the list")
    gone_after = time.monotonic() - killed_at
    print(f"\nkilled node dropped out of /mirror/cluster after {gone_after:.1f} s (lease {LEASE} s)")
    assert listed(second) == sorted([first.url, second.url])

    second.stop()  # a clean stop leaves at once
    assert listed(first) == [first.url]


def test_health_names_the_cluster_service_that_is_down_and_the_node_recovers_by_itself(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    small_model: PushedModel,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")  # this test's own: it is stopped and started again
    try:
        node = start_node(mirror_factory, proxy, cluster_section(s3_server, redis.url))

        def check(name: str) -> dict[str, Any]:
            _, health = get_json(node, "/mirror/health")
            found: dict[str, Any] = health["checks"][name]
            return found

        def redis_check() -> dict[str, Any]:
            return check("redis")

        wait_until(lambda: redis_check()["status"] == "ok", 10.0, "redis ok in /mirror/health")
        wait_until(lambda: check("shared_storage")["status"] == "ok", 10.0, "the shared storage ok")
        assert check("shared_storage")["url"].startswith("s3://")
        assert "password" not in json.dumps(redis_check()) and (redis.password or "@") not in json.dumps(
            redis_check()
        )
        pull_into_cache(node, small_model)

        port = redis.port
        redis.stop()
        wait_until(lambda: redis_check()["status"] == "degraded", 2 * LEASE + 10, "redis degraded")
        assert check("shared_storage")["status"] == "ok"
        status, health = get_json(node, "/mirror/health")
        assert status == 200 and health["status"] == "degraded"  # still serving: not taken out
        print(f"\nredis down: {redis_check()['detail']}")
        pull_into_cache(node, small_model)  # what the node holds is still served
        status, document = get_json(node, "/mirror/cluster")
        assert status == 503 and "Redis" in document["error"]

        redis.start(port=port)
        wait_until(lambda: redis_check()["status"] == "ok", 2 * LEASE + 15, "redis ok again")
        wait_until(lambda: listed(node) == [node.url], 2 * LEASE + 15, "the node back in the roster")
    finally:
        redis.stop()


def test_the_rate_limit_counts_a_client_across_the_nodes(
    mirror_factory: MirrorFactory, proxy: FaultProxy, s3_server: S3Server, redis_server: RedisServer
) -> None:
    cluster = cluster_section(s3_server, redis_server.url)
    limit = {"rate_limit_requests": 10, "rate_limit_window": 60, "signing_secret": SECRET}
    nodes = []
    for _ in range(2):
        port = free_port()
        config = {
            "upstream": UPSTREAM_SETTINGS,
            "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
            "security": limit,
        }
        nodes.append(mirror_factory(upstream_url=proxy.url, config=config, port=port))
    statuses = [
        fetch(f"{nodes[i % 2].url}/v2/library/unknown-{i}/manifests/latest").status for i in range(30)
    ]
    answered = sum(status != 429 for status in statuses)
    print(f"\n30 upstream-bound requests over 2 nodes, limit 10: {answered} answered, the rest 429")
    assert 10 <= answered <= 12, statuses  # (one node alone would answer 10, two 20)
    assert 429 in statuses[10:13]


def tags(node: MirrorDaemon) -> list[str]:
    _, document = get_json(node, "/api/tags")
    return sorted(model["name"] for model in document["models"])


def test_rm_and_prefetch_on_one_node_act_for_the_whole_cluster(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    redis_server: RedisServer,
    small_model: PushedModel,
) -> None:
    cluster = cluster_section(s3_server, redis_server.url)
    first, second = (start_node(mirror_factory, proxy, cluster) for _ in range(2))
    wait_until(lambda: len(listed(first)) == 2 and len(listed(second)) == 2, 10.0, "both nodes listed")
    short = small_model.repo.removeprefix("library/") + ":" + small_model.tag

    prefetched = run_cli("prefetch", short, "--mirror", first.url)  # one node fetches...
    assert prefetched.returncode == 0, prefetched.stderr
    prefix = cluster["storage_url"].split("/", 3)[3]
    manifest_key = (
        f"/{s3_server.bucket}/{prefix}/manifests/registry.ollama.ai/{small_model.repo}/{small_model.tag}"
    )
    wait_until(lambda: s3_server.request("HEAD", manifest_key).status == 200, 30.0, "the model shared")
    proxy.clear_records()
    pull_into_cache(second, small_model)  # ...and the other serves it from the shared copy
    assert all(proxy.bytes_for(blob.hex) == 0 for blob in small_model.blobs)
    wait_until(lambda: tags(second) == [short], 15.0, "the model published on the second node")
    assert tags(first) == [short]

    forged = urllib.request.Request(f"{first.url}/mirror/cluster/models/{small_model.repo}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:  # (what only the nodes may ask)
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 403
    assert tags(first) == [short]

    removed = run_cli("rm", short, "--mirror", second.url)  # rm on one node...
    assert removed.returncode == 0, removed.stderr
    assert tags(second) == [] and tags(first) == []  # ...removes it from every node
    assert s3_server.request("HEAD", manifest_key).status == 404  # and from the shared storage
    gone = run_cli("rm", short, "--mirror", first.url)
    assert gone.returncode == 1 and b"not in the cache" in gone.stderr


def test_the_shared_copy_follows_the_retention_rule(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    redis_server: RedisServer,
    small_model: PushedModel,
) -> None:
    cluster = cluster_section(s3_server, redis_server.url)
    port = free_port()
    config = {
        "upstream": UPSTREAM_SETTINGS,
        "cache": {"retention_days": 10 / 86400, "cleanup_interval": 2},  # unused for 10 s: gone
        "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
        "security": {"signing_secret": SECRET},
    }
    node = mirror_factory(upstream_url=proxy.url, config=config, port=port)
    pull_into_cache(node, small_model)
    prefix = cluster["storage_url"].split("/", 3)[3]
    manifest_key = (
        f"/{s3_server.bucket}/{prefix}/manifests/registry.ollama.ai/{small_model.repo}/{small_model.tag}"
    )
    wait_until(lambda: s3_server.request("HEAD", manifest_key).status == 200, 30.0, "the model shared")
    wait_until(lambda: s3_server.request("HEAD", manifest_key).status == 404, 30.0, "the tag swept")
    wait_until(lambda: "1 tags past retention" in node.log_text(), 10.0, "the sweep's summary line")
    blob_key = f"/{s3_server.bucket}/{prefix}/blobs/{small_model.model_layer.cache_name}"
    assert s3_server.request("HEAD", blob_key).status == 200  # (blobs wait an hour for a manifest)


def test_a_node_joining_with_a_full_cache_shares_it_and_workers_share_one_place_in_the_roster(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    redis_server: RedisServer,
    small_model: PushedModel,
    tmp_path: Path,
) -> None:
    alone = mirror_factory(upstream_url=proxy.url, config={"upstream": UPSTREAM_SETTINGS})  # no cluster yet
    pull_into_cache(alone, small_model)
    alone.stop()

    cluster = cluster_section(s3_server, redis_server.url)
    port = free_port()
    config = {
        "server": {"workers": 2},
        "upstream": UPSTREAM_SETTINGS,
        "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
        "security": {"signing_secret": SECRET},
    }
    joined = mirror_factory(upstream_url=proxy.url, config=config, port=port, cache_dir=alone.cache_dir)
    prefix = cluster["storage_url"].split("/", 3)[3]
    manifest_key = (
        f"/{s3_server.bucket}/{prefix}/manifests/registry.ollama.ai/{small_model.repo}/{small_model.tag}"
    )
    wait_until(lambda: s3_server.request("HEAD", manifest_key).status == 200, 30.0, "the cache shared")
    assert "shared 1 models this node held" in joined.log_text()

    proxy.clear_records()
    fresh = start_node(mirror_factory, proxy, cluster)
    pull_into_cache(fresh, small_model)
    assert all(proxy.bytes_for(blob.hex) == 0 for blob in small_model.blobs)
    wait_until(lambda: listed(fresh) == sorted([joined.url, fresh.url]), 10.0, "both nodes, once each")
    for _ in range(4):  # (whichever worker answers)
        assert listed(joined) == sorted([joined.url, fresh.url])


def test_a_model_pushed_to_one_node_is_pulled_from_another(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    s3_server: S3Server,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    key = OllamaKey("pusher@test")
    keys = tmp_path / "push_keys"
    keys.write_text(key.public_line() + "\n")
    cluster = cluster_section(s3_server, redis_server.url)
    private = {"namespaces": ["team"], "push_authorized_keys": str(keys)}
    nodes = []
    for _ in range(2):
        port = free_port()
        config = {
            "upstream": UPSTREAM_SETTINGS,
            "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
            "security": {"signing_secret": SECRET},
            "private": private,
        }
        nodes.append(mirror_factory(upstream_url=proxy.url, config=config, port=port))
    model = build_model(tmp_path / "models", size=3 * MiB, seed=41, name="ours")
    push(nodes[0].url, "team/ours", "v1", model, key=key, part_size_min=MiB, part_size_max=2 * MiB)
    prefix = cluster["storage_url"].split("/", 3)[3]
    manifest_key = f"/{s3_server.bucket}/{prefix}/manifests/registry.ollama.ai/team/ours/v1"
    wait_until(lambda: s3_server.request("HEAD", manifest_key).status == 200, 30.0, "the pushed model shared")
    proxy.clear_records()
    pulled = pull(
        nodes[1].url, "team/ours", "v1", tmp_path / "puller", part_size_min=MiB, part_size_max=2 * MiB
    )
    assert {digest for digest, _, _ in pulled.blobs} == {blob.digest for blob in model.blobs}
    assert proxy.records("/v2/team") == []  # from the shared storage, never from an upstream
