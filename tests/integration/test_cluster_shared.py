"""Nodes sharing one S3-compatible store (real SeaweedFS, and moto's server mode, on loopback: each test
runs on both): what one node verified, every node serves, without the upstream.

Each test uses a prefix of its own in the session's bucket.  Node A pulls a model through the fault
proxy (which counts what the upstream sends); node B, with an empty cache directory, then serves it: its
blobs come from the shared copy, not the upstream, and its cache ends a models directory Ollama can run.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    UPSTREAM_SETTINGS,
    assert_blob_served,
    assert_valid_models_dir,
    blob_url,
    fetch,
    fetch_blob,
    get_manifest,
    go_pull,
    on_every_s3_store,
    pull_into_cache,
    wait_until,
)
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import PushedModel
from tests.support.s3server import S3Store

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")


@pytest.fixture
def storage(s3_store: S3Store) -> dict[str, Any]:
    """The ``cluster`` section of a node: the session's store, under a prefix of this test's own."""
    return {
        "storage_url": f"s3://{s3_store.bucket}/test-{uuid.uuid4().hex[:12]}",
        "s3_endpoint": s3_store.endpoint,
        "s3_region": s3_store.region,
        "s3_access_key_id": s3_store.access_key_id,
        "s3_secret_access_key": s3_store.secret_access_key,
    }


def node(mirror_factory: MirrorFactory, proxy: FaultProxy, storage: dict[str, Any]) -> MirrorDaemon:
    return mirror_factory(upstream_url=proxy.url, config={"upstream": UPSTREAM_SETTINGS, "cluster": storage})


def shared_keys(s3: Any, s3_store: S3Store, storage: dict[str, Any]) -> set[str]:
    """Every object under the node's prefix, by its name below the prefix (botocore's own client)."""
    prefix = storage["storage_url"].split("/", 3)[3] + "/"
    listed = s3.list_objects_v2(Bucket=s3_store.bucket, Prefix=prefix)
    return {entry["Key"].removeprefix(prefix) for entry in listed.get("Contents", [])}


def wait_shared(s3: Any, s3_store: S3Store, storage: dict[str, Any], model: PushedModel) -> None:
    """Until the shared copy holds the model: its blobs, then its manifest."""
    wanted = {f"blobs/{blob.cache_name}" for blob in model.blobs}
    wanted.add(f"manifests/registry.ollama.ai/{model.repo}/{model.tag}")
    wait_until(lambda: wanted <= shared_keys(s3, s3_store, storage), 30.0, "the model in the shared storage")


@on_every_s3_store
def test_a_model_one_node_verified_is_served_by_a_new_node_without_the_upstream(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    storage: dict[str, Any],
    s3_store: S3Store,
    s3: Any,
    medium_model: PushedModel,
) -> None:
    first = node(mirror_factory, proxy, storage)
    pull_into_cache(first, medium_model)
    wait_shared(s3, s3_store, storage, medium_model)

    proxy.clear_records()
    second = node(mirror_factory, proxy, storage)  # joins later, with an empty cache directory
    assert get_manifest(second, medium_model).status == 200
    for blob in medium_model.blobs:
        assert_blob_served(fetch_blob(second, medium_model, blob), blob)
        assert proxy.bytes_for(blob.hex) == 0, f"{blob.digest} came from the upstream, not the shared copy"
    wait_until(
        lambda: (
            second.cache_dir / "manifests/registry.ollama.ai" / medium_model.repo / medium_model.tag
        ).exists(),
        15.0,
        "the model published on the second node",
    )
    assert_valid_models_dir(second.cache_dir)
    assert (
        f"fill sha256:{medium_model.model_layer.hex[:12]} done: 4.2 MB from the shared storage"
        in second.log_text()
    )
    stats = json.loads(fetch(second.url + "/mirror/stats").body)
    assert stats["bytes_from_upstream"] == 0
    assert stats["bytes_from_cluster"] == {"storage": medium_model.total_size, "node": 0}
    metrics = fetch(second.url + "/metrics").body.decode()
    line = 'ollama_mirror_cluster_received_bytes_total{source="storage"} '
    found = [float(text.removeprefix(line)) for text in metrics.splitlines() if text.startswith(line)]
    assert found == [medium_model.total_size], [t for t in metrics.splitlines() if "cluster" in t]


@on_every_s3_store
def test_with_the_upstream_away_a_new_node_serves_what_the_cluster_holds(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    storage: dict[str, Any],
    s3_store: S3Store,
    s3: Any,
    small_model: PushedModel,
) -> None:
    pull_into_cache(node(mirror_factory, proxy, storage), small_model)
    wait_shared(s3, s3_store, storage, small_model)
    proxy.down("refuse")
    second = node(mirror_factory, proxy, storage)
    response = get_manifest(second, small_model)
    assert response.status == 200 and response.body == small_model.manifest
    for blob in small_model.blobs:
        assert_blob_served(fetch_blob(second, small_model, blob), blob)


@on_every_s3_store
def test_a_blob_that_fails_verification_never_reaches_the_shared_copy(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    storage: dict[str, Any],
    s3_store: S3Store,
    s3: Any,
    medium_model: PushedModel,
) -> None:
    blob = medium_model.model_layer
    proxy.corrupt(1000, times=1, path=blob.hex)
    first = node(mirror_factory, proxy, storage)
    assert get_manifest(first, medium_model).status == 200
    got = fetch_blob(first, medium_model, blob)
    assert not got.clean or got.status != 200  # the damaged download failed visibly
    assert f"blobs/{blob.cache_name}" not in shared_keys(s3, s3_store, storage)
    pull_into_cache(first, medium_model)  # asked again: right, and only then shared
    wait_shared(s3, s3_store, storage, medium_model)


STORE_REFUSALS = [
    ("credentials", {"s3_secret_access_key": "wrong"}, "the credentials were refused"),
    ("bucket", {"storage_url": "s3://no-such-bucket"}, "there is no bucket 'no-such-bucket'"),
]


@pytest.mark.parametrize(
    ("s3_store", "change", "words"),
    [
        *(
            pytest.param(store, change, words, id=f"{name}-{store}")
            for name, change, words in STORE_REFUSALS
            for store in ("seaweedfs", "moto")
        ),
        pytest.param(
            "seaweedfs",
            {"s3_endpoint": "http://127.0.0.1:9"},
            "cluster.s3_endpoint: cannot reach",
            id="endpoint",
        ),
    ],
    indirect=["s3_store"],
)
def test_storage_that_cannot_be_used_stops_start_up_with_one_line(
    mirror_factory: MirrorFactory, storage: dict[str, Any], change: dict[str, str], words: str
) -> None:
    daemon = mirror_factory(config={"cluster": {**storage, **change}}, start=False)
    daemon.start(wait=False)
    assert daemon.wait_exit(timeout=30) == 2
    output = (daemon.stderr_text() + daemon.stdout_text()).strip()
    assert output.startswith("ollama-mirror: configuration error: cluster."), output
    assert words in output and "Traceback" not in output and len(output.splitlines()) == 1
    assert "wrong" not in output.replace("were refused", "")  # (no secret in the line)


def test_blob_gets_go_to_the_shared_storage_with_redirect_to_storage(
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    storage: dict[str, Any],
    s3_store: S3Store,
    s3: Any,
    medium_model: PushedModel,
    tmp_path: Path,
) -> None:
    """(On SeaweedFS: moto's server answers presigned URLs 500 when authentication is on.)"""
    first = node(mirror_factory, proxy, storage)
    pull_into_cache(first, medium_model)
    wait_shared(s3, s3_store, storage, medium_model)
    proxy.clear_records()

    # The storage by another host name than the mirror's (localhost, not 127.0.0.1), as Ollama needs
    elsewhere = {**storage, "s3_endpoint": s3_store.endpoint.replace("127.0.0.1", "localhost")}
    redirecting = node(mirror_factory, proxy, {**elsewhere, "redirect_to_storage": True})
    blob = medium_model.model_layer
    data = blob.path.read_bytes()
    got = fetch_blob(redirecting, medium_model, blob)
    assert got.status == 307, got
    location = got.header("location")
    assert location.startswith(elsewhere["s3_endpoint"] + "/") and "X-Amz-Signature=" in location
    part = fetch(location, {"Range": "bytes=100-199"})  # (what Ollama's parts do, with no credentials)
    assert part.status == 206 and part.body == data[100:200]
    head = urllib.request.urlopen(
        urllib.request.Request(blob_url(redirecting, medium_model, blob), method="HEAD")
    )
    assert head.status == 200 and head.headers["content-length"] == str(blob.size)  # the node's own answer

    result = go_pull(redirecting, medium_model, tmp_path / "puller")  # Ollama's way, checking every sha256
    assert {digest for digest, _, _ in result.blobs} == {b.digest for b in medium_model.blobs}
    blob_parts = [r for r in result.requests if r.range is not None]
    assert blob_parts and all(r.url.startswith(elsewhere["s3_endpoint"]) for r in blob_parts)
    assert not list((redirecting.cache_dir / "blobs").iterdir())  # no blob went through the node
    assert all(proxy.bytes_for(b.hex) == 0 for b in medium_model.blobs)

    # The storage by the mirror's own host name: Ollama would follow the 307 itself, so the node streams
    same_host = node(mirror_factory, proxy, {**storage, "redirect_to_storage": True})
    streamed = fetch_blob(same_host, medium_model, blob)
    assert streamed.status == 200 and streamed.body == data
