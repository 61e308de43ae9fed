"""The mirror's Ollama REST API (``OLLAMA_HOST=http://mirror:11434``) driven by the official ``ollama`` client.

The daemon is the real ``twistd -n ollama-mirror``; the upstream is the session's distribution registry
(through a :class:`FaultProxy` where a test needs a slow download). Models pushed as ``library/NAME:latest``
are pulled as plain ``NAME``: the mirror maps the default host ``registry.ollama.ai`` to its upstream.

- pull (streamed and not), list, show, delete and their errors, as ``ollama`` 0.6.x parses them;
- a pull the client abandons is finished by the mirror anyway;
- the inference proxy towards a backend Ollama (:class:`tests.support.backend.OllamaBackend`): streams
  relayed chunk by chunk, a client hanging up closes the backend connection, a dead backend is a quick 502.

What the answers must look like is what Ollama's own server answers (its ``api/types.go`` and
``server/routes.go``).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import statistics
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ollama
import pytest

from tests.integration.helpers import wait_until
from tests.support.backend import DEFAULT_TOKENS, OllamaBackend
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import (
    DEFAULT_LICENSE,
    DEFAULT_TEMPLATE,
    MEDIA_LICENSE,
    MEDIA_PARAMS,
    MEDIA_TEMPLATE,
    Blob,
    MiB,
    ModelFactory,
    PushedModel,
)
from tests.support.registry import RegistryProcess

UPSTREAM_HOST = "registry.ollama.ai"
CLIENT_TIMEOUT = 30.0
BIG_SIZE = 24 * MiB
THROTTLE = 3 * MiB  # bytes/s per upstream connection: the big model takes ~2 s with 4 connections
PULL_SETTINGS: dict[str, Any] = {
    "upstream": {"chunk_size": "1MiB", "retry_attempts": 3, "retry_delay": 0.1, "timeout": 10}
}
BACKEND_DELAY = 0.2
BAD_BODIES: tuple[tuple[bytes, str], ...] = ((b"{not json", "malformed JSON"), (b"{}", "no model field"))


# --- helpers ------------------------------------------------------------------------------------------


def client_for(mirror: MirrorDaemon) -> ollama.Client:
    return ollama.Client(host=mirror.url, timeout=CLIENT_TIMEOUT)


def short(model: PushedModel) -> str:
    """The name a user types: ``tiny`` for ``library/tiny:latest``."""
    assert model.repo.startswith("library/") and model.tag == "latest"
    return model.repo.removeprefix("library/")


def cached_blob(mirror: MirrorDaemon, blob: Blob) -> Path:
    return mirror.cache_dir / "blobs" / blob.cache_name


def cached_manifest(mirror: MirrorDaemon, model: PushedModel) -> Path:
    return mirror.cache_dir / "manifests" / UPSTREAM_HOST / model.repo / model.tag


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while piece := fh.read(MiB):
            sha.update(piece)
    return sha.hexdigest()


def assert_cached(mirror: MirrorDaemon, model: PushedModel) -> None:
    """Every blob of ``model`` is complete in the cache, and the manifest bytes are the upstream's."""
    for blob in model.blobs:
        path = cached_blob(mirror, blob)
        assert path.exists(), f"{blob.digest} ({blob.media_type}) is not in the cache"
        assert path.stat().st_size == blob.size
        assert sha256_file(path) == blob.hex
    assert cached_manifest(mirror, model).read_bytes() == model.manifest


