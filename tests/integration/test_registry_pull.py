"""Registry pull-through core: real clients pull real models through the mirror from a real registry.

The upstream is the CNCF distribution registry (``registry`` fixture) behind a :class:`FaultProxy` that counts
the body bytes the mirror fetches and can misbehave (redirect blobs to another host, ignore ``Range``, go
down). The daemon is the real ``twistd -n ollama-mirror`` with small chunks, so a few-MiB blob is fetched in
many ranged pieces. Clients: the Go-style test puller (``tests/support/puller.py``), the ``oras`` Python SDK,
and plain sockets.

Shared helpers live in ``helpers.py``; the ``proxy``, ``start_mirror``, ``medium_model`` and ``big_model``
fixtures in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from tests.integration.helpers import (
    CHUNK,
    UPSTREAM_HOST,
    UPSTREAM_SETTINGS,
    Fetched,
    MirrorStarter,
    RawClient,
    assert_blob_served,
    blob_records_bytes,
    blob_url,
    cached_blob,
    fetch_blob,
    get_manifest,
    go_pull,
    manifest_url,
    partial_files,
    pull_into_cache,
    registry_error_code,
    sha256_file,
    sha256_hex,
    wait_cached,
    wait_until,
)
from tests.support.daemon import MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import (
    MANIFEST_V2,
    Blob,
    KiB,
    MiB,
    ModelFactory,
    PushedModel,
    Response,
    http_request,
    push_blob,
    write_blob,
)
from tests.support.registry import RegistryProcess

# --- 1. the Go server's pull, cold then warm -----------------------------------------------------


def test_go_pull_cold_then_warm(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel, tmp_path: Path
) -> None:
    mirror = start_mirror()
    cold = go_pull(mirror, medium_model, tmp_path / "cold")

    assert cold.manifest_bytes == medium_model.manifest
    assert cold.manifest_digest == medium_model.digest
    assert {d for d, _s, _p in cold.blobs} == {b.digest for b in medium_model.blobs}
    for digest, size, path in cold.blobs:
        assert path.stat().st_size == size
        assert "sha256:" + sha256_file(path) == digest
    model_result = next(r for r in cold.blob_results if r.digest == medium_model.model_layer.digest)
    assert len(model_result.parts) >= 16
    assert all(set(p.statuses) == {206} for p in model_result.parts)

    # Every discovery GET (no Range) got 200 with a Location, as the Go client insists.
    discoveries = [r for r in cold.requests if r.method == "GET" and "/blobs/" in r.url and r.range is None]
    assert len(discoveries) == len(medium_model.blobs)
    for request in discoveries:
        assert request.status == 200, request
        assert request.headers.get("location"), request
    for blob in medium_model.blobs:
        wait_cached(mirror, blob)
    cold_upstream = proxy.bytes_for("/blobs/")
    assert medium_model.total_size <= cold_upstream <= 1.05 * medium_model.total_size

    # Warm: every blob answer is a cache hit and the upstream sends nothing more.
    manifest_requests = proxy.requests_for("/manifests/")
    warm = go_pull(mirror, medium_model, tmp_path / "warm")
    for digest, _size, path in warm.blobs:
        assert "sha256:" + sha256_file(path) == digest
    blob_gets = [r for r in warm.requests if r.method == "GET" and "/blobs/" in r.url]
    assert len(blob_gets) >= len(medium_model.blobs) + 16
    assert {r.headers.get("x-mirror-cache") for r in blob_gets} == {"hit"}
    assert proxy.bytes_for("/blobs/") == cold_upstream
    assert proxy.requests_for("/manifests/") == manifest_requests  # the tag is fresh (manifest_ttl)


# --- 2. manifests verbatim, exact blob sizes -----------------------------------------------------


def test_manifest_verbatim_and_exact_head_sizes(
    start_mirror: MirrorStarter, medium_model: PushedModel
) -> None:
    mirror = start_mirror()
    model = medium_model

    # HEAD of a blob the mirror has never heard of (no manifest seen yet): the size comes from upstream.
    head = http_request("HEAD", blob_url(mirror, model, model.config))
    assert head.status == 200
    assert head.header("content-length") == str(model.config.size)

    response = get_manifest(mirror, model)
    assert response.status == 200
    assert response.body == model.manifest
    assert response.header("docker-content-digest") == "sha256:" + sha256_hex(response.body)
    assert response.header("docker-content-digest") == model.digest
    assert response.header("content-type") == MANIFEST_V2
    assert response.header("content-length") == str(len(model.manifest))
    tag = (UPSTREAM_HOST, "library", "medium", "latest")
    staged = mirror.cache_dir.joinpath(".mirror", "staged", *tag)  # until its blobs are cached
    assert staged.read_bytes() == model.manifest
    assert not mirror.cache_dir.joinpath("manifests", *tag).exists()

    head_manifest = get_manifest(mirror, model, method="HEAD")
    assert head_manifest.status == 200
    assert head_manifest.header("content-length") == str(len(model.manifest))
    assert head_manifest.header("docker-content-digest") == model.digest
    by_digest = http_request("GET", manifest_url(mirror, model, model.digest))
    assert by_digest.status == 200
    assert by_digest.body == model.manifest

    # Not cached yet: exact Content-Length for every blob, and HEAD does not publish anything.
    for blob in model.blobs:
        head = http_request("HEAD", blob_url(mirror, model, blob))
        assert head.status == 200, blob
        assert head.header("content-length") == str(blob.size)
        assert head.body == b""
        assert not cached_blob(mirror, blob).exists()

    pull_into_cache(mirror, model)
    for blob in model.blobs:
        head = http_request("HEAD", blob_url(mirror, model, blob))
        assert head.status == 200
        assert head.header("content-length") == str(blob.size)
        assert head.header("docker-content-digest") == blob.digest


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_manifests_carry_the_upstream_content_type_cold_and_cached(
    start_mirror: MirrorStarter, proxy: FaultProxy, registry: RegistryProcess, small_model: PushedModel
) -> None:
    """Docker v2 and OCI manifests, with and without their ``mediaType`` field (OCI makes it optional):
    the mirror answers each with the Content-Type its registry gives it: fetched, fresh in the cache, and
    read back from disk after a restart with the upstream gone."""
    body = json.loads(small_model.manifest)
    oci = {**body, "mediaType": OCI_MANIFEST}
    bare = {k: v for k, v in oci.items() if k != "mediaType"}
    variants = {
        "latest": small_model.manifest,
        "oci": json.dumps(oci).encode(),
        "bare": json.dumps(bare).encode(),
    }
    for tag in ("oci", "bare"):
        put = http_request(
            "PUT",
            f"{registry.url}/v2/library/tiny/manifests/{tag}",
            headers={"Content-Type": OCI_MANIFEST},
            body=variants[tag],
        )
        assert put.status == 201, put.body
    accept = {"Accept": f"{MANIFEST_V2}, {OCI_MANIFEST}"}
    upstream_types = {
        tag: http_request("GET", f"{registry.url}/v2/library/tiny/manifests/{tag}", headers=accept).header(
            "content-type"
        )
        for tag in variants
    }
    assert upstream_types == {"latest": MANIFEST_V2, "oci": OCI_MANIFEST, "bare": OCI_MANIFEST}
    mirror = start_mirror(cache={"manifest_ttl": 3600})

    def check(expected_source: str) -> None:
        for tag, data in variants.items():
            for method in ("GET", "HEAD"):
                got = http_request(method, f"{mirror.url}/v2/library/tiny/manifests/{tag}", headers=accept)
                assert got.status == 200, (tag, got.body)
                assert got.header("content-type") == upstream_types[tag], (tag, method, expected_source)
                if expected_source != "upstream":
                    assert got.header("x-mirror-cache") == expected_source
                if method == "GET":
                    assert got.body == data

    check("upstream")
    check("cache")
    proxy.down()
    mirror.restart()
    check("stale")


# --- 3. ranges, cold and warm --------------------------------------------------------------------


def _range_cases(size: int) -> list[tuple[str, int, int]]:
    """``(Range header, first, last)`` for ``a-b``, ``a-`` and ``-n``, none on a chunk boundary."""
    a = CHUNK * 3 // 2 + 123
    return [
        (f"bytes={a}-{a + 700_000}", a, a + 700_000),
        (f"bytes={size - 1_000_003}-", size - 1_000_003, size - 1),
        ("bytes=-300001", size - 300_001, size - 1),
    ]


def _check_range(got: Fetched, blob: Blob, first: int, last: int) -> None:
    assert got.clean, got.error
    assert got.status == 206
    assert got.header("content-range") == f"bytes {first}-{last}/{blob.size}"
    assert got.header("content-length") == str(last - first + 1)
    assert got.body == blob.read_range(first, last)


def test_ranges_cold_and_warm(start_mirror: MirrorStarter, model_factory: ModelFactory) -> None:
    mirror = start_mirror()
    models = [model_factory("library/ranges", f"r{i}", 2 * MiB, 10 + i) for i in range(3)]
    cases = _range_cases(models[0].model_layer.size)

    # Cold: each form is the very first request ever made for its blob.
    for model, (header, first, last) in zip(models, cases, strict=True):
        blob = model.model_layer
        assert blob.size == models[0].model_layer.size
        got = fetch_blob(mirror, model, blob, header)
        _check_range(got, blob, first, last)
        assert got.header("x-mirror-cache") == "fill"

    # Warm: the same forms, from the cache.
    for model in models:
        wait_cached(mirror, model.model_layer)
    for model in models:
        for header, first, last in cases:
            got = fetch_blob(mirror, model, model.model_layer, header)
            _check_range(got, model.model_layer, first, last)
            assert got.header("x-mirror-cache") == "hit"

    blob, model = models[0].model_layer, models[0]
    past_end = fetch_blob(mirror, model, blob, f"bytes={blob.size}-")
    assert past_end.status == 416
    assert past_end.header("content-range") == f"bytes */{blob.size}"
    assert registry_error_code(Response(416, past_end.headers, past_end.body)) == "RANGE_INVALID"

    for malformed in ("bytes=abc", "bytes=-", "bytes=10-5", "bytes=1-2-3", "bytes=x-5"):
        got = fetch_blob(mirror, model, blob, malformed)
        assert got.status == 400, malformed
        assert registry_error_code(Response(400, got.headers, got.body)) == "RANGE_INVALID"


# --- 4. the oras SDK ------------------------------------------------------------------------------


def test_oras_pulls_through_the_mirror(
    start_mirror: MirrorStarter, medium_model: PushedModel, tmp_path: Path
) -> None:
    import oras.client  # type: ignore[import-untyped]

    mirror = start_mirror()
    client = oras.client.OrasClient(hostname=mirror.host, insecure=True)
    outdir = tmp_path / "oras"
    files = client.pull(target=f"{mirror.host}/{medium_model.repo}:{medium_model.tag}", outdir=str(outdir))

    # Layers without a title annotation are written under their digest.
    assert len(files) == len(medium_model.layers)
    written = {Path(f).name: Path(f) for f in files}
    for layer in medium_model.layers:
        path = written[layer.digest]
        assert path.stat().st_size == layer.size
        assert sha256_file(path) == layer.hex
    manifest = client.get_manifest(f"{mirror.host}/{medium_model.repo}:{medium_model.tag}")
    assert manifest == json.loads(medium_model.manifest)


# --- 5. concurrent cold clients share one download ------------------------------------------------


def test_concurrent_cold_clients_share_one_fill(
    start_mirror: MirrorStarter, proxy: FaultProxy, big_model: PushedModel
) -> None:
    clients = 8
    mirror = start_mirror()
    blob = big_model.model_layer
    proxy.throttle(2 * MiB, path="/blobs/")  # ~1 s fill, so that every client arrives while it is cold
    barrier = threading.Barrier(clients)
    results: list[Fetched | None] = [None] * clients

    def client(i: int) -> None:
        barrier.wait(timeout=10)
        results[i] = fetch_blob(mirror, big_model, blob)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    for got in results:
        assert got is not None
        assert_blob_served(got, blob)
    fills = sum(1 for got in results if got is not None and got.header("x-mirror-cache") == "fill")
    assert fills >= 2, "the clients did not overlap with the download"
    wait_cached(mirror, blob)
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size


def test_blob_vanishing_under_requests_never_breaks_a_response(
    start_mirror: MirrorStarter, registry: RegistryProcess, tmp_path: Path
) -> None:
    """Clients requesting a small blob over and over while it is downloaded, published, evicted (by hand
    here, as eviction or ``ollama rm`` on the shared models directory would) and downloaded again get either
    the right bytes or a clean registry error: never wrong bytes, never a response that does not match its
    framing (a client waiting for bytes that never come).

    Evicting right after each publish widens a window that exists without eviction too: a request that
    found the running Fill opens its partial file after the publish thread renamed it. The Go puller hits
    that under load (its part requests follow the discovery GET at once) and fails the pull on the error
    body it writes into the blob.
    """
    data = random.Random(7).randbytes(3000)
    blob = write_blob(tmp_path / "race", "application/octet-stream", data)
    push_blob(registry.url, "library/race", blob, registry.auth_headers())
    mirror = start_mirror()
    path = f"/v2/library/race/blobs/{blob.digest}"
    cached = cached_blob(mirror, blob)
    stop = threading.Event()
    broken: list[str] = []
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=2)
        try:
            while not stop.is_set():
                conn.request("GET", path, headers={"Range": f"bytes=0-{blob.size - 1}"})
                response = conn.getresponse()
                body = response.read()
                with lock:
                    answers[response.status] = answers.get(response.status, 0) + 1
                if response.status == 206 and body == data:
                    continue
                if response.status >= 400:
                    headers = {k.lower(): v for k, v in response.getheaders()}
                    registry_error_code(Response(response.status, headers, body))
                    continue
                broken.append(f"{response.status} {body[:80]!r}")
                return
        except (OSError, http.client.HTTPException, AssertionError, ValueError) as exc:
            broken.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            stop.set()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    fills = 0
    deadline = time.monotonic() + 5.0
    while fills < 40 and time.monotonic() < deadline and not stop.is_set():
        if cached.exists():
            cached.unlink()  # evicted: the next request downloads it again
            fills += 1
        time.sleep(0.002)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not broken, f"after {fills} downloads, answers {answers}: {broken}"
    assert fills >= 10, f"only {fills} downloads: the test proves nothing"
    assert answers.get(206, 0) > fills


# --- 6. a slow client does not slow a fast one ----------------------------------------------------


def test_slow_client_does_not_slow_a_fast_one(start_mirror: MirrorStarter, big_model: PushedModel) -> None:
    mirror = start_mirror()
    blob = big_model.model_layer
    rate = 1_000_000  # bytes per second
    slow_would_need = blob.size / rate
    slow = RawClient(mirror, f"/v2/{big_model.repo}/blobs/{blob.digest}", rcvbuf=32 * KiB)
    stop = threading.Event()

    def read_slowly() -> None:
        deadline = time.monotonic() + 20.0
        with contextlib.suppress(OSError):
            while not stop.is_set() and time.monotonic() < deadline:
                if slow.recv(16 * KiB) == 0:
                    return
                stop.wait(16 * KiB / rate)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        wait_until(lambda: slow.body_bytes() > 0, 10.0, "the slow client's first bytes")
        assert slow.status_line().startswith("HTTP/1.1 200")
        fast = fetch_blob(mirror, big_model, blob)
        slow_progress = slow.body_bytes()
    finally:
        stop.set()
        reader.join(timeout=10)
        slow.close()
    assert_blob_served(fast, blob)
    assert fast.elapsed < 0.25 * slow_would_need, (fast.elapsed, slow_would_need)
    assert slow_progress < 0.6 * blob.size, "the slow client was not slow: the test proves nothing"
    wait_cached(mirror, blob)


# --- 7. the download outlives the client that started it -----------------------------------------


def test_client_hangup_does_not_stop_the_fill(
    start_mirror: MirrorStarter, proxy: FaultProxy, big_model: PushedModel
) -> None:
    mirror = start_mirror()
    blob = big_model.model_layer
    proxy.throttle(2 * MiB, path="/blobs/")  # ~1 s with 4 connections
    client = RawClient(mirror, f"/v2/{big_model.repo}/blobs/{blob.digest}")
    try:
        deadline = time.monotonic() + 10.0
        while client.body_bytes() < 4 * KiB and time.monotonic() < deadline:
            assert client.recv(4 * KiB) > 0
        assert client.status_line().startswith("HTTP/1.1 200")
    finally:
        client.close()
    assert not cached_blob(mirror, blob).exists(), "too fast: the fill was over before the hang-up"
    wait_cached(mirror, blob)
    assert not any(p.exists() for p in partial_files(mirror, blob))
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size


# --- 8. errors are registry JSON, never 500 -------------------------------------------------------


def test_unknown_and_invalid_names_and_digests(start_mirror: MirrorStarter, small_model: PushedModel) -> None:
    mirror = start_mirror()
    base = f"{mirror.url}/v2"

    unknown_model = http_request("GET", f"{base}/library/no-such-model/manifests/latest")
    assert unknown_model.status == 404
    assert registry_error_code(unknown_model) == "MANIFEST_UNKNOWN"
    unknown_tag = http_request("GET", f"{base}/{small_model.repo}/manifests/no-such-tag")
    assert unknown_tag.status == 404
    assert registry_error_code(unknown_tag) == "MANIFEST_UNKNOWN"
    unknown_by_digest = http_request("GET", f"{base}/{small_model.repo}/manifests/sha256:{'1' * 64}")
    assert unknown_by_digest.status == 404
    assert registry_error_code(unknown_by_digest) == "MANIFEST_UNKNOWN"

    missing = f"sha256:{'0' * 64}"
    unknown_blob = http_request("GET", f"{base}/{small_model.repo}/blobs/{missing}")
    assert unknown_blob.status == 404
    assert registry_error_code(unknown_blob) == "BLOB_UNKNOWN"
    assert http_request("HEAD", f"{base}/{small_model.repo}/blobs/{missing}").status == 404
    assert not list((mirror.cache_dir / "blobs").iterdir())

    bad_requests = {
        f"{base}/{small_model.repo}/blobs/sha256:xyz": "DIGEST_INVALID",
        f"{base}/{small_model.repo}/blobs/sha256:{'A' * 64}": "DIGEST_INVALID",
        f"{base}/{small_model.repo}/blobs/md5:{'0' * 32}": "DIGEST_INVALID",
        f"{base}/{small_model.repo}/blobs/sha256:{'0' * 63}": "DIGEST_INVALID",
        f"{base}/library/-bad/manifests/latest": "NAME_INVALID",
        f"{base}/library/-bad/blobs/{missing}": "NAME_INVALID",
        f"{base}/bad.namespace/tiny/manifests/latest": "NAME_INVALID",
        f"{base}/{small_model.repo}/manifests/-tag": "TAG_INVALID",
        f"{base}/{small_model.repo}/manifests/sha256:xyz": "TAG_INVALID",
    }
    for url, code in bad_requests.items():
        response = http_request("GET", url)
        assert response.status == 400, (url, response.status, response.body)
        assert registry_error_code(response) == code, url

    # Odd paths: whatever the answer, a 4xx with a registry error body, never a 500 or a traceback.
    for path in (
        "/library/..%2f..%2fetc/manifests/latest",
        "/library/%2e%2e/manifests/latest",
        "/library/tiny/blobs/..%2f..%2fsha256:" + "0" * 64,
        "/library/tiny/manifests/" + "a" * 300,
        "/a/b/c/manifests/latest",
    ):
        response = http_request("GET", base + path)
        assert 400 <= response.status < 500, (path, response.status, response.body)
        registry_error_code(response)
    assert "Traceback" not in mirror.log_text()


# --- 9. offline: what is cached is still served ---------------------------------------------------


def test_offline_cached_model_still_served(
    start_mirror: MirrorStarter,
    proxy: FaultProxy,
    medium_model: PushedModel,
    small_model: PushedModel,
) -> None:
    timeout = 2.0
    mirror = start_mirror(upstream={"timeout": timeout}, cache={"manifest_ttl": 0})
    pull_into_cache(mirror, medium_model)
    proxy.down()

    for method in ("GET", "HEAD"):
        response = get_manifest(mirror, medium_model, method=method)
        assert response.status == 200
        assert response.header("x-mirror-cache") == "stale"
        assert response.header("docker-content-digest") == medium_model.digest
    assert get_manifest(mirror, medium_model).body == medium_model.manifest
    for blob in medium_model.blobs:
        got = fetch_blob(mirror, medium_model, blob)
        assert_blob_served(got, blob)
        assert got.header("x-mirror-cache") == "hit"
        ranged = fetch_blob(mirror, medium_model, blob, "bytes=1-10")
        assert ranged.status == 206
        assert ranged.body == blob.read_range(1, 10)

    # A model that was never cached: a prompt 502/503 registry error, never a hang.
    for url in (
        manifest_url(mirror, small_model),
        blob_url(mirror, small_model, small_model.model_layer),
    ):
        started = time.monotonic()
        response = http_request("GET", url, timeout=timeout + 10)
        assert response.status in (502, 503), (url, response.status)
        assert time.monotonic() - started < timeout + 2
        registry_error_code(response)


def test_hanging_upstream_times_out(
    start_mirror: MirrorStarter,
    mirror_factory: MirrorFactory,
    medium_model: PushedModel,
    small_model: PushedModel,
) -> None:
    """An upstream that accepts connections and never answers costs one ``upstream.timeout``, not a hang."""
    warm = start_mirror()
    pull_into_cache(warm, medium_model)
    warm.stop()

    timeout = 1.5
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)  # never accepted: connections complete in the kernel, no answer ever comes
        mirror = mirror_factory(
            cache_dir=warm.cache_dir,
            upstream_url=f"http://127.0.0.1:{blackhole.getsockname()[1]}",
            config={"upstream": {**UPSTREAM_SETTINGS, "timeout": timeout}, "cache": {"manifest_ttl": 0}},
        )
        started = time.monotonic()
        response = get_manifest(mirror, medium_model)
        assert response.status == 200
        assert response.header("x-mirror-cache") == "stale"
        assert response.body == medium_model.manifest
        assert time.monotonic() - started < timeout + 3
        assert_blob_served(
            fetch_blob(mirror, medium_model, medium_model.model_layer), medium_model.model_layer
        )

        # nothing cached: the retry budget is spent first (each try bounded by the timeout), then 502
        tries = UPSTREAM_SETTINGS["retry_attempts"] + 1
        backoff = sum(UPSTREAM_SETTINGS["retry_delay"] * 2**n for n in range(tries - 1))
        for url in (
            manifest_url(mirror, small_model),
            blob_url(mirror, small_model, small_model.model_layer),
        ):
            started = time.monotonic()
            response = http_request("GET", url, timeout=tries * timeout + 10)
            assert response.status in (502, 503), (url, response.status)
            assert time.monotonic() - started < tries * timeout + backoff + 3
            registry_error_code(response)
            message = response.body.decode()
            assert (
                f"did not answer within {timeout:g} s (upstream.timeout) (after {tries} attempts)" in message
            )


# --- 10. blob redirects to another host -----------------------------------------------------------


def test_upstream_blob_redirects_are_followed(
    start_mirror: MirrorStarter,
    proxy: FaultProxy,
    medium_model: PushedModel,
    big_model: PushedModel,
    tmp_path: Path,
) -> None:
    mirror = start_mirror()
    proxy.redirect_blobs("localhost")  # like registry.ollama.ai's 307s to presigned storage URLs
    result = go_pull(mirror, medium_model, tmp_path / "pulled")
    for digest, _size, path in result.blobs:
        assert "sha256:" + sha256_file(path) == digest
    assert {r.status for r in result.requests} <= {200, 206}
    assert all(urlsplit(r.url).hostname == "127.0.0.1" for r in result.requests)
    redirects = [r for r in proxy.records("/blobs/") if r.status == 307]
    signed = [r for r in proxy.records("sig=") if r.status in (200, 206)]
    assert redirects and signed
    assert all(r.host is not None and r.host.startswith("localhost:") for r in signed)

    # Signed URLs expire quickly now; a slow download outlives them and must resolve again.
    proxy.expire_redirects_after(0.3)
    proxy.throttle(2 * MiB, path="sig=")
    blob = big_model.model_layer
    got = fetch_blob(mirror, big_model, blob)
    assert_blob_served(got, blob)
    wait_cached(mirror, blob)
    expired = [r for r in proxy.records(blob.hex) if "expired" in r.faults]
    assert expired, "no signed URL expired during the download: the test proves nothing"
    served = sum(r.bytes_sent for r in proxy.records(blob.hex) if r.status in (200, 206))
    assert served <= 1.05 * blob.size


# --- 11. an upstream that ignores Range ------------------------------------------------------------


def test_upstream_ignoring_range(
    start_mirror: MirrorStarter, proxy: FaultProxy, medium_model: PushedModel
) -> None:
    mirror = start_mirror()
    proxy.ignore_range(True, path="/blobs/")
    blob = medium_model.model_layer
    first, last = 3 * CHUNK + 17, 5 * CHUNK + 1000

    got = fetch_blob(mirror, medium_model, blob, f"bytes={first}-{last}")  # cold, in the middle
    _check_range(got, blob, first, last)
    assert_blob_served(fetch_blob(mirror, medium_model, blob), blob)
    wait_cached(mirror, blob)
    gets = [r for r in proxy.records(blob.hex) if r.method == "GET"]
    assert gets and all(r.status == 200 and "ignore_range" in r.faults for r in gets)
    assert blob_records_bytes(proxy, blob) <= 1.05 * blob.size

    warm = fetch_blob(mirror, medium_model, blob, f"bytes={first}-{last}")
    _check_range(warm, blob, first, last)
    assert warm.header("x-mirror-cache") == "hit"
