"""The /v2 routes through StubTreq, with a fake registry (also through StubTreq) as the upstream."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from ollama_mirror.events import Events

from .fakeregistry import FakeRegistry
from .harness import Harness


def test_manifest_is_served_verbatim_and_stored_in_the_ollama_layout_once_its_blobs_are(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 200
    assert body == registry.manifests[("library/tiny", "latest")]
    assert response.headers.getRawHeaders("docker-content-digest") == [
        "sha256:" + hashlib.sha256(body).hexdigest()
    ]
    tag = ("registry.ollama.ai", "library", "tiny", "latest")
    stored = tmp_path.joinpath("cache", "manifests", *tag)
    staged = tmp_path.joinpath("cache", ".mirror", "staged", *tag)
    assert not stored.exists() and staged.read_bytes() == body  # Ollama must not see it yet
    digests = registry.digests()
    for digest in digests:
        assert h.request("GET", f"/v2/library/tiny/blobs/{digest}")[0].code == 200
        assert stored.exists() == (digest == digests[-1])  # published with its last blob, not before
    assert stored.read_bytes() == body and not staged.exists()


def test_a_cached_tag_is_revalidated_only_after_the_ttl(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"cache.manifest_ttl": "60"})
    h.request("GET", "/v2/library/tiny/manifests/latest")
    h.request("GET", "/v2/library/tiny/manifests/latest")
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 1
    h.clock.advance(61)
    response, _ = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 2
    assert response.headers.getRawHeaders("x-mirror-cache") == ["cache"]  # unchanged upstream


def test_a_changed_tag_is_served_at_once_and_replaces_the_cached_model_once_its_blobs_are_in(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"cache.manifest_ttl": "0"})
    _, old = h.request("GET", "/v2/library/tiny/manifests/latest")
    for digest in registry.digests():
        h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    stored = tmp_path / "cache" / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    assert stored.read_bytes() == old
    new = registry.add_model("library/tiny", "latest", [b"new weights"])
    _, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert body == new  # registry clients get what the upstream says now...
    assert stored.read_bytes() == old  # ...while Ollama keeps the model it can run
    for digest in registry.digests():
        h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert stored.read_bytes() == new


def test_the_cached_manifest_is_served_when_upstream_fails(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"cache.manifest_ttl": "0"})
    _, first = h.request("GET", "/v2/library/tiny/manifests/latest")
    registry.fail_with = 503
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 200 and body == first
    assert response.headers.getRawHeaders("x-mirror-cache") == ["stale"]


def test_an_uncached_manifest_when_upstream_fails_is_a_502_naming_it(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.fail_with = 503
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 502
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "503" in error["message"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/library/nope/manifests/latest", 404, "MANIFEST_UNKNOWN"),
        ("/v2/library/tiny/manifests/bad:tag", 400, "TAG_INVALID"),
        ("/v2/library/-bad/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/lib.rary/tiny/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/tiny/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("/v2/library/tiny/blobs/md5:abc", 400, "DIGEST_INVALID"),
        ("/v2/library/tiny/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/library/tiny/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/a/b/c/manifests/latest", 404, "NAME_UNKNOWN"),
        ("/v2/library/..%2f..%2fetc/manifests/passwd", 400, "NAME_INVALID"),  # an encoded slash
    ],
)
def test_bad_and_unknown_requests_get_registry_errors(
    tmp_path: Path, registry: FakeRegistry, path: str, status: int, code: str
) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", path)
    assert response.code == status
    assert json.loads(body)["errors"][0]["code"] == code


def test_a_cold_blob_is_streamed_with_a_location_and_cached(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    h.request("GET", "/v2/library/tiny/manifests/latest")
    digest = registry.digests()[1]
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert response.code == 200
    assert body == registry.blobs[digest]
    assert response.headers.getRawHeaders("location") == [f"/v2/library/tiny/blobs/{digest}"]
    assert (tmp_path / "cache" / "blobs" / ("sha256-" + digest[7:])).read_bytes() == body
    upstream_requests = len(registry.seen)
    response, again = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert again == body and len(registry.seen) == upstream_requests  # served from disk
    assert response.headers.getRawHeaders("x-mirror-cache") == ["hit"]


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=100-199", 100, 199),
        ("bytes=150000-", 150000, 199999),
        ("bytes=-10", 199990, 199999),
        ("bytes=199999-300000", 199999, 199999),
        ("Bytes=0-3", 0, 3),  # the unit is case-insensitive (RFC 9110)
    ],
)
def test_ranges_cold_and_warm(
    tmp_path: Path, registry: FakeRegistry, header: str, first: int, last: int
) -> None:
    h = Harness(tmp_path, registry)
    digest = registry.digests()[1]
    data = registry.blobs[digest]
    for _ in ("cold", "warm"):
        response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers={"Range": header})
        assert response.code == 206
        assert body == data[first : last + 1]
        assert response.headers.getRawHeaders("content-range") == [f"bytes {first}-{last}/{len(data)}"]


def test_unsatisfiable_and_malformed_ranges(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    digest = registry.digests()[1]
    response, _ = h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers={"Range": "bytes=200000-"})
    assert response.code == 416
    assert response.headers.getRawHeaders("content-range") == ["bytes */200000"]
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers={"Range": "bytes=9-3"})
    assert response.code == 400 and json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers={"Range": "lines=1-2"})
    assert response.code == 200 and len(body) == 200_000  # an unknown unit is ignored (RFC 9110 14.2)


def test_head_gives_the_exact_size_cached_or_not(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    digest = registry.digests()[1]
    response, body = h.request("HEAD", f"/v2/library/tiny/blobs/{digest}")  # never seen, not in any manifest
    assert response.code == 200 and body == b""
    assert response.headers.getRawHeaders("content-length") == ["200000"]
    assert response.headers.getRawHeaders("docker-content-digest") == [digest]
    assert not list((tmp_path / "cache" / "blobs").iterdir())  # a HEAD downloads nothing


def test_blobs_behind_a_redirect_are_fetched_without_our_credentials(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.auth = "basic"
    registry.redirect_to = "http://storage.example"
    h = Harness(tmp_path, registry, **{"upstream.username": "user", "upstream.password": "secret"})
    digest = registry.digests()[1]
    _, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert body == registry.blobs[digest]
    storage = [s for s in registry.seen if s.host == "storage.example"]
    assert storage and all(s.authorization is None for s in storage)
    assert all(s.range for s in storage)
    registry_gets = [s for s in registry.seen if s.host == "registry.example" and s.method == "GET"]
    # the presigned URL is remembered: after the first chunk, chunks go straight to storage
    assert len(registry_gets) <= 3  # the 401, the authorised retry, and at most one more


def test_bearer_token_flow(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.auth = "bearer"
    h = Harness(tmp_path, registry, **{"upstream.username": "user", "upstream.password": "secret"})
    response, _ = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 200
    token_requests = [s for s in registry.seen if s.host == "auth.example"]
    assert len(token_requests) == 1
    assert "scope=repository%3Alibrary%2Ftiny%3Apull" in token_requests[0].path
    assert "service=registry.example" in token_requests[0].path
    digest = registry.digests()[1]
    _, data = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert data == registry.blobs[digest]
    assert registry.tokens_issued == 1  # the token is reused


def test_wrong_credentials_are_a_clear_upstream_error(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.auth = "basic"
    h = Harness(tmp_path, registry, **{"upstream.username": "user", "upstream.password": "wrong"})
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 502
    assert "refused our credentials" in json.loads(body)["errors"][0]["message"]


def test_an_upstream_ignoring_range_still_gives_clients_their_range(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.ignore_range = True
    h = Harness(tmp_path, registry)
    digest = registry.digests()[1]
    response, body = h.request(
        "GET", f"/v2/library/tiny/blobs/{digest}", headers={"Range": "bytes=1000-1999"}
    )
    assert response.code == 206 and body == registry.blobs[digest][1000:2000]


def test_version_check(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", "/v2/")
    assert response.code == 200 and json.loads(body) == {}
    assert response.headers.getRawHeaders("docker-distribution-api-version") == ["registry/2.0"]


def test_a_blob_whose_download_fails_at_once_is_a_502_not_a_broken_stream(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    h.request("GET", "/v2/library/tiny/manifests/latest")  # the mirror now knows the blob sizes
    registry.fail_with = 503
    digest = registry.digests()[1]
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert response.code == 502
    assert "503" in json.loads(body)["errors"][0]["message"]
    blob_gets = [s for s in registry.seen if "/blobs/" in s.path]
    assert len(blob_gets) == 1 + h.config.upstream.retry_attempts
    assert not list((tmp_path / "cache" / "blobs").iterdir())
    registry.fail_with = 0  # upstream back: the next request starts a new download
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert response.code == 200 and body == registry.blobs[digest]


class Recorder(Events):
    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def fill_started(self, fill: Any) -> None:
        self.seen.append(("fill_started", fill.digest))

    def fill_ended(self, fill: Any, error: str | None) -> None:
        self.seen.append(("fill_ended", fill.digest, error))

    def upstream_bytes(self, count: int) -> None:
        self.seen.append(("upstream_bytes", count))

    def blob_served(self, source: str, count: int, complete: bool) -> None:
        self.seen.append(("blob_served", source, count, complete))

    def manifest_served(self, source: str) -> None:
        self.seen.append(("manifest_served", source))


class Broken(Events):
    def upstream_bytes(self, count: int) -> None:
        raise RuntimeError("listener bug")


def test_listeners_hear_what_happens_and_a_broken_one_changes_nothing(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    recorder = Recorder()
    h.mirror.events.listen(Broken())
    h.mirror.events.listen(recorder)
    h.request("GET", "/v2/library/tiny/manifests/latest")
    digest = registry.digests()[1]
    _, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert body == registry.blobs[digest]
    h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    names = [event[0] for event in recorder.seen]
    assert names[0] == "manifest_served" and names[1] == "fill_started"
    assert sum(e[1] for e in recorder.seen if e[0] == "upstream_bytes") == len(body)
    assert ("fill_ended", digest, None) in recorder.seen
    served = [e for e in recorder.seen if e[0] == "blob_served"]
    assert served == [("blob_served", "fill", len(body), True), ("blob_served", "cache", len(body), True)]


def test_concurrent_requests_for_a_tag_share_one_upstream_request(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    from ollama_mirror.names import ModelName

    h = Harness(tmp_path, registry, **{"cache.manifest_ttl": "0"})
    registry.hold_manifests = True
    name = ModelName.parse("tiny")
    impatient = Deferred.fromCoroutine(h.mirror.manifests.by_tag(name))  # hangs up before the answer
    others = [Deferred.fromCoroutine(h.mirror.manifests.by_tag(name)) for _ in range(4)]
    impatient.cancel()
    impatient.addErrback(lambda _: None)
    assert len(registry.held) == 1  # one upstream request for the five asks
    registry.release()
    found = h.settle(gatherResults(others))
    assert {m.data for m in found} == {registry.manifests[("library/tiny", "latest")]}
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 1
    registry.hold_manifests = False
    h.settle(Deferred.fromCoroutine(h.mirror.manifests.by_tag(name)))  # done: the next ask goes upstream
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 2


def headers(response: Any) -> list[tuple[bytes, list[bytes]]]:
    return sorted((k, v) for k, v in response.headers.getAllRawHeaders() if k.lower() != b"date")


def test_a_fresh_cached_tag_gets_the_routes_answer_and_follows_its_file(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    """A fresh tag is answered without the routers (registry.FreshManifests): the same status, headers
    and body as the route's cache answer; a manifest rewritten or removed on disk (by another worker,
    or the sweeper) is never served from memory."""
    path = "/v2/library/tiny/manifests/latest"
    routed = Harness(tmp_path / "routed", registry, **{"cache.manifest_ttl": "0"})  # always the route
    routed.request("GET", path)
    routes = {method: routed.request(method, path) for method in ("GET", "HEAD")}
    route_body = routes["GET"][1]
    h = Harness(tmp_path / "fast", registry, **{"cache.manifest_ttl": "60"})
    h.request("GET", path)
    served: list[str] = []

    class Served(Events):
        def manifest_served(self, source: str) -> None:
            served.append(source)

    h.mirror.events.listen(Served())
    for method in ("GET", "HEAD"):
        answer, body = h.request(method, path, headers={"User-Agent": "ollama/0.9.0"})
        assert answer.code == 200
        assert body == (route_body if method == "GET" else b"")
        assert headers(answer) == headers(routes[method][0])
    assert served == ["cache", "cache"]
    assert h.mirror.upstream.user_agent.startswith("ollama-mirror/")  # a client's agent is never shared
    assert (
        len([s for s in registry.seen if "/manifests/" in s.path]) == 4
    )  # 3 routed (ttl 0), 1 to fill the fast one
    stored = tmp_path.joinpath("fast", "cache", ".mirror", "staged", "registry.ollama.ai", "library", "tiny")
    stored = stored / "latest"  # (its blobs were never fetched: the tag waits among the staged)
    other = json.dumps({"schemaVersion": 2, "mediaType": "application/x-test", "layers": []}).encode()
    (stored.parent / "new").write_bytes(other)
    (stored.parent / "new").replace(stored)  # as another worker's atomic write
    answer, body = h.request("GET", path)
    assert body == other
    assert answer.headers.getRawHeaders("content-type") == ["application/x-test"]
    assert answer.headers.getRawHeaders("docker-content-digest") == [
        "sha256:" + hashlib.sha256(other).hexdigest()
    ]
    stored.unlink()
    answer, body = h.request("GET", path)
    assert body == route_body and answer.headers.getRawHeaders("x-mirror-cache") == ["upstream"]
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 5


def test_each_client_s_user_agent_goes_upstream_with_its_own_requests(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    """registry.ollama.ai judges the Ollama version asking: the mirror forwards each client's agent with
    what it fetches for that client, and never changes the agent the upstream shares."""
    registry.add_model("library/other", "latest", [b"other weights", b"tmpl"])
    h = Harness(tmp_path, registry)
    shared = h.mirror.upstream.user_agent
    old, new = "ollama/0.5.0 (amd64 linux) Go/go1.22", "ollama/0.32.15 (amd64 linux) Go/go1.26.8"
    h.request("GET", "/v2/library/tiny/manifests/latest", headers={"User-Agent": [old]})
    h.request("GET", "/v2/library/other/manifests/latest", headers={"User-Agent": [new]})
    digest = registry.digests("library/other")[1]
    h.request("GET", f"/v2/library/other/blobs/{digest}", headers={"User-Agent": [new]})
    h.request("POST", "/api/pull", step=0.05, data=b'{"model": "tiny", "stream": false}')
    assert h.mirror.upstream.user_agent == shared  # nothing mutated under load
    assert {old, new} <= {r.user_agent for r in registry.seen if "/manifests/" in r.path}
    blob_requests = [r for r in registry.seen if r.path.endswith(digest)]
    assert blob_requests and all(r.user_agent == new for r in blob_requests)
    assert any(r.user_agent == shared for r in registry.seen if "/blobs/" in r.path and "tiny" in r.path)
