"""The real ``ollama`` binary as the judge: registry mode, API mode, inference, resume, 16 parts, a fleet.

These tests need an ``ollama`` built by hand from Ollama's public source; ``OLLAMA_BIN`` names it, and
without it they skip, saying so. Every ``ollama serve`` has its own home, models directory and loopback
port (:mod:`tests.support.ollama`). The client reaches the mirror through a recording proxy; with
``RECORD_VECTORS=1`` the exchanges of each scenario are written to ``tests/vectors/`` (normalized, without
secrets), which ``test_vectors.py`` replays in CI, where the binary is not available.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ollama_mirror.config import SecurityConfig
from tests.integration.helpers import sha256_file, wait_until
from tests.support.daemon import MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import MiB, PushedModel, build_model, push_model
from tests.support.ollama import OllamaServer, ollama_version, plain_text, require_ollama, run_cli
from tests.support.recorder import RecordingProxy
from tests.support.registry import RegistryProcess, free_port
from tests.support.s3server import S3Server
from tests.support.vectors import Bindings, Vector, normalize

RECORD = os.environ.get("RECORD_VECTORS") == "1"
BIG_SIZE = 300 * MiB  # 4 parts of 100 MB for the Go client
SIXTEEN_PARTS_SIZE = 1_650_000_000  # at least 16 x 100 MB: the Go client's full 16 parallel parts
THROTTLE = 24 * MiB  # bytes per second from the upstream while a test kills something mid-blob


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ollama_bin() -> str:
    return require_ollama()


@pytest.fixture(scope="module")
def real_registry(ollama_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A registry of this module's own: its ``library/tiny`` is a model ``ollama run`` can run."""
    process = RegistryProcess(tmp_path_factory.mktemp("real-registry"))
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Models:
    tiny: PushedModel
    big: PushedModel
    blobs_dir: Path


