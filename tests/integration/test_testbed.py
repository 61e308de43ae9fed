"""The test bed itself: the registry holds real models and behaves as protocol.md says; the daemon starts.

These double as documentation of how the CNCF distribution registry (our stand-in upstream) answers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest

from tests.support.daemon import DaemonStartError, MirrorDaemon, MirrorFactory
from tests.support.models import (
    CONFIG_V1,
    MANIFEST_V2,
    MEDIA_LICENSE,
    MEDIA_MODEL,
    MEDIA_PARAMS,
    MEDIA_TEMPLATE,
    MiB,
    ModelFactory,
    PushedModel,
    build_model,
    get_manifest,
    http_request,
    make_gguf,
    push_model,
)
from tests.support.registry import RegistryProcess


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while piece := fh.read(MiB):
            sha.update(piece)
    return "sha256:" + sha.hexdigest()


def field_value(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


# --- (a) manifests ------------------------------------------------------------------------------


def test_registry_serves_manifest_bytes_verbatim(small_model: PushedModel) -> None:
    response = get_manifest(small_model.registry_url, small_model.repo, small_model.tag)
    assert response.status == 200
    assert response.body == small_model.manifest
    assert response.header("docker-content-digest") == "sha256:" + hashlib.sha256(response.body).hexdigest()
    assert response.header("docker-content-digest") == small_model.digest
    assert response.header("content-type") == MANIFEST_V2
    assert response.header("content-length") == str(len(small_model.manifest))


def test_manifest_is_what_ollama_create_writes(small_model: PushedModel) -> None:
    manifest = json.loads(small_model.manifest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MANIFEST_V2
    assert manifest["config"] == small_model.config.descriptor()
    assert manifest["config"]["mediaType"] == CONFIG_V1
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        MEDIA_MODEL,
        MEDIA_TEMPLATE,
        MEDIA_LICENSE,
        MEDIA_PARAMS,
    ]
    assert b" " not in small_model.manifest  # compact, like Go's json.Marshal
    config = json.loads(small_model.config.read_bytes())
    assert config["model_format"] == "gguf"
    assert config["model_family"] == "llama"
    assert config["model_families"] == ["llama"]
    assert config["file_type"] == "F16"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [blob.digest for blob in small_model.layers]}
    assert small_model.total_size == sum(d["size"] for d in [manifest["config"], *manifest["layers"]])
    for blob in small_model.blobs:
        assert sha256_file(blob.path) == blob.digest
        assert blob.path.stat().st_size == blob.size
        assert blob.path.name == blob.cache_name


# --- (b) the Accept header ----------------------------------------------------------------------


def test_manifest_by_tag_without_v2_accept_is_400(small_model: PushedModel) -> None:
    """The mirror must send ``Accept: application/vnd.docker.distribution.manifest.v2+json`` upstream."""
    response = get_manifest(small_model.registry_url, small_model.repo, small_model.tag, accept=None)
    assert response.status == 400
    assert response.json()["errors"][0]["code"] == "MANIFEST_INVALID"
    # By digest the registry does not care about Accept.
    by_digest = get_manifest(small_model.registry_url, small_model.repo, small_model.digest, accept=None)
    assert by_digest.status == 200
    assert by_digest.body == small_model.manifest


def test_unknown_manifest_and_blob_are_404(registry: RegistryProcess, small_model: PushedModel) -> None:
    missing_tag = get_manifest(registry.url, small_model.repo, "no-such-tag")
    assert missing_tag.status == 404
    assert missing_tag.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    missing_repo = get_manifest(registry.url, "library/no-such-model", "latest")
    assert missing_repo.status == 404
    assert missing_repo.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    missing_blob = http_request("GET", small_model.blob_url("sha256:" + "0" * 64))
    assert missing_blob.status == 404
    assert missing_blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    # A blob stored for one repository is unknown to the others.
    digest = small_model.model_layer.digest
    other_repo = http_request("HEAD", f"{registry.url}/v2/library/other/blobs/{digest}")
    assert other_repo.status == 404


# --- (c) blobs and ranges -----------------------------------------------------------------------


def test_blob_head_and_get(small_model: PushedModel) -> None:
    blob = small_model.model_layer
    head = http_request("HEAD", small_model.blob_url(blob.digest))
    assert head.status == 200
    assert head.header("content-length") == str(blob.size)
    assert head.header("docker-content-digest") == blob.digest
    get = http_request("GET", small_model.blob_url(blob.digest))
    assert get.status == 200
    assert get.body == blob.read_bytes()
    assert "location" not in get.headers  # filesystem storage serves bytes directly, no redirect


def test_ranged_blob_get_is_206(small_model: PushedModel) -> None:
    blob = small_model.model_layer
    url = small_model.blob_url(blob.digest)
    response = http_request("GET", url, headers={"Range": "bytes=100-1123"})
    assert response.status == 206
    assert response.header("content-range") == f"bytes 100-1123/{blob.size}"
    assert response.body == blob.read_range(100, 1123)
    open_ended = http_request("GET", url, headers={"Range": f"bytes={blob.size - 10}-"})
    assert open_ended.status == 206
    assert open_ended.body == blob.read_range(blob.size - 10, blob.size - 1)


def test_unsatisfiable_range_is_416_with_a_lying_content_length(small_model: PushedModel) -> None:
    """distribution 2.8 (Go 1.19) answers 416 but keeps ``Content-Length: <blob size>`` over a 33-byte body
    and closes the connection: an upstream client sees a truncated response, not a clean error."""
    blob = small_model.model_layer
    url = small_model.blob_url(blob.digest)
    response = http_request("GET", url, headers={"Range": f"bytes={blob.size}-"})
    assert response.status == 416
    assert response.header("content-range") == f"bytes */{blob.size}"
    assert response.body.startswith(b"invalid range")
    if response.header("content-length") == str(blob.size):
        assert response.incomplete


# --- (d) the GGUF -------------------------------------------------------------------------------


def test_gguf_layer_parses(small_model: PushedModel) -> None:
    reader = gguf.GGUFReader(small_model.model_layer.path)
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "general.name") == "tiny"
    assert field_value(reader, "llama.context_length") == 2048
    assert field_value(reader, "llama.embedding_length") == 64
    assert field_value(reader, "llama.block_count") == len(reader.tensors) - 2
    assert field_value(reader, "tokenizer.ggml.model") == "llama"
    assert field_value(reader, "general.parameter_count") == small_model.n_params
    assert sum(t.n_elements for t in reader.tensors) == small_model.n_params
    assert {t.tensor_type for t in reader.tensors} == {
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.F32,
    }
    assert 64 * 1024 <= small_model.model_layer.size < 72 * 1024


def test_make_gguf_sizes_and_seeds(tmp_path: Path) -> None:
    args = {"n_params_bytes": 40 * MiB, "context_length": 8192, "name": "big"}
    big = make_gguf(tmp_path / "big.gguf", n_params_bytes=40 * MiB, context_length=8192, name="big", seed=3)
    assert big.size == (tmp_path / "big.gguf").stat().st_size
    assert 40 * MiB <= big.size < 40 * MiB + 64 * 1024
    assert big.digest == sha256_file(tmp_path / "big.gguf")
    reader = gguf.GGUFReader(tmp_path / "big.gguf")
    assert field_value(reader, "llama.context_length") == 8192
    assert len(reader.tensors) == 2 + 3  # 40 MiB of filler in tensors of at most 16 MiB
    assert sum(t.n_bytes for t in reader.tensors) == big.tensor_bytes

    same = make_gguf(tmp_path / "same.gguf", seed=3, **args)  # type: ignore[arg-type]
    other = make_gguf(tmp_path / "other.gguf", seed=4, **args)  # type: ignore[arg-type]
    assert same.digest == big.digest
    assert other.digest != big.digest
    zeros = make_gguf(tmp_path / "zeros.gguf", n_params_bytes=4096, fill="zeros", arch="qwen2", seed=5)
    reader = gguf.GGUFReader(tmp_path / "zeros.gguf")
    assert field_value(reader, "general.architecture") == "qwen2"
    assert field_value(reader, "qwen2.context_length") == 2048
    assert zeros.digest == sha256_file(tmp_path / "zeros.gguf")


def test_models_differ_by_seed_and_share_small_blobs(model_factory: ModelFactory) -> None:
    one = model_factory("library/seeded", "one", 32 * 1024, 1)
    two = model_factory("library/seeded", "two", 32 * 1024, 2)
    assert model_factory("library/seeded", "one", 32 * 1024, 1) is one
    assert one.digest != two.digest
    assert one.model_layer.digest != two.model_layer.digest
    assert one.config.digest != two.config.digest
    assert one.layer(MEDIA_TEMPLATE).digest == two.layer(MEDIA_TEMPLATE).digest
    tags = http_request("GET", f"{one.registry_url}/v2/library/seeded/tags/list").json()
    assert sorted(tags["tags"]) == ["one", "two"]
    assert one.name == f"{one.registry_host}/library/seeded:one"
    assert one.short_name == "seeded:one"


# --- registries with auth -----------------------------------------------------------------------


def test_registry_with_basic_auth(tmp_path: Path) -> None:
    with RegistryProcess(tmp_path / "registry", basic_auth=("alice", "s3cret")) as private:
        anonymous = http_request("GET", private.url + "/v2/")
        assert anonymous.status == 401
        assert anonymous.header("www-authenticate") == 'Basic realm="test-registry"'
        model = build_model(tmp_path / "models", size=4096, seed=9)
        pushed = push_model(private.url, "team/secret", "v1", model, headers=private.auth_headers())
        assert get_manifest(private.url, "team/secret", "v1").status == 401
        response = get_manifest(private.url, "team/secret", "v1", headers=private.auth_headers())
        assert response.body == pushed.manifest


def test_registry_with_bearer_challenge(tmp_path: Path) -> None:
    """The ``silly`` provider: a Bearer challenge like registry.ollama.ai's, any Authorization accepted."""
    with RegistryProcess(tmp_path / "registry", silly_auth=("http://127.0.0.1:9/token", "test")) as silly:
        challenge = http_request("GET", silly.url + "/v2/library/tiny/manifests/latest")
        assert challenge.status == 401
        assert challenge.header("www-authenticate") == (
            'Bearer realm="http://127.0.0.1:9/token",service="test",scope="repository:library/tiny:pull"'
        )
        assert http_request("GET", silly.url + "/v2/", headers=silly.auth_headers()).status == 200