def listed(client: ollama.Client) -> dict[str, ollama.ListResponse.Model]:
    return {str(m.model): m for m in client.list().models}


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    mirror: MirrorDaemon, method: str, path: str, body: bytes | None = None, timeout: float = CLIENT_TIMEOUT
) -> Raw:
    conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return Raw(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def assert_error_body(raw: Raw, status: int) -> str:
    """``raw`` is ``status`` with an Ollama error body ``{"error": "..."}``; returns the message."""
    assert raw.status == status, (raw.status, raw.body)
    assert raw.headers.get("content-type", "").startswith("application/json"), raw.headers
    document = raw.json()
    assert set(document) == {"error"}, document
    assert isinstance(document["error"], str) and document["error"]
    return str(document["error"])


def progress_by_layer(
    parts: list[ollama.ProgressResponse], model: PushedModel
) -> dict[str, list[ollama.ProgressResponse]]:
    """Check the whole status sequence of a pull; return its ``pulling <digest>`` lines per layer.

    ``pulling manifest``, then per layer (in manifest order, the config last) a run of lines ``pulling
    <hex[:12]>`` with the layer's digest and size whose ``completed`` rises to ``total``, then ``verifying
    sha256 digest``, ``writing manifest``, ``success``.
    """
    statuses = [p.status for p in parts]
    assert statuses[0] == "pulling manifest", statuses
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"], statuses
    order = [*model.layers, model.config]
    runs: list[tuple[str, list[ollama.ProgressResponse]]] = []
    for part in parts[1:-3]:
        assert part.status is not None and part.status.startswith("pulling "), statuses
        if not runs or runs[-1][0] != part.status:
            runs.append((part.status, []))
        runs[-1][1].append(part)
    assert [status for status, _ in runs] == [f"pulling {blob.hex[:12]}" for blob in order], statuses
    by_digest: dict[str, list[ollama.ProgressResponse]] = {}
    for blob, (_, lines) in zip(order, runs, strict=True):
        completed = [line.completed or 0 for line in lines]
        assert all(line.digest == blob.digest for line in lines), lines
        assert all(line.total == blob.size for line in lines), lines
        assert completed == sorted(completed), f"{blob.digest}: completed went down: {completed}"
        assert completed[-1] == blob.size, f"{blob.digest}: ended at {completed[-1]} of {blob.size}"
        by_digest[blob.digest] = lines
    return by_digest


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[FaultProxy]:
    with FaultProxy(registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def pull_mirror(mirror_factory: MirrorFactory, proxy: FaultProxy) -> MirrorDaemon:
    """A daemon whose upstream is ``proxy`` (which the test may throttle), with 1 MiB upstream chunks."""
    return mirror_factory(upstream_url=proxy.url, config=PULL_SETTINGS)


@pytest.fixture(scope="session")
def big_model(model_factory: ModelFactory) -> PushedModel:
    """A 24 MiB model: 24 upstream chunks of 1 MiB, about 2 s through the throttled proxy."""
    return model_factory("library/bigpull", "latest", BIG_SIZE, 7)


@pytest.fixture(scope="session")
def sibling_model(model_factory: ModelFactory) -> PushedModel:
    """Another small model: its template, params and license blobs are those of ``small_model``."""
    return model_factory("library/sibling", "latest", 32 * 1024, 5)


@pytest.fixture
def backend() -> Iterator[OllamaBackend]:
    with OllamaBackend(delay=BACKEND_DELAY) as fake:
        yield fake


@pytest.fixture
def proxied(mirror_factory: MirrorFactory, backend: OllamaBackend) -> MirrorDaemon:
    """A daemon whose inference routes go to ``backend``."""
    return mirror_factory(overrides={"backend.url": backend.url})


# --- 1. pull, streamed ----------------------------------------------------------------------------------


def test_pull_stream_reports_progress_like_ollama(
    pull_mirror: MirrorDaemon, proxy: FaultProxy, big_model: PushedModel, small_model: PushedModel
) -> None:
    mirror = pull_mirror
    proxy.throttle(THROTTLE, path="/blobs/")
    with client_for(mirror) as client:
        parts = list(client.pull(short(big_model), stream=True))

    lines = progress_by_layer(parts, big_model)
    completed = [line.completed or 0 for line in lines[big_model.model_layer.digest]]
    partial = {c for c in completed if 0 < c < big_model.model_layer.size}
    assert len(partial) >= 3, f"too few progress steps for a ~2 s download: {completed}"
    assert_cached(mirror, big_model)

    # The wire format: NDJSON, one compact object per line, never a blank line.
    started = time.monotonic()
    raw = raw_request(mirror, "POST", "/api/pull", json.dumps({"model": short(small_model)}).encode())
    assert raw.status == 200
    assert raw.headers["content-type"] == "application/x-ndjson"
    assert raw.body.endswith(b"\n")
    wire_lines = raw.body[:-1].split(b"\n")
    assert b"" not in wire_lines, raw.body
    for line in wire_lines:
        document = json.loads(line)
        assert line == json.dumps(document, separators=(",", ":")).encode(), line
        assert document.get("completed", 1) and document.get("total", 1), f"zero field in {line!r}"
    documents = [ollama.ProgressResponse(**json.loads(line)) for line in wire_lines]
    progress_by_layer(documents, small_model)
    assert time.monotonic() - started < 10
    assert_cached(mirror, small_model)


# --- 2. pull, not streamed; a cached model ---------------------------------------------------------------


def test_pull_without_stream_then_cached_pull_reports_whole_layers(
    pull_mirror: MirrorDaemon, proxy: FaultProxy, small_model: PushedModel
) -> None:
    mirror = pull_mirror
    with client_for(mirror) as client:
        result = client.pull(short(small_model))  # the client's default: stream=False
        assert result.status == "success"
        assert_cached(mirror, small_model)
        fetched = proxy.bytes_for("/blobs/")
        assert fetched >= small_model.total_size

        again = list(client.pull(short(small_model), stream=True))
    lines = progress_by_layer(again, small_model)
    for blob in small_model.blobs:
        assert [(line.completed, line.total) for line in lines[blob.digest]] == [(blob.size, blob.size)]
    assert proxy.bytes_for("/blobs/") == fetched, "a cached model was downloaded again"


# --- 3. list ----------------------------------------------------------------------------------------------


def test_list_shows_pulled_models_with_ollama_details(
    mirror: MirrorDaemon, small_model: PushedModel, sibling_model: PushedModel
) -> None:
    with client_for(mirror) as client:
        assert client.list().models == []
        assert client.pull(short(small_model)).status == "success"
        time.sleep(0.05)  # distinct manifest mtimes: the list is newest first
        assert client.pull(short(sibling_model)).status == "success"
        models = client.list().models

    assert [m.model for m in models] == ["sibling:latest", "tiny:latest"]
    for entry, model in zip(models, (sibling_model, small_model), strict=True):
        assert entry.size == model.total_size == sum(blob.size for blob in model.blobs)
        assert entry.digest == hashlib.sha256(model.manifest).hexdigest()
        assert entry.modified_at is not None
        assert entry.details is not None
        assert entry.details.format == "gguf"
        assert entry.details.family == "llama"
        assert entry.details.families == ["llama"]
        assert entry.details.parameter_size == model.config_data["model_type"]
        assert entry.details.quantization_level == "F16"

    raw = raw_request(mirror, "GET", "/api/tags")
    assert raw.status == 200
    assert [(m["name"], m["model"]) for m in raw.json()["models"]] == [
        ("sibling:latest", "sibling:latest"),
        ("tiny:latest", "tiny:latest"),
    ]


# --- 4. show ----------------------------------------------------------------------------------------------


def test_show_reads_gguf_and_layers(mirror: MirrorDaemon, model_factory: ModelFactory) -> None:
    model = model_factory(
        "library/showme", "latest", 32 * 1024, 3, context_length=4096, system="You are a test model."
    )
    with client_for(mirror) as client:
        assert client.pull("showme").status == "success"
        shown = client.show("showme")
        with pytest.raises(ollama.ResponseError) as missing:
            client.show("nosuch")

    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 4096
    assert shown.modelinfo["general.parameter_count"] == model.n_params
    assert shown.template == DEFAULT_TEMPLATE
    assert shown.license == DEFAULT_LICENSE
    assert shown.parameters is not None
    assert shown.parameters.split() == ["stop", '"<|end|>"']
    assert shown.details is not None and shown.details.family == "llama"
    assert shown.modelfile is not None
    assert str(cached_blob(mirror, model.model_layer)) in shown.modelfile
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'nosuch' not found"

    raw = raw_request(mirror, "POST", "/api/show", json.dumps({"model": "showme"}).encode())
    assert raw.status == 200
    assert raw.json()["system"] == "You are a test model."
    assert "model_info" in raw.json()


# --- 5. delete --------------------------------------------------------------------------------------------


def test_delete_keeps_blobs_other_models_use(
    mirror: MirrorDaemon, small_model: PushedModel, sibling_model: PushedModel
) -> None:
    shared = {small_model.layer(m).digest for m in (MEDIA_TEMPLATE, MEDIA_PARAMS, MEDIA_LICENSE)}
    assert shared == {sibling_model.layer(m).digest for m in (MEDIA_TEMPLATE, MEDIA_PARAMS, MEDIA_LICENSE)}
    own = [blob for blob in small_model.blobs if blob.digest not in shared]
    assert len(own) == 2  # the GGUF and the config

    with client_for(mirror) as client:
        assert client.pull(short(small_model)).status == "success"
        assert client.pull(short(sibling_model)).status == "success"
        assert client.delete(short(small_model)).status == "success"
        assert list(listed(client)) == ["sibling:latest"]
        assert client.show(short(sibling_model)).template == DEFAULT_TEMPLATE
        with pytest.raises(ollama.ResponseError) as again:
            client.delete(short(small_model))

    for blob in own:
        assert not cached_blob(mirror, blob).exists(), (
            f"{blob.media_type} of the deleted model is still there"
        )
    assert not cached_manifest(mirror, small_model).exists()
    assert_cached(mirror, sibling_model)  # the shared blobs stayed
    assert again.value.status_code == 404
    assert again.value.error == "model 'tiny' not found"


# --- 6. errors --------------------------------------------------------------------------------------------


def test_pull_errors(mirror: MirrorDaemon) -> None:
    with client_for(mirror) as client:
        with pytest.raises(ollama.ResponseError) as unknown:
            client.pull("nosuchmodel")
        assert unknown.value.status_code == 500
        assert unknown.value.error == "pull model manifest: file does not exist"

        with pytest.raises(ollama.ResponseError) as unknown_streamed:
            list(client.pull("nosuchmodel", stream=True))
        assert unknown_streamed.value.error == "pull model manifest: file does not exist"

        with pytest.raises(ollama.ResponseError) as bad_name:
            client.pull("bad name!")
        assert bad_name.value.status_code == 400
        assert bad_name.value.error == "invalid model name"

    raw = raw_request(mirror, "POST", "/api/pull", b'{"model":"nosuchmodel"}')
    assert raw.status == 200
    assert raw.body.split(b"\n") == [
        b'{"status":"pulling manifest"}',
        b'{"error":"pull model manifest: file does not exist"}',
        b"",
    ]
    assert assert_error_body(raw_request(mirror, "POST", "/api/pull", b'{"model":"bad name!"}'), 400) == (
        "invalid model name"
    )


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/api/pull"), ("POST", "/api/show"), ("DELETE", "/api/delete")]
)
def test_bad_request_bodies_are_400(mirror: MirrorDaemon, method: str, path: str) -> None:
    for body, what in BAD_BODIES:
        raw = raw_request(mirror, method, path, body)
        assert raw.status == 400, f"{what}: {raw.status} {raw.body!r}"
        assert_error_body(raw, 400)


# --- 7. a pull the client abandons ------------------------------------------------------------------------


def test_abandoned_pull_is_finished_by_the_mirror(
    pull_mirror: MirrorDaemon, proxy: FaultProxy, big_model: PushedModel
) -> None:
    mirror = pull_mirror
    proxy.throttle(THROTTLE, path="/blobs/")
    model_blob = cached_blob(mirror, big_model.model_layer)
    client = client_for(mirror)
    stream = cast(Generator[ollama.ProgressResponse], client.pull(short(big_model), stream=True))
    for part in stream:
        if part.status is not None and part.status.startswith("pulling ") and part.digest:
            break
    assert not model_blob.exists(), "the download was over before the client hung up: throttle harder"
    stream.close()
    client.close()
    hung_up = time.monotonic()

    with client_for(mirror) as other:
        # An incomplete model is neither listed nor in manifests/ (Ollama would list it, and fail to run it).
        assert not cached_manifest(mirror, big_model).exists()
        assert "bigpull:latest" not in listed(other)
        wait_until(lambda: "bigpull:latest" in listed(other), 20.0, "the abandoned pull to finish")
        assert cached_manifest(mirror, big_model).exists()
    assert time.monotonic() - hung_up > 0.3  # it really was still downloading
    assert_cached(mirror, big_model)
    assert proxy.bytes_for(big_model.model_layer.hex) <= 1.1 * big_model.model_layer.size


# --- 8. the inference proxy -------------------------------------------------------------------------------


def chat_messages() -> list[Mapping[str, Any]]:
    return [{"role": "user", "content": "Say something."}]


def assert_streamed_incrementally(arrivals: list[float], backend: OllamaBackend, path: str) -> None:
    """The client got the chunks as the backend sent them, not in one burst at the end."""
    stream = backend.wait_for_stream(path, 5.0)
    assert stream.wait_ended(5.0) and stream.completed.is_set()
    sent = stream.chunk_times
    assert len(sent) == len(DEFAULT_TOKENS)
    data_arrivals = arrivals[: len(sent)]
    assert len(data_arrivals) == len(sent)
    backend_spread = sent[-1] - sent[0]
    assert backend_spread >= (len(sent) - 1) * BACKEND_DELAY * 0.9
    client_spread = data_arrivals[-1] - data_arrivals[0]
    assert client_spread >= 0.6 * backend_spread, (
        f"chunks sent over {backend_spread:.2f} s arrived within {client_spread:.2f} s"
    )
    assert data_arrivals[0] < sent[-1], "the first chunk only arrived after the backend sent the last one"
    lags = [arrived - at for arrived, at in zip(data_arrivals, sent, strict=True)]
    assert statistics.median(lags) < 0.1, f"chunks reached the client late: {lags}"


def test_chat_stream_is_relayed_chunk_by_chunk(proxied: MirrorDaemon, backend: OllamaBackend) -> None:
    arrivals: list[float] = []
    contents: list[str] = []
    with client_for(proxied) as client:
        parts = []
        for part in client.chat(model="tiny", messages=chat_messages(), stream=True):
            arrivals.append(time.monotonic())
            parts.append(part)
            contents.append(part.message.content or "")
    assert "".join(contents) == "".join(DEFAULT_TOKENS)
    assert [p.done for p in parts] == [False] * len(DEFAULT_TOKENS) + [True]
    assert parts[-1].done_reason == "stop"
    assert_streamed_incrementally(arrivals, backend, "/api/chat")

    (request,) = backend.requests_for("/api/chat")
    assert request.json["model"] == "tiny"
    assert request.json["messages"] == chat_messages()
    assert request.headers["user-agent"].startswith("ollama-python/")


def test_generate_stream_is_relayed_chunk_by_chunk(proxied: MirrorDaemon, backend: OllamaBackend) -> None:
    arrivals: list[float] = []
    pieces: list[str] = []
    with client_for(proxied) as client:
        for part in client.generate(model="tiny", prompt="Once upon a time", stream=True):
            arrivals.append(time.monotonic())
            pieces.append(part.response or "")
            last = part
    assert "".join(pieces) == "".join(DEFAULT_TOKENS)
    assert last.done and last.done_reason == "stop"
    assert_streamed_incrementally(arrivals, backend, "/api/generate")
    assert backend.requests_for("/api/generate")[0].json["prompt"] == "Once upon a time"


def test_plain_inference_routes(proxied: MirrorDaemon, backend: OllamaBackend) -> None:
    backend.missing = frozenset({"ghost"})
    with client_for(proxied) as client:
        answer = client.chat(model="tiny", messages=chat_messages())
        assert answer.message.content == "".join(DEFAULT_TOKENS)
        assert answer.done and answer.done_reason == "stop"

        embedded = client.embed(model="tiny", input=["first", "second"])
        assert len(embedded.embeddings) == 2
        assert all(len(vector) == 8 for vector in embedded.embeddings)

        assert client.ps().models == []

        with pytest.raises(ollama.ResponseError) as missing:
            client.chat(model="ghost", messages=chat_messages())
        assert missing.value.status_code == 404
        assert missing.value.error == "model 'ghost' not found"

    assert backend.requests_for("/api/chat")[0].json["stream"] is False
    assert backend.requests_for("/api/embed")[0].json["input"] == ["first", "second"]
    assert backend.requests_for("/api/ps", "GET")

    models = raw_request(proxied, "GET", "/v1/models")
    assert models.status == 200
    assert models.json()["object"] == "list"
    assert [m["id"] for m in models.json()["data"]] == ["tiny:latest"]


def test_openai_chat_completions_stream_passes_through(proxied: MirrorDaemon, backend: OllamaBackend) -> None:
    body = json.dumps({"model": "tiny", "stream": True, "messages": chat_messages()}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", proxied.port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        lines: list[bytes] = []
        arrivals: list[float] = []
        while line := response.readline():
            lines.append(line)
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic())
    finally:
        conn.close()

    events = [line for line in lines if line != b"\n"]
    assert all(line.startswith(b"data: ") and line.endswith(b"\n") for line in events), lines
    assert len(lines) == 2 * len(events)  # every event is followed by a blank line
    assert events[-1] == b"data: [DONE]\n"
    chunks = [json.loads(line[len(b"data: ") :]) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "".join(DEFAULT_TOKENS)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert_streamed_incrementally(arrivals, backend, "/v1/chat/completions")


def test_client_hanging_up_closes_the_backend_connection(
    proxied: MirrorDaemon, backend: OllamaBackend
) -> None:
    client = client_for(proxied)
    stream = cast(
        Generator[ollama.ChatResponse],
        client.chat(model="tiny", messages=chat_messages(), stream=True, options={"num_predict": 100}),
    )
    first = next(stream)
    assert first.message.content == DEFAULT_TOKENS[0]
    stream.close()
    client.close()
    hung_up = time.monotonic()

    backend_stream = backend.wait_for_stream("/api/chat", 5.0)
    assert backend_stream.wait_client_gone(5.0), "the backend kept streaming to a client that hung up"
    assert time.monotonic() - hung_up < 5.0
    assert not backend_stream.completed.is_set()
    assert backend_stream.chunks_sent < 100


def test_backend_down_is_a_quick_502(proxied: MirrorDaemon, backend: OllamaBackend) -> None:
    with client_for(proxied) as client:
        assert client.chat(model="tiny", messages=chat_messages()).done  # a pooled connection now exists
        backend.stop()

        started = time.monotonic()
        with pytest.raises(ollama.ResponseError) as down:
            client.chat(model="tiny", messages=chat_messages())
        assert time.monotonic() - started < 5.0
        assert down.value.status_code == 502
        assert backend.url in down.value.error

        with pytest.raises(ollama.ResponseError) as streamed:
            list(client.generate(model="tiny", prompt="hi", stream=True))
        assert streamed.value.status_code == 502

    started = time.monotonic()
    raw = raw_request(proxied, "POST", "/api/chat", json.dumps({"model": "tiny"}).encode(), timeout=10)
    assert time.monotonic() - started < 5.0
    assert_error_body(raw, 502)
    assert_error_body(raw_request(proxied, "GET", "/v1/models", timeout=10), 502)


def test_disabled_proxy_is_a_502_naming_the_setting(
    mirror_factory: MirrorFactory, backend: OllamaBackend
) -> None:
    mirror = mirror_factory(overrides={"backend.url": backend.url, "features.enable_api_proxy": "false"})
    with client_for(mirror) as client:
        with pytest.raises(ollama.ResponseError) as disabled:
            client.chat(model="tiny", messages=chat_messages())
        assert disabled.value.status_code == 502
        assert "features.enable_api_proxy" in disabled.value.error
        with pytest.raises(ollama.ResponseError) as ps:
            client.ps()
        assert ps.value.status_code == 502
    message = assert_error_body(raw_request(mirror, "GET", "/v1/models"), 502)
    assert "features.enable_api_proxy" in message
    assert backend.requests == []
