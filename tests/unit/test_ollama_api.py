"""The /api routes through StubTreq: pull progress, tags, show, delete, errors, the disabled proxy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IAgent
from zope.interface import implementer

from .fakeregistry import FakeRegistry
from .harness import Harness

TEMPLATE = b"{{ .Prompt }}"
PARAMS = b'{"stop":["<|end|>"],"temperature":0.5}'
LICENSE = b"Do what you like."
TYPES = [
    "application/vnd.ollama.image.model",
    "application/vnd.ollama.image.template",
    "application/vnd.ollama.image.params",
    "application/vnd.ollama.image.license",
]


@pytest.fixture
def registry() -> FakeRegistry:
    registry = FakeRegistry()
    registry.add_model("library/tiny", "latest", [os.urandom(300_000), TEMPLATE, PARAMS, LICENSE], TYPES)
    registry.add_model("library/other", "latest", [os.urandom(1000), TEMPLATE], TYPES[:2])
    return registry


def lines(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n") and b"\n\n" not in body  # the Python client chokes on a blank line
    raw = body.decode().splitlines()
    assert all(json.dumps(json.loads(line), separators=(",", ":")) == line for line in raw)  # compact
    return [json.loads(line) for line in raw]


def pull(h: Harness, body: dict[str, Any]) -> tuple[Any, bytes]:
    return h.request("POST", "/api/pull", step=0.05, data=json.dumps(body).encode())


def test_a_streamed_pull_reports_like_ollama(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = pull(h, {"model": "tiny"})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    reports = lines(body)
    statuses = [r["status"] for r in reports]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    manifest = json.loads(registry.manifests[("library/tiny", "latest")])
    order = [layer["digest"] for layer in manifest["layers"]] + [manifest["config"]["digest"]]
    progress = [
        r for r in reports if r["status"].startswith("pulling ") and r["status"] != "pulling manifest"
    ]
    assert [r["digest"] for r in progress] == sorted(
        [r["digest"] for r in progress], key=order.index
    )  # layers in manifest order, config last
    for digest in order:
        mine = [r for r in progress if r["digest"] == digest]
        assert mine[0]["status"] == f"pulling {digest[7:19]}"
        completed = [r.get("completed", 0) for r in mine]
        assert completed == sorted(completed) and completed[-1] == mine[-1]["total"]
    # (several rising lines per layer need a slow upstream: tests/integration/test_ollama_api.py)


def test_a_cached_layer_is_one_line_and_stream_false_answers_once(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    response, body = pull(h, {"name": "tiny", "stream": False})
    assert response.code == 200 and json.loads(body) == {"status": "success"}
    _, body = pull(h, {"model": "tiny:latest"})
    progress = [r for r in lines(body) if "digest" in r]
    assert len(progress) == 5 and all(r["completed"] == r["total"] for r in progress)


def test_an_unknown_model(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = pull(h, {"model": "nosuch"})
    assert response.code == 200
    assert lines(body)[-1] == {"error": "pull model manifest: file does not exist"}
    response, body = pull(h, {"model": "nosuch", "stream": False})
    assert response.code == 500 and json.loads(body) == {"error": "pull model manifest: file does not exist"}


def test_a_failing_download_ends_the_stream_with_an_error_line(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"upstream.retry_attempts": "0"})
    h.request("GET", "/v2/library/tiny/manifests/latest")
    registry.fail_with = 503
    _, body = pull(h, {"model": "tiny"})
    last = lines(body)[-1]
    assert set(last) == {"error"} and "503" in last["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON in request body"),
        (b"[1]", "request body must be a JSON object"),
        (b"{}", "model is required"),
        (b'{"model": "bad name!"}', "invalid model name"),
        (b'{"model": "../../etc"}', "invalid model name"),
        (b'{"model": "hf.co/someone/model:Q4"}', "no upstream is configured for hf.co"),
        (b"{" + b" " * (1 << 20) + b"}", "request body is larger than"),
    ],
    ids=["malformed", "array", "no-model", "bad-name", "traversal", "other-host", "oversized"],
)
def test_bad_pull_requests_are_400_with_an_error(
    tmp_path: Path, registry: FakeRegistry, body: bytes, message: str
) -> None:
    h = Harness(tmp_path, registry)
    response, answer = h.request("POST", "/api/pull", data=body, headers={"Content-Type": "text/plain"})
    assert response.code == 400
    assert message in json.loads(answer)["error"]


def test_tags_lists_complete_models_newest_first(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    _, body = h.request("GET", "/api/tags")
    assert json.loads(body) == {"models": []}
    pull(h, {"model": "tiny", "stream": False})
    pull(h, {"model": "other", "stream": False})
    manifests = tmp_path / "cache" / "manifests" / "registry.ollama.ai" / "library"
    os.utime(manifests / "tiny" / "latest", (1_700_000_000, 1_700_000_000))
    h.request("GET", "/v2/library/ghost/manifests/latest")  # unknown upstream: nothing stored
    (manifests / "partial").mkdir()
    (manifests / "partial" / "latest").write_bytes(
        registry.manifests[("library/tiny", "latest")].replace(b"a", b"b")
    )
    _, body = h.request("GET", "/api/tags")
    models = json.loads(body)["models"]
    assert [m["name"] for m in models] == ["other:latest", "tiny:latest"]  # newest first; incomplete left out
    tiny = models[1]
    data = registry.manifests[("library/tiny", "latest")]
    assert tiny["model"] == "tiny:latest"
    assert tiny["digest"] == hashlib.sha256(data).hexdigest()
    assert tiny["size"] == sum(len(b) for d, b in registry.blobs.items() if d.encode() in data)
    assert tiny["modified_at"].startswith("2023-11-14T22:13:20")
    assert tiny["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1B",
        "quantization_level": "Q4_0",
    }


def test_show(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("POST", "/api/show", data=b'{"model": "tiny"}')
    assert response.code == 404 and json.loads(body) == {"error": "model 'tiny' not found"}
    pull(h, {"model": "tiny", "stream": False})
    response, body = h.request("POST", "/api/show", data=b'{"model": "tiny"}')
    shown = json.loads(body)
    assert response.code == 200
    assert shown["template"] == TEMPLATE.decode() and shown["license"] == LICENSE.decode()
    assert shown["parameters"].splitlines() == [f'{"stop":<30} "<|end|>"', f"{'temperature':<30} 0.5"]
    assert "model_info" in shown  # the Python client requires the key (random bytes: not GGUF, so {})
    assert shown["details"]["quantization_level"] == "Q4_0"
    assert 'TEMPLATE """{{ .Prompt }}"""' in shown["modelfile"] and "PARAMETER stop" in shown["modelfile"]


def test_delete_keeps_blobs_other_models_use(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    pull(h, {"model": "tiny", "stream": False})
    pull(h, {"model": "other", "stream": False})
    blobs = tmp_path / "cache" / "blobs"
    template = blobs / ("sha256-" + hashlib.sha256(TEMPLATE).hexdigest())
    before = {p.name for p in blobs.iterdir()}
    response, body = h.request("DELETE", "/api/delete", data=b'{"model": "tiny"}')
    assert response.code == 200 and body == b""
    assert not response.headers.hasHeader("content-type")  # as Ollama: an empty 200, no type
    after = {p.name for p in blobs.iterdir()}
    assert template.exists()  # 'other' still uses it (and the same config blob)
    tiny_only = {"sha256-" + hashlib.sha256(b).hexdigest() for b in (PARAMS, LICENSE)}
    assert tiny_only <= before - after and len(before - after) == 3  # and tiny's weights
    _, tags = h.request("GET", "/api/tags")
    assert [m["name"] for m in json.loads(tags)["models"]] == ["other:latest"]
    response, body = h.request("DELETE", "/api/delete", data=b'{"model": "tiny"}')
    assert response.code == 404 and json.loads(body) == {"error": "model 'tiny' not found"}


def test_a_disabled_proxy_is_a_502_naming_the_setting(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_api_proxy": "false"})
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions", "/api/ps"):
        response, body = h.request("POST" if path != "/api/ps" else "GET", path, data=b"{}")
        assert response.code == 502
        assert "features.enable_api_proxy" in json.loads(body)["error"]


@implementer(IAgent)
class SilentUpstream:
    """Accepts the request and never answers; when the timeout cancels it, fails as twisted's Agent does
    once a request went out (ResponseNeverReceived, not CancelledError)."""

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))


def test_a_silent_upstream_shows_as_a_wait_then_a_timeout(tmp_path: Path, registry: FakeRegistry) -> None:
    settings = {"upstream.timeout": "30", "upstream.retry_attempts": "1", "upstream.retry_delay": "0"}
    h = Harness(tmp_path, registry, upstream_agent=SilentUpstream(), **settings)
    response, body = h.request("POST", "/api/pull", step=1, data=b'{"model": "tiny"}')
    assert response.code == 200  # the stream had started: the error is its last line, as in Ollama
    got = lines(body)
    waiting = {"status": "pulling manifest: waiting for http://registry.example to answer"}
    assert got[0] == {"status": "pulling manifest"}
    assert got[1:-1] == [waiting] * 11  # one every 5 s of the two tries of 30 s
    assert got[-1] == {
        "error": "pull model manifest: upstream http://registry.example did not answer within 30 s "
        "(upstream.timeout) (after 2 attempts)"
    }


class RefusingBackend:
    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return fail(ConnectionRefusedError("Connection refused"))


@pytest.mark.parametrize("backend", ["down", "disabled"])
def test_an_unload_needs_no_backend(tmp_path: Path, registry: FakeRegistry, backend: str) -> None:
    """``ollama rm`` and ``ollama stop`` first ask to unload the model; with no backend Ollama nothing is
    loaded, so the mirror answers as Ollama does (the CLI then prints no warning)."""
    settings = {"features.enable_api_proxy": "false"} if backend == "disabled" else {}
    h = Harness(tmp_path, registry, backend_agent=RefusingBackend(), **settings)
    response, body = h.request("POST", "/api/generate", data=b'{"model": "tiny", "keep_alive": 0}')
    answer = json.loads(body)
    assert response.code == 200 and answer["done"] is True and answer["done_reason"] == "unload"
    assert answer["model"] == "tiny" and answer["response"] == "" and answer["created_at"].endswith("Z")
    response, body = h.request(
        "POST", "/api/chat", data=b'{"model": "tiny", "messages": [], "keep_alive": "0s"}'
    )
    assert response.code == 200 and json.loads(body)["message"] == {"role": "assistant", "content": ""}
    # anything that would generate still needs the backend
    response, body = h.request(
        "POST", "/api/generate", data=b'{"model": "tiny", "prompt": "hi", "keep_alive": 0}'
    )
    assert response.code == 502
    response, body = h.request("POST", "/api/generate", data=b'{"model": "tiny"}')
    assert response.code == 502


def test_version_and_unknown_api_routes(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", "/api/version")
    assert response.code == 200 and "version" in json.loads(body)
    response, body = h.request("GET", "/api/nope")
    assert response.code == 404 and json.loads(body) == {"error": "not found"}
    response, body = h.request("GET", "/api/pull")
    assert response.code == 405 and "error" in json.loads(body)


def test_delete_mirror_cache_empties_it_and_says_what_went(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    pull(h, {"model": "tiny", "stream": False})
    pull(h, {"model": "other", "stream": False})
    response, body = h.request("DELETE", "/mirror/cache")
    assert response.code == 200
    answer = json.loads(body)
    assert answer["removed_models"] == [
        "registry.ollama.ai/library/other:latest",
        "registry.ollama.ai/library/tiny:latest",
    ]
    assert answer["removed_blobs"] == len(registry.blobs) and answer["freed_bytes"] > 300_000
    assert list((tmp_path / "cache" / "blobs").iterdir()) == []
    _, tags = h.request("GET", "/api/tags")
    assert json.loads(tags) == {"models": []}