# --- the daemon ---------------------------------------------------------------------------------


def test_daemon_environment_is_clean(
    registry: RegistryProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MIRROR_PORT", "1")
    daemon = MirrorDaemon(
        tmp_path / "cache",
        registry.url,
        {"upstream": {"timeout": 5}},
        {"EXTRA": "1"},
        start=False,
        workdir=tmp_path / "mirror",
    )
    env = daemon.environment()
    assert not [name for name in env if name.startswith("OLLAMA_MIRROR_")]
    assert env["EXTRA"] == "1"
    assert env["PYTHONPATH"].split(":")[0] == str(Path(__file__).resolve().parents[2])
    config = json.loads(daemon.config_path.read_text())
    assert config["server"] == {"host": "127.0.0.1", "port": daemon.port}
    assert config["upstream"] == {"url": registry.url, "timeout": 5}
    assert config["cache"] == {"directory": str(tmp_path / "cache")}


@pytest.mark.daemon
def test_mirror_answers_head(mirror: MirrorDaemon) -> None:
    response = http_request("HEAD", mirror.url + "/")
    assert response.status == 200
    assert mirror.is_running()


@pytest.mark.daemon
def test_mirror_restarts_on_the_same_port(mirror: MirrorDaemon) -> None:
    port, first_pid = mirror.port, mirror.pid
    mirror.kill()
    assert not mirror.answers()
    mirror.restart()
    assert mirror.port == port
    assert mirror.pid != first_pid
    assert http_request("HEAD", mirror.url + "/").status == 200
    assert mirror.stop() is not None
    assert not mirror.is_running()


@pytest.mark.daemon
def test_mirror_start_failure_is_reported(mirror_factory: MirrorFactory) -> None:
    """A configuration error stops start-up at once, and the error names the bad key."""
    with pytest.raises(DaemonStartError) as raised:
        mirror_factory(config={"upstream": {"no_such_key": 1}})
    assert "upstream.no_such_key" in str(raised.value)