@pytest.fixture(scope="module")
def models(real_registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Models:
    work = tmp_path_factory.mktemp("real-models")
    tiny = push_model(real_registry.url, "library/tiny", "latest", build_model(work, runnable=True))
    big = push_model(
        real_registry.url, "library/big", "latest", build_model(work, size=BIG_SIZE, seed=7, name="big")
    )
    return Models(tiny, big, work / "blobs")


def bindings_for(host: str, models: Models) -> Bindings:
    bindings = Bindings(host=host)
    bindings.add_model("tiny", models.tiny)
    bindings.add_model("big", models.big)
    return bindings


MODEL_SETUP = [
    {"prefix": "tiny", "repo": "library/tiny", "runnable": True},
    {"prefix": "big", "repo": "library/big", "size": BIG_SIZE, "seed": 7, "name": "big"},
]


@dataclass
class Scene:
    """One recorded scenario: phases of normalized exchanges, written out with ``RECORD_VECTORS=1``."""

    name: str
    description: str
    setup: dict[str, Any]
    bindings: Bindings
    binary: str
    phases: list[dict[str, Any]] = field(default_factory=list)

    def phase(self, title: str, recorder: RecordingProxy, key: str | None = None) -> list[dict[str, Any]]:
        exchanges = [normalize(e, self.bindings) for e in recorder.take()]
        self.phases.append({"phase": title, "key": key, "exchanges": exchanges})
        return exchanges

    def save(self) -> None:
        if not RECORD:
            return
        client = {
            "name": "ollama",
            "version": ollama_version(self.binary),
            "commit": os.environ.get("OLLAMA_COMMIT", ""),
            "recorded": datetime.now(UTC).date().isoformat(),
        }
        Vector(self.name, self.description, client, {"models": MODEL_SETUP, **self.setup}, self.phases).dump()


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's output, after checking that it succeeded."""
    text = plain_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"ollama {result.args[1:]} failed ({result.returncode}):\n{text}"
    return text


def blob_files_match(models_dir: Path, model: PushedModel) -> None:
    """Every blob of *model* is in *models_dir* under its name, with the bytes its digest names."""
    for blob in model.blobs:
        path = models_dir / "blobs" / blob.cache_name
        assert path.exists(), f"{path} is missing"
        if blob.size < 4 * MiB:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.hex
        else:
            assert sha256_file(path) == blob.hex


# --- registry mode -------------------------------------------------------------------------------


def test_registry_mode_pull_cold_and_warm_then_list_show_cp_rm(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    with FaultProxy(real_registry.url) as upstream:
        mirror = mirror_factory(upstream_url=upstream.url)
        with RecordingProxy(mirror.url) as recorder, OllamaServer(ollama_bin, tmp_path / "ollama") as server:
            scene = Scene(
                "registry-pull",
                "ollama pull --insecure MIRROR/library/tiny cold, then warm after ollama rm; then a 300 MiB "
                "model, which the Go client fetches in 4 parallel ranged parts",
                {"mirror": {}},
                bindings_for(recorder.host, models),
                ollama_bin,
            )
            name = f"{recorder.host}/library/tiny"
            assert "success" in ok(server.cli("pull", "--insecure", name))
            cold = scene.phase("cold pull of a small model", recorder)
            assert [e["response"]["status"] for e in cold][:1] == [200]  # the manifest, first
            blob_files_match(server.models_dir, models.tiny)

            listed = ok(server.cli("list"))
            assert f"{name}:latest" in listed and models.tiny.manifest_hex[:12] in listed
            shown = ok(server.cli("show", name))
            assert "llama" in shown and "256" in shown  # architecture, context length
            ok(server.cli("cp", name, "tiny-copy"))
            assert "tiny-copy:latest" in ok(server.cli("list"))
            assert "deleted" in ok(server.cli("rm", name))
            listed = ok(server.cli("list"))
            assert name not in listed and "tiny-copy:latest" in listed
            ok(server.cli("rm", "tiny-copy"))
            assert not list((server.models_dir / "blobs").glob("sha256-*"))
            assert recorder.take() == []  # list, show, cp and rm are the Ollama server's own business

            fetched = upstream.requests_for("/blobs/")
            assert "success" in ok(server.cli("pull", "--insecure", name))
            warm = scene.phase("warm pull (the blobs come from the mirror's disk)", recorder)
            assert upstream.requests_for("/blobs/") == fetched
            assert all(e["response"]["status"] in (200, 206) for e in warm)
            blob_files_match(server.models_dir, models.tiny)

            assert "success" in ok(server.cli("pull", "--insecure", f"{recorder.host}/library/big"))
            parts = scene.phase("cold pull of a 300 MiB model: 4 parallel parts of 100 MB", recorder)
            ranges = [
                e["request"]["headers"].get("range")
                for e in parts
                if e["request"]["target"].endswith("{digest:big/model}") and e["response"]["status"] == 206
            ]
            assert len(ranges) == 4, ranges
            blob_files_match(server.models_dir, models.big)
            # the blob crossed from the registry once, whatever the client's parallel parts
            assert upstream.bytes_for(models.big.model_layer.hex) <= models.big.model_layer.size * 1.05
            scene.save()


def test_registry_mode_with_ollama_keys(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    allowed = OllamaServer(ollama_bin, tmp_path / "allowed")
    stranger = OllamaServer(ollama_bin, tmp_path / "stranger")
    try:
        keys = tmp_path / "authorized_keys"
        keys.write_text(allowed.public_key() + "\n")
        security = {"registry_access": "keys", "registry_authorized_keys": str(keys)}
        mirror = mirror_factory(upstream_url=real_registry.url, config={"security": security})
        with RecordingProxy(mirror.url) as recorder:
            scene = Scene(
                "registry-keys",
                "security.registry_access=keys: a pull signed with an authorized ~/.ollama/id_ed25519, then "
                "one with a key the mirror does not know",
                {"mirror": {"security": {"registry_access": "keys"}}, "keys": True},
                bindings_for(recorder.host, models),
                ollama_bin,
            )
            name = f"{recorder.host}/library/tiny"
            assert "success" in ok(allowed.cli("pull", "--insecure", name))
            exchanges = scene.phase("pull with an authorized key", recorder, key="authorized")
            assert [e["response"]["status"] for e in exchanges][:3] == [401, 200, 200]  # challenge, token
            blob_files_match(allowed.models_dir, models.tiny)

            refused = stranger.cli("pull", "--insecure", name)
            text = plain_text(refused.stdout + refused.stderr)
            assert refused.returncode != 0
            assert "is not authorized on this mirror" in text and "id_ed25519.pub" in text, text
            assert "{" not in text.splitlines()[-1]  # words, not a JSON document
            scene.phase("pull with a key the mirror does not know", recorder, key="unknown")
            scene.save()
    finally:
        allowed.cleanup()
        stranger.cleanup()


# --- API mode and inference ----------------------------------------------------------------------


def test_api_mode_pull_list_show_rm(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    """``OLLAMA_HOST=MIRROR ollama ...`` on a cache-only mirror (no backend Ollama running)."""
    mirror = mirror_factory(
        upstream_url=real_registry.url, config={"backend": {"url": f"http://127.0.0.1:{free_port()}"}}
    )
    home = tmp_path / "home"
    home.mkdir()
    with RecordingProxy(mirror.url) as recorder:
        scene = Scene(
            "api-mode",
            "OLLAMA_HOST=MIRROR ollama pull|list|show|rm against a mirror without a backend Ollama",
            {"mirror": {}, "backend": "none"},
            bindings_for(recorder.host, models),
            ollama_bin,
        )

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli(ollama_bin, recorder.host, home, *args)

        assert "success" in ok(cli("pull", "tiny"))
        scene.phase("ollama pull tiny", recorder)
        listed = ok(cli("list"))
        assert "tiny:latest" in listed and models.tiny.manifest_hex[:12] in listed
        scene.phase("ollama list", recorder)
        shown = ok(cli("show", "tiny"))
        assert "llama" in shown and "256" in shown
        scene.phase("ollama show tiny", recorder)
        removed = ok(cli("rm", "tiny"))
        assert "deleted 'tiny'" in removed and "Warning" not in removed, removed
        scene.phase("ollama rm tiny", recorder)
        assert "tiny" not in ok(cli("list"))
        assert not (mirror.cache_dir / "manifests" / "registry.ollama.ai" / "library" / "tiny").exists()
        missing = cli("pull", "no-such-model")
        assert missing.returncode != 0
        assert "file does not exist" in plain_text(missing.stdout + missing.stderr)
        scene.phase("ollama list, then ollama pull of an unknown model", recorder)
        scene.save()


def test_ollama_run_through_the_mirror_streams_tokens(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    """A real ``ollama serve`` on the mirror's cache is the backend; ``ollama run`` goes through the mirror."""
    backend = OllamaServer(
        ollama_bin,
        tmp_path / "backend",
        models_dir=tmp_path / "cache",
        env={"OLLAMA_NOPRUNE": "1"},
        start=False,
    )
    mirror = mirror_factory(
        upstream_url=real_registry.url, cache_dir=tmp_path / "cache", config={"backend": {"url": backend.url}}
    )
    backend.start()
    home = tmp_path / "home"
    home.mkdir()
    try:
        with RecordingProxy(mirror.url) as recorder:
            scene = Scene(
                "inference",
                "ollama run tiny through the mirror, whose backend is an ollama serve on the mirror's cache",
                {"mirror": {}, "backend": "stand-in"},
                bindings_for(recorder.host, models),
                ollama_bin,
            )
            ok(run_cli(ollama_bin, recorder.host, home, "pull", "tiny"))
            scene.phase("ollama pull tiny", recorder)
            answer = ok(run_cli(ollama_bin, recorder.host, home, "run", "tiny", "hello"))
            words = {"hello", "world", "mirror", "cache", "blob", "pull", "model", "fast", "disk", "bytes"}
            assert any(word in answer for word in words), answer
            scene.phase('ollama run tiny "hello"', recorder)
            scene.save()
        # the stream comes through as it is made: many lines, the last one done
        connection = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=60)
        body = json.dumps({"model": "tiny", "prompt": "hello", "options": {"num_predict": 16}})
        connection.request("POST", "/api/generate", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type") == "application/x-ndjson"
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
        assert len(lines) == 17 and lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
        assert all(not line["done"] and line["response"] for line in lines[:-1])
    finally:
        backend.cleanup()


# --- resume, parts, fleets -----------------------------------------------------------------------


def _pull_in_background(server: OllamaServer, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [server.binary, "pull", "--insecure", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**server.environment(), "OLLAMA_HOST": server.host},
    )


def test_a_pull_resumes_after_the_puller_is_killed_mid_blob(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    blob = models.big.model_layer
    with FaultProxy(real_registry.url) as upstream:
        upstream.throttle(THROTTLE, path="/blobs/")
        mirror = mirror_factory(upstream_url=upstream.url)
        server = OllamaServer(ollama_bin, tmp_path / "ollama")
        try:
            name = f"{mirror.host}/library/big"
            puller = _pull_in_background(server, name)
            wait_until(
                lambda: upstream.bytes_for(blob.hex) > blob.size // 3, 60, "a third of the blob upstream"
            )
            server.kill()  # the Ollama server doing the pull dies, with its parts half written
            puller.wait(timeout=30)
            server.start()
            assert "success" in ok(server.cli("pull", "--insecure", name, timeout=300))
            blob_files_match(server.models_dir, models.big)
            fetched = upstream.bytes_for(blob.hex) / blob.size
            print(f"puller killed mid-blob: upstream sent {fetched:.2f}x the blob")
            assert fetched <= 1.05  # the mirror went on alone, once
        finally:
            server.cleanup()


def test_a_pull_resumes_after_the_mirror_is_killed_mid_blob(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    blob = models.big.model_layer
    with FaultProxy(real_registry.url) as upstream:
        upstream.throttle(THROTTLE, path="/blobs/")
        mirror = mirror_factory(upstream_url=upstream.url)
        server = OllamaServer(ollama_bin, tmp_path / "ollama")
        try:
            name = f"{mirror.host}/library/big"
            puller = _pull_in_background(server, name)
            wait_until(lambda: upstream.bytes_for(blob.hex) > blob.size // 2, 60, "half the blob upstream")
            mirror.kill()
            time.sleep(1)
            mirror.start()
            output = puller.communicate(timeout=300)[0]
            retried = puller.returncode != 0
            if retried:  # the client gave up while the mirror was away: pull again
                assert "success" in ok(server.cli("pull", "--insecure", name, timeout=300)), output
            blob_files_match(server.models_dir, models.big)
            fetched = upstream.bytes_for(blob.hex) / blob.size
            print(f"mirror killed mid-blob: upstream sent {fetched:.2f}x the blob; pulled again: {retried}")
            assert fetched < 1.5  # the restarted mirror resumed from the chunks it had verified
        finally:
            server.cleanup()


def test_sixteen_parallel_parts_on_a_cold_blob_while_it_fills(
    ollama_bin: str, real_registry: RegistryProcess, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    huge = push_model(
        real_registry.url,
        "library/huge",
        "latest",
        build_model(tmp_path / "huge", size=SIXTEEN_PARTS_SIZE, seed=16, name="huge", fill="zeros"),
    )
    blob = huge.model_layer
    mirror = mirror_factory(upstream_url=real_registry.url)
    server = OllamaServer(ollama_bin, tmp_path / "ollama")
    try:
        with RecordingProxy(mirror.url) as recorder:
            assert "success" in ok(
                server.cli("pull", "--insecure", f"{recorder.host}/library/huge", timeout=900)
            )
            parts = [
                e
                for e in recorder.take()
                if e.target.endswith(blob.digest) and e.method == "GET" and "range" in e.request_headers
            ]
        assert len({e.request_headers["range"] for e in parts}) == 16
        assert {e.status for e in parts} == {206}
        assert all(e.response_headers.get("x-mirror-cache") == "fill" for e in parts)
        assert max(e.started for e in parts) < min(e.ended for e in parts)  # all 16 at once
        assert sha256_file(server.models_dir / "blobs" / blob.cache_name) == blob.hex
    finally:
        server.cleanup()


def test_a_fleet_of_32_ollama_servers_behind_one_address_on_default_settings(
    ollama_bin: str, real_registry: RegistryProcess, mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    """32 real Ollama servers on 127.0.0.1 pull one model at once from a mirror on its default
    settings (the rate limit on, as shipped): every one of them succeeds."""
    fleet_model = push_model(
        real_registry.url, "library/fleet", "latest", build_model(tmp_path / "fleet", size=24 * MiB, seed=32)
    )
    defaults = SecurityConfig()
    mirror = mirror_factory(
        upstream_url=real_registry.url,
        config={"security": {"rate_limit_requests": defaults.rate_limit_requests}},
    )
    servers: list[OllamaServer] = []
    starters = [
        threading.Thread(target=lambda i=i: servers.append(OllamaServer(ollama_bin, tmp_path / f"o{i}")))
        for i in range(32)
    ]
    try:
        for thread in starters:
            thread.start()
        for thread in starters:
            thread.join()
        assert len(servers) == 32
        results: dict[int, subprocess.CompletedProcess[str]] = {}

        def pull(i: int, server: OllamaServer) -> None:
            results[i] = server.cli("pull", "--insecure", f"{mirror.host}/library/fleet", timeout=300)

        pullers = [threading.Thread(target=pull, args=(i, s)) for i, s in enumerate(servers)]
        for thread in pullers:
            thread.start()
        for thread in pullers:
            thread.join()
        failed = {i: plain_text(r.stdout + r.stderr)[-300:] for i, r in results.items() if r.returncode}
        assert not failed, failed
        for server in servers:
            blob_files_match(server.models_dir, fleet_model)
    finally:
        for server in servers:
            server.cleanup()


def test_a_cluster_node_sends_ollamas_blob_reads_to_the_shared_storage(
    ollama_bin: str,
    real_registry: RegistryProcess,
    models: Models,
    mirror_factory: MirrorFactory,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    storage = {
        "storage_url": f"s3://{s3_server.bucket}/ollama-{free_port()}",
        "s3_endpoint": s3_server.endpoint,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
    }
    with FaultProxy(real_registry.url) as upstream:
        first = mirror_factory(upstream_url=upstream.url, config={"cluster": storage})
        with OllamaServer(ollama_bin, tmp_path / "warm") as server:
            assert "success" in ok(server.cli("pull", "--insecure", f"{first.host}/library/big"))
        # the storage by another host name than the mirror's: Ollama reads from it what the 307 names
        elsewhere = {**storage, "s3_endpoint": s3_server.endpoint.replace("127.0.0.1", "localhost")}
        second = mirror_factory(
            upstream_url=upstream.url, config={"cluster": {**elsewhere, "redirect_to_storage": True}}
        )
        layer = models.big.model_layer
        prefix = storage["storage_url"].split("/", 3)[3]
        manifest = f"/{s3_server.bucket}/{prefix}/manifests/registry.ollama.ai/library/big/latest"
        wait_until(lambda: s3_server.request("HEAD", manifest).status == 200, 60.0, "the model shared")
        fetched = upstream.bytes_for(layer.hex)
        with OllamaServer(ollama_bin, tmp_path / "redirected") as server:
            assert "success" in ok(server.cli("pull", "--insecure", f"{second.host}/library/big"))
            blob_files_match(server.models_dir, models.big)
        assert not list((second.cache_dir / "blobs").glob("sha256-*"))  # no blob went through the node
        assert upstream.bytes_for(layer.hex) == fetched


def test_ollama_push_to_a_private_namespace_and_pull_it_elsewhere(
    ollama_bin: str,
    real_registry: RegistryProcess,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    fresh = build_model(tmp_path / "fresh", size=250 * MiB, seed=99, name="fresh")  # 3 parts of 100 MB
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {fresh.model_layer.path}\nSYSTEM You were pushed to a mirror.\n")
    with FaultProxy(real_registry.url) as upstream, OllamaServer(ollama_bin, tmp_path / "pusher") as pusher:
        keys = tmp_path / "push_keys"
        keys.write_text(f'namespaces="team" {pusher.public_key()}\n')
        private = {"namespaces": ["team", "lab-*"], "push_authorized_keys": str(keys)}
        mirror = mirror_factory(upstream_url=upstream.url, config={"private": private})
        with RecordingProxy(mirror.url) as recorder:
            name = f"{recorder.host}/team/mymodel:v1"
            ok(pusher.cli("create", name, "-f", str(modelfile)))
            pushed = pusher.cli("push", "--insecure", name)
            assert "success" in ok(pushed)
            exchanges = recorder.take()
            print("\n" + "\n".join(f"{e.method} {e.target} -> {e.status}" for e in exchanges))
            patches = [e for e in exchanges if e.method == "PATCH"]
            assert len(patches) >= 3 and all(e.status == 202 for e in patches)
            assert upstream.records("/v2/team") == []  # a push never goes upstream
            other = f"{recorder.host}/library/mymodel:v1"
            ok(pusher.cli("cp", name, other))
            refused = pusher.cli("push", "--insecure", other)
            assert refused.returncode != 0 and "not private on this mirror" in plain_text(refused.stderr)
        with OllamaServer(ollama_bin, tmp_path / "puller") as puller:
            assert "success" in ok(puller.cli("pull", "--insecure", f"{mirror.host}/team/mymodel:v1"))
            shown = ok(puller.cli("show", f"{mirror.host}/team/mymodel:v1", "--system"))
            assert "You were pushed to a mirror." in shown
            pushed_manifest = next(pusher.models_dir.glob("manifests/*/team/mymodel/v1"))
            layers = json.loads(pushed_manifest.read_bytes())["layers"]
            assert max(layer["size"] for layer in layers) > 250 * MiB
            for layer in layers:  # every layer, byte for byte what was pushed
                hexdigest = layer["digest"].removeprefix("sha256:")
                assert sha256_file(puller.models_dir / "blobs" / f"sha256-{hexdigest}") == hexdigest
        with urllib.request.urlopen(f"{mirror.url}/api/tags", timeout=10) as answer:
            tags = json.load(answer)
        assert "team/mymodel:v1" in [m["name"] for m in tags["models"]]
        assert upstream.records("/v2/team") == []


def test_ollama_push_of_a_small_model_as_recorded_for_ci(
    ollama_bin: str,
    real_registry: RegistryProcess,
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    """The push vector: a model small enough that every body it sends is kept (``tests/vectors``)."""
    mine = build_model(tmp_path / "mine", size=8 * 1024, seed=41, name="mine")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {mine.model_layer.path}\nSYSTEM Kept on the mirror.\n")
    pusher = OllamaServer(ollama_bin, tmp_path / "pusher")
    stranger = OllamaServer(ollama_bin, tmp_path / "stranger")
    puller = OllamaServer(ollama_bin, tmp_path / "puller")
    try:
        keys = tmp_path / "push_keys"
        keys.write_text(f'namespaces="team" {pusher.public_key()}\n')
        private = {"namespaces": ["team"], "push_authorized_keys": str(keys)}
        with FaultProxy(real_registry.url) as upstream:
            mirror = mirror_factory(upstream_url=upstream.url, config={"private": private})
            with RecordingProxy(mirror.url) as recorder:
                scene = Scene(
                    "registry-push",
                    "ollama push --insecure of a model made by ollama create to private.namespaces=team "
                    "(a key allowed there), again, a model made FROM it (only its new layer is sent), to a "
                    "namespace that is not private, with a key the mirror does not know; then ollama pull "
                    "of the derived model by another Ollama",
                    {
                        "models": [],
                        "mirror": {"private": {"namespaces": ["team"]}},
                        "push_keys": 'namespaces="team"',
                    },
                    Bindings(host=recorder.host),
                    ollama_bin,
                )
                name = f"{recorder.host}/team/mine:v1"
                ok(pusher.cli("create", name, "-f", str(modelfile)))
                assert "success" in ok(pusher.cli("push", "--insecure", name))
                first = scene.phase("push of a new model", recorder, key="authorized")
                methods = [(e["request"]["method"], e["response"]["status"]) for e in first]
                assert ("PATCH", 202) in methods and ("PUT", 201) in methods

                assert "success" in ok(pusher.cli("push", "--insecure", name))
                again = scene.phase("push again: the mirror has every blob", recorder, key="authorized")
                assert not [e for e in again if e["request"]["method"] == "PATCH"]

                derived = tmp_path / "Modelfile.v2"
                derived.write_text(f"FROM {name}\nSYSTEM Derived on the mirror.\n")
                ok(pusher.cli("create", f"{recorder.host}/team/mine:v2", "-f", str(derived)))
                assert "success" in ok(pusher.cli("push", "--insecure", f"{recorder.host}/team/mine:v2"))
                derived_push = scene.phase(
                    "push of a model made FROM the pushed one", recorder, key="authorized"
                )
                sent = [e for e in derived_push if e["request"]["method"] == "PATCH"]
                assert len(sent) == 1  # its new SYSTEM layer; the shared ones are found by HEAD

                public = f"{recorder.host}/library/mine:v1"
                ok(pusher.cli("cp", name, public))
                refused = pusher.cli("push", "--insecure", public)
                assert refused.returncode != 0 and "not private on this mirror" in plain_text(refused.stderr)
                scene.phase("push to a namespace that is not private", recorder, key="authorized")

                ok(stranger.cli("create", f"{recorder.host}/team/mine:v2", "-f", str(modelfile)))
                refused = stranger.cli("push", "--insecure", f"{recorder.host}/team/mine:v2")
                text = plain_text(refused.stdout + refused.stderr)
                assert refused.returncode != 0
                assert "may not push to this mirror" in text and "private.push_authorized_keys" in text, text
                scene.phase("push with a key the mirror does not know", recorder, key="unknown")

                assert "success" in ok(puller.cli("pull", "--insecure", f"{recorder.host}/team/mine:v2"))
                scene.phase("pull of the derived model by another Ollama", recorder, key="unknown")
                scene.save()
            assert upstream.records("/v2/team") == []
    finally:
        for server in (pusher, stranger, puller):
            server.cleanup()
