"""Registry pull-through under upstream faults: cuts, corruption, 5xx, stalls, a killed daemon, a download cap.

Every fault is injected by the :class:`FaultProxy` between the mirror and the registry, aimed at one blob
(its digest in the path), so the rest of the model is fetched normally. Helpers come from ``helpers.py``,
fixtures from ``conftest.py``.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from ollama_mirror.units import human_size
from tests.integration.helpers import (
    CHUNK,
    CONNECTIONS,
    Fetched,
    MirrorStarter,
    assert_blob_served,
    blob_records_bytes,
    cached_blob,
    fetch_blob,
    get_manifest,
    partial_files,
    pull_into_cache,
    wait_cached,
    wait_until,
)
from tests.support.faultproxy import FaultProxy
from tests.support.models import KiB, MiB, ModelFactory, PushedModel

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")  # after every fault: Ollama can run the cache


def assert_not_served_cleanly(got: Fetched, size: int) -> None:
    """The client must be able to tell: an error status, an aborted connection or a short body."""
    if got.status is not None and got.status >= 500:
        assert json.loads(got.body)["errors"], got.body
        return
    assert got.error is not None or len(got.body) < size, (
        f"a failed download ended as a clean {got.status} response of {len(got.body)} bytes"
    )


# --- 12. connection cut mid-blob ------------------------------------------------------------------


def test_cut_connections_are_retried(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    mirror = start_mirror()
    blob = medium_model.model_layer
    proxy.cut_after(100_000, times=3, path=blob.hex, method="GET")

    got = fetch_blob(mirror, medium_model, blob)
    assert_blob_served(got, blob)
    wait_cached(mirror, blob)
    cuts = [r for r in proxy.records(blob.hex) if "cut" in r.faults]
    assert len(cuts) == 3
    # A retry resumes where the cut left off: the cut pieces are not fetched twice.
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size
    assert not any(p.exists() for p in partial_files(mirror, blob))


# --- 13. corrupted bytes --------------------------------------------------------------------------


def test_corrupt_blob_is_discarded_and_fetched_again(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    mirror = start_mirror()
    blob = medium_model.model_layer
    proxy.corrupt(1000, times=1, path=blob.hex, method="GET")

    fetch_blob(mirror, medium_model, blob)  # how that response ends: see the next test
    assert [r for r in proxy.records(blob.hex) if "corrupt" in r.faults]
    wait_until(
        lambda: "arrived with digest" in mirror.log_text(), 10.0, "the fill to report the digest mismatch"
    )
    assert not cached_blob(mirror, blob).exists()
    wait_until(
        lambda: not any(p.exists() for p in partial_files(mirror, blob)), 5.0, "the partial to be discarded"
    )
    assert not list((mirror.cache_dir / "blobs").iterdir())

    # The fault was a one-off: the next request downloads again and succeeds.
    again = fetch_blob(mirror, medium_model, blob)
    assert_blob_served(again, blob)
    assert again.header("x-mirror-cache") == "fill"
    wait_cached(mirror, blob)


def test_corrupt_blob_response_does_not_end_cleanly(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    """A client reading the whole blob while it downloads must not get a clean body that fails its digest.

    Bytes sent before the verification may be wrong; what matters is that the response does not end as a
    complete one: the connection is aborted (or the body is short).
    """
    mirror = start_mirror()
    blob = medium_model.model_layer
    proxy.corrupt(1000, times=1, path=blob.hex, method="GET")

    got = fetch_blob(mirror, medium_model, blob)
    assert got.status == 200 and got.header("x-mirror-cache") == "fill"
    wait_until(
        lambda: "arrived with digest" in mirror.log_text(), 10.0, "the fill to report the digest mismatch"
    )
    assert_not_served_cleanly(got, blob.size)


# --- 14. 5xx from upstream ------------------------------------------------------------------------


def test_transient_5xx_is_retried(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    mirror = start_mirror()
    blob = medium_model.model_layer
    proxy.fail(503, times=2, path=blob.hex, method="GET")

    assert_blob_served(fetch_blob(mirror, medium_model, blob), blob)
    wait_cached(mirror, blob)
    assert len([r for r in proxy.records(blob.hex) if r.status == 503]) == 2


def test_persistent_5xx_fails_cleanly_and_cache_still_serves(
    start_mirror: MirrorStarter,
    proxy: FaultProxy,
    medium_model: PushedModel,
    big_model: PushedModel,
) -> None:
    mirror = start_mirror(cache={"manifest_ttl": 0})
    pull_into_cache(mirror, medium_model)
    assert get_manifest(mirror, big_model).status == 200  # its blob sizes are known; no blob fetched yet
    proxy.fail(503)  # everything, from now on

    blob = big_model.model_layer
    started = time.monotonic()
    got = fetch_blob(mirror, big_model, blob)
    assert time.monotonic() - started < 10.0  # 3 retries 0.1 s apart, then give up
    assert_not_served_cleanly(got, blob.size)
    assert not cached_blob(mirror, blob).exists()
    assert len(proxy.records(blob.hex)) >= 4  # the first try and every retry
    wait_until(lambda: "failed" in mirror.log_text(), 5.0, "the fill failure in the log")

    # What is cached is still served, the manifest as stale (it could not be revalidated).
    manifest = get_manifest(mirror, medium_model)
    assert manifest.status == 200
    assert manifest.body == medium_model.manifest
    assert manifest.header("x-mirror-cache") == "stale"
    for cached in medium_model.blobs:
        assert_blob_served(fetch_blob(mirror, medium_model, cached), cached)

    # Once the upstream recovers the same blob downloads.
    proxy.clear_faults()
    assert_blob_served(fetch_blob(mirror, big_model, blob), blob)
    wait_cached(mirror, blob)


# --- 15. a stalled upstream body ------------------------------------------------------------------


def test_stalled_body_is_dropped_and_retried(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    idle_timeout = 1.0
    stall = 8.0
    mirror = start_mirror(upstream={"idle_timeout": idle_timeout})
    blob = medium_model.model_layer
    proxy.stall_after(50_000, stall, times=1, path=blob.hex, method="GET")

    got = fetch_blob(mirror, medium_model, blob)
    assert_blob_served(got, blob)
    assert got.elapsed < stall - 2, got.elapsed  # the mirror gave up on the stalled body, not the proxy
    wait_cached(mirror, blob)
    assert [r for r in proxy.records(blob.hex) if "stall" in r.faults]
    assert f"sent nothing for {idle_timeout:g} s" in mirror.log_text()


# --- 16. SIGKILL mid-fill, restart, resume --------------------------------------------------------


def _done_chunks(state_path_text: str) -> set[int]:
    document = json.loads(state_path_text)
    return set(document["done"])


def _marks(state_path_text: str) -> dict[int, int]:
    """How far each unfinished chunk got, as the record says."""
    return {int(index): mark for index, mark in json.loads(state_path_text).get("filled", {}).items()}


def test_killed_mid_fill_resumes_without_refetching(
    start_mirror: MirrorStarter, proxy: FaultProxy, big_model: PushedModel
) -> None:
    mirror = start_mirror()
    blob = big_model.model_layer
    part, state = partial_files(mirror, blob)
    assert get_manifest(mirror, big_model).status == 200
    proxy.throttle(512 * KiB, path=blob.hex)  # 4 connections: ~2 MiB/s, ~4 s for the blob

    outcome: list[Fetched] = []
    client = threading.Thread(target=lambda: outcome.append(fetch_blob(mirror, big_model, blob)))
    client.start()

    def some_done() -> bool:
        try:
            return len(_done_chunks(state.read_text())) >= 6
        except (OSError, ValueError):
            return False

    wait_until(some_done, 15.0, "six chunks recorded done", interval=0.02)
    mirror.kill()
    client.join(timeout=15)
    assert not client.is_alive()
    assert not outcome[0].clean  # the client saw the crash: a short body
    assert not cached_blob(mirror, blob).exists()

    recorded = state.read_text()  # what the crash left on disk
    done = _done_chunks(recorded)
    nchunks = -(-blob.size // CHUNK)
    assert 6 <= len(done) < nchunks
    done_bytes = sum(min(blob.size, (i + 1) * CHUNK) - i * CHUNK for i in done) + sum(
        _marks(recorded).values()
    )
    assert part.stat().st_size == blob.size

    proxy.throttle(None)
    proxy.clear_records()
    mirror.restart()
    got = fetch_blob(mirror, big_model, blob)
    assert_blob_served(got, blob)
    wait_cached(mirror, blob)
    assert not part.exists() and not state.exists()

    fetched = blob_records_bytes(proxy, blob)
    expected = blob.size - done_bytes
    assert expected <= fetched <= expected + CONNECTIONS * CHUNK, (fetched, expected, sorted(done))
    assert f"{human_size(done_bytes)} already on disk" in mirror.log_text()  # the fill's start line


# --- 17. the cap on concurrent downloads ----------------------------------------------------------


def test_download_cap_queues_the_second_blob(
    start_mirror: MirrorStarter, proxy: FaultProxy, model_factory: ModelFactory
) -> None:
    mirror = start_mirror(upstream={"max_concurrent_downloads": 1})
    models = [model_factory("library/capped", f"c{i}", 3 * MiB, 20 + i) for i in range(2)]
    for model in models:
        assert get_manifest(mirror, model).status == 200
    proxy.throttle(2 * MiB, path="/blobs/")  # ~0.4 s per blob, so that the two requests overlap
    barrier = threading.Barrier(2)
    results: dict[int, Fetched] = {}

    def client(i: int) -> None:
        barrier.wait(timeout=10)
        results[i] = fetch_blob(mirror, models[i], models[i].model_layer)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    for i, model in enumerate(models):
        assert_blob_served(results[i], model.model_layer)
        wait_cached(mirror, model.model_layer)
    # One download at a time: every upstream GET of the second blob started after the first one's last.
    starts = [
        sorted(r.started for r in proxy.records(m.model_layer.hex) if r.method == "GET") for m in models
    ]
    first, second = sorted(starts, key=lambda s: s[0])
    assert second[0] > first[-1], "the two downloads ran at the same time"
