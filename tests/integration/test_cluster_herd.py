"""Three nodes, one bucket, one Redis: a cold model pulled on all three at the same moment crosses the
upstream once, and every puller verifies it; a holder killed mid-download is taken over.

Real parts: SeaweedFS (S3; the first test runs on moto's server mode too), ``redis-server``, the
distribution registry behind the counting fault proxy, three daemons under twistd, and Go-style pullers
(16 ranged parts) from ``tests.support.puller``.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    UPSTREAM_SETTINGS,
    assert_valid_models_dir,
    on_every_s3_store,
    sha256_file,
    wait_until,
)
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import KiB, MiB, ModelFactory, PushedModel
from tests.support.puller import PullResult, pull
from tests.support.redisserver import RedisServer
from tests.support.registry import free_port
from tests.support.s3server import S3Store

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")

SECRET = "cluster-test-secret-of-enough-length"


@pytest.fixture
def cluster(s3_store: S3Store, redis_server: RedisServer) -> dict[str, Any]:
    """The ``cluster`` section every node of this test shares: one prefix, one Redis namespace."""
    return {
        "storage_url": f"s3://{s3_store.bucket}/herd-{uuid.uuid4().hex[:12]}",
        "s3_endpoint": s3_store.endpoint,
        "s3_access_key_id": s3_store.access_key_id,
        "s3_secret_access_key": s3_store.secret_access_key,
        "redis_url": redis_server.url,
        "lease_seconds": 3,
    }


def start_nodes(
    count: int, mirror_factory: MirrorFactory, proxy: FaultProxy, cluster: dict[str, Any]
) -> list[MirrorDaemon]:
    nodes = []
    for _ in range(count):
        port = free_port()
        config = {
            "upstream": {**UPSTREAM_SETTINGS, "chunk_size": "1MiB"},
            "cluster": {**cluster, "node_url": f"http://127.0.0.1:{port}"},
            "security": {"signing_secret": SECRET},
        }
        nodes.append(mirror_factory(upstream_url=proxy.url, config=config, port=port))
    return nodes


def pull_everywhere(
    nodes: list[MirrorDaemon], model: PushedModel, dest: Path
) -> list[PullResult | BaseException]:
    """A Go-style pull of *model* on every node at the same moment (each in a thread of its own)."""
    results: list[PullResult | BaseException] = [RuntimeError("did not run")] * len(nodes)
    start = threading.Barrier(len(nodes))

    def run(index: int) -> None:
        start.wait(timeout=10)
        try:
            results[index] = pull(
                nodes[index].url,
                model.repo,
                model.tag,
                dest / f"puller{index}",
                part_size_min=256 * KiB,
                part_size_max=MiB,
                stall_timeout=15.0,
                timeout=120.0,
            )
        except BaseException as e:
            results[index] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=150)
    return results


def assert_pulled(result: PullResult, model: PushedModel) -> None:
    """The puller holds every blob of the model, each matching its digest."""
    got = {digest: path for digest, _, path in result.blobs}
    for blob in model.blobs:
        assert sha256_file(got[blob.digest]) == blob.hex, f"{blob.digest} is wrong"


@on_every_s3_store
def test_a_cold_model_pulled_on_three_nodes_at_once_crosses_the_upstream_once(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    cluster: dict[str, Any],
    model_factory: ModelFactory,
    tmp_path: Path,
) -> None:
    model = model_factory("library/herd", "latest", 24 * MiB, 21)
    blob = model.model_layer
    nodes = start_nodes(3, mirror_factory, proxy, cluster)
    proxy.throttle(2 * MiB, path=blob.hex)  # a few seconds, so that the three downloads overlap
    results = pull_everywhere(nodes, model, tmp_path)
    for index, result in enumerate(results):
        assert isinstance(result, PullResult), f"node {index}: {result!r}"  # (a pull checks every sha256)
        assert_pulled(result, model)
    upstream = proxy.bytes_for(blob.hex)
    print(f"\n3 nodes, 3 pullers at once: the upstream sent {upstream / blob.size:.3f}x the blob")
    assert upstream <= 1.05 * blob.size, f"{upstream / blob.size:.2f}x the blob from upstream for 3 nodes"
    for node in nodes:
        stored = node.cache_dir / "blobs" / blob.cache_name
        wait_until(stored.exists, 30.0, "the blob on every node")
        assert_valid_models_dir(node.cache_dir)


def test_the_holder_killed_mid_download_is_taken_over_and_every_puller_finishes(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    cluster: dict[str, Any],
    model_factory: ModelFactory,
    tmp_path: Path,
) -> None:
    model = model_factory("library/takeover", "latest", 24 * MiB, 22)
    blob = model.model_layer
    first, second = start_nodes(2, mirror_factory, proxy, cluster)
    proxy.throttle(1 * MiB, path=blob.hex)
    outcome: list[PullResult | BaseException] = []
    follower = threading.Thread(target=lambda: outcome.extend(pull_everywhere([second], model, tmp_path)))
    warmup = threading.Thread(target=lambda: pull_everywhere([first], model, tmp_path / "first"))
    warmup.start()  # the first node takes the lease...
    wait_until(lambda: proxy.bytes_for(blob.hex) > 2 * MiB, 30.0, "the first node's download under way")
    follower.start()  # ...the second reads from it...
    time.sleep(1.0)
    first.kill()  # ...and the first dies
    follower.join(timeout=150)
    warmup.join(timeout=30)
    assert outcome and isinstance(outcome[0], PullResult), outcome
    assert_pulled(outcome[0], model)
    upstream = proxy.bytes_for(blob.hex)
    print(f"\nholder killed mid-download: the upstream sent {upstream / blob.size:.3f}x the blob")
    assert upstream <= 1.15 * blob.size, f"{upstream / blob.size:.2f}x the blob from upstream"
