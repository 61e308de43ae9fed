"""security.* on the real daemon, with the clients users have: the official Python client (API keys,
model rules, rate limits), plain HTTP, and the Go-style puller signing with an Ollama key."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ollama
import pytest

from ollama_mirror.config import SecurityConfig
from tests.integration.helpers import go_pull
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.models import MiB, ModelFactory, PushedModel, http_request
from tests.support.ollamakey import OllamaKey
from tests.support.puller import PullError, pull
from tests.support.registry import free_port

KEY = "s3cret-key"
CLIENT_TIMEOUT = 30.0


def http(
    mirror: MirrorDaemon,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(mirror.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, dict(e.headers), e.read()
    document = json.loads(raw) if raw and "json" in head.get("Content-Type", "") else raw
    return status, {k.lower(): v for k, v in head.items()}, document


def client(mirror: MirrorDaemon, monkeypatch: pytest.MonkeyPatch, api_key: str | None) -> ollama.Client:
    """The official client as a user configures it: ``OLLAMA_API_KEY`` in the environment."""
    if api_key is None:
        monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_API_KEY", api_key)
    return ollama.Client(host=mirror.url, timeout=CLIENT_TIMEOUT)


def test_api_keys_with_the_official_client(
    mirror_factory: MirrorFactory, small_model: PushedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mirror = mirror_factory(config={"security": {"api_key": KEY, "api_keys": ["team-b-key"]}})
    for key in (None, "wrong"):
        with pytest.raises(ollama.ResponseError) as caught:
            client(mirror, monkeypatch, key).list()
        assert caught.value.status_code == 401 and "unauthorized" in caught.value.error
    assert client(mirror, monkeypatch, KEY).pull("tiny").status == "success"
    assert [m.model for m in client(mirror, monkeypatch, "team-b-key").list().models] == ["tiny:latest"]
    # plain HTTP: health stays open for load balancers, the rest needs the key
    assert http(mirror, "/mirror/health")[0] == 200
    status, _, document = http(mirror, "/mirror/stats")
    assert status == 401 and document == {
        "error": "unauthorized: this mirror needs an API key (Authorization: Bearer <key>)"
    }
    assert http(mirror, "/mirror/stats", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert http(mirror, "/metrics")[0] == 200
    # the registry has its own rules (open by default): an Ollama server still pulls through /v2
    assert go_pull(mirror, small_model, tmp_path / "puller").manifest_bytes == small_model.manifest


def test_protected_metrics(mirror_factory: MirrorFactory) -> None:
    mirror = mirror_factory(config={"security": {"api_key": KEY, "protect_metrics": True}})
    assert http(mirror, "/metrics")[0] == 401
    assert http(mirror, "/metrics", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    port = free_port()  # on a listener of their own, every path of which serves the metrics
    mirror = mirror_factory(
        config={
            "security": {"api_key": KEY, "protect_metrics": True},
            "server": {"metrics_listen": [f"tcp:{port}:interface=127.0.0.1"]},
        }
    )
    for path in ("/metrics", "/anything"):
        assert http_request("GET", f"http://127.0.0.1:{port}{path}").status == 401
    assert (
        http_request(
            "GET", f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"}
        ).status
        == 200
    )


def test_model_rules_with_the_official_client_and_the_registry(
    mirror_factory: MirrorFactory,
    small_model: PushedModel,
    model_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    other = model_factory("library/forbidden", "latest")
    mirror = mirror_factory(config={"security": {"blocked_models": ["forbidden"]}})
    ollama_client = client(mirror, monkeypatch, None)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.pull("forbidden")
    assert caught.value.status_code == 403
    assert "rule 'forbidden' in security.blocked_models" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.show("forbidden:latest")
    assert caught.value.status_code == 403
    assert ollama_client.pull("tiny").status == "success"
    with pytest.raises(PullError, match="403"):
        go_pull(mirror, other, tmp_path / "puller")
    status, _, document = http(mirror, f"/v2/{other.repo}/blobs/{other.blobs[0].digest}", method="GET")
    assert status == 403 and document["errors"][0]["code"] == "DENIED"
    assert not (mirror.cache_dir / "manifests" / "registry.ollama.ai" / "library" / "forbidden").exists()


def test_allowed_models_only(
    mirror_factory: MirrorFactory, small_model: PushedModel, model_factory: Any, tmp_path: Path
) -> None:
    other = model_factory("library/forbidden", "latest")
    mirror = mirror_factory(config={"security": {"allowed_models": ["tiny:latest"]}})
    assert go_pull(mirror, small_model, tmp_path / "a").manifest_bytes == small_model.manifest
    with pytest.raises(PullError, match="allowed_models"):
        go_pull(mirror, other, tmp_path / "b")


def authorized(tmp_path: Path, *keys: OllamaKey) -> Path:
    path = tmp_path / "authorized_keys"
    path.write_text("# Ollama servers allowed to pull\n" + "".join(k.public_line() + "\n" for k in keys))
    return path


def test_registry_keys_flow_as_the_go_server_does_it(
    mirror_factory: MirrorFactory, small_model: PushedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu1, stranger = OllamaKey("root@gpu1"), OllamaKey("root@elsewhere")
    keyfile = authorized(tmp_path, gpu1)
    mirror = mirror_factory(
        config={"security": {"registry_access": "keys", "registry_authorized_keys": str(keyfile)}}
    )
    with pytest.raises(PullError, match="unauthorized"):
        go_pull(mirror, small_model, tmp_path / "anonymous")
    with pytest.raises(PullError, match="token request answered 401"):
        pull(mirror.url, small_model.repo, small_model.tag, tmp_path / "stranger", key=stranger)
    result = pull(
        mirror.url, small_model.repo, small_model.tag, tmp_path / "gpu1", key=gpu1, part_size_min=1024
    )
    assert result.manifest_bytes == small_model.manifest
    statuses = [(r.method, r.status, "/v2/token" in r.url) for r in result.requests]
    assert statuses[:3] == [
        ("GET", 401, False),
        ("GET", 200, True),
        ("GET", 200, False),
    ]  # one token for the pull
    assert sum(token for _, _, token in statuses) == 1
    ranged = [r for r in result.requests if r.range is not None]
    assert ranged and all(r.status == 206 and "signature=" in r.url for r in ranged)  # no credentials sent
    for blob in small_model.blobs:
        assert (tmp_path / "gpu1" / "blobs" / blob.cache_name).stat().st_size == blob.size
    # a key added to the file works at once, without a restart
    keyfile.write_text(keyfile.read_text() + stranger.public_line() + "\n")
    pull(mirror.url, small_model.repo, small_model.tag, tmp_path / "stranger2", key=stranger)
    # the Ollama API is not the registry: with no API key set it stays open
    assert client(mirror, monkeypatch, None).list().models is not None
    assert "registry token issued to root@gpu1" in mirror.log_text()


def test_registry_networks(mirror_factory: MirrorFactory, small_model: PushedModel, tmp_path: Path) -> None:
    closed = mirror_factory(
        config={"security": {"registry_access": "networks", "registry_networks": ["10.0.0.0/8"]}}
    )
    with pytest.raises(PullError, match="403"):
        go_pull(closed, small_model, tmp_path / "a")
    open_to_us = mirror_factory(
        config={"security": {"registry_access": "networks", "registry_networks": ["127.0.0.0/8", "::1"]}}
    )
    assert go_pull(open_to_us, small_model, tmp_path / "b").manifest_bytes == small_model.manifest


def _unknown_manifest(mirror: MirrorDaemon, i: int, headers: dict[str, str] | None = None) -> int:
    """Ask for a model nobody has: every such request sends the mirror upstream, so each one counts."""
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json", **(headers or {})}
    return http(mirror, f"/v2/library/nothing-{i}/manifests/latest", headers=accept)[0]


def test_rate_limit_and_trusted_proxies(
    mirror_factory: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = mirror_factory(
        config={
            "security": {"rate_limit_requests": 5, "rate_limit_window": 60, "trusted_proxies": ["127.0.0.1"]}
        }
    )
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert [_unknown_manifest(mirror, i, forwarded) for i in range(5)] == [404] * 5
    status, headers, document = http(
        mirror, "/v2/library/nothing-5/manifests/latest", headers={**forwarded, "Accept": "*/*"}
    )
    assert status == 429 and int(headers["retry-after"]) == 12 and "203.0.113.7" in json.dumps(document)
    assert http(mirror, "/api/version", headers=forwarded)[0] == 200  # nothing upstream: never limited
    # another client behind the same proxy has its own allowance
    assert _unknown_manifest(mirror, 6, {"X-Forwarded-For": "203.0.113.8"}) == 404
    # a client cannot dodge the limit by forging the header in front of the proxy's own entry
    assert _unknown_manifest(mirror, 7, {"X-Forwarded-For": "1.2.3.4, 203.0.113.7"}) == 429
    ollama_client = client(mirror, monkeypatch, None)
    for i in range(6):
        try:
            ollama_client.pull(f"nothing-{i}")
        except ollama.ResponseError as e:
            if e.status_code == 429:
                break
    else:
        pytest.fail("the official client was never limited")


def test_an_untrusted_peer_cannot_choose_its_address(mirror_factory: MirrorFactory) -> None:
    mirror = mirror_factory(config={"security": {"rate_limit_requests": 3}})
    statuses = [_unknown_manifest(mirror, i, {"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(4)]
    assert statuses == [404, 404, 404, 429]


def test_default_limits_never_refuse_ordinary_pulls(
    mirror_factory: MirrorFactory,
    small_model: PushedModel,
    medium_model: PushedModel,
    big_model: PushedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Go-style pulls (a manifest, HEADs, discovery GETs, 16 ranged parts per blob) of three models, cold
    and warm, plus a pull through the official client, from one address, under the default limits."""
    mirror = mirror_factory(
        config={"security": {"rate_limit_requests": SecurityConfig().rate_limit_requests}}
    )
    requests = 0
    for round_ in ("cold", "warm"):
        for model in (small_model, medium_model, big_model):
            result = go_pull(mirror, model, tmp_path / f"{round_}-{model.repo.replace('/', '-')}")
            assert result.manifest_bytes == model.manifest
            assert all(r.status != 429 for r in result.requests)
            requests += len(result.requests)
            if model is not small_model:  # (the small one is split in fewer, 16 KiB, parts)
                assert max(len(b.parts) for b in result.blob_results if b.parts) == 16
    assert client(mirror, monkeypatch, None).pull("tiny").status == "success"
    print(f"default limits: {requests} requests from one address, none refused")
    assert requests > 100  # more requests than the limit counts, none refused


def test_a_fleet_of_32_pullers_behind_one_address_on_default_settings(
    mirror_factory: MirrorFactory, model_factory: ModelFactory, tmp_path: Path
) -> None:
    """32 Ollama-style pullers on 127.0.0.1 pull one cold model at once (a GPU fleet behind a NAT),
    with the rate limit as shipped: all 32 succeed (the real binary: ``test_real_ollama.py``)."""
    model = model_factory("library/fleet", "latest", 2 * MiB, 32)
    mirror = mirror_factory(
        config={"security": {"rate_limit_requests": SecurityConfig().rate_limit_requests}}
    )
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        try:
            results[i] = go_pull(mirror, model, tmp_path / f"puller-{i}")
        except PullError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    failed = {i: str(r) for i, r in results.items() if isinstance(r, PullError)}
    assert len(results) == 32 and not failed, failed
    assert all(r.manifest_bytes == model.manifest for r in results.values())
