"""Private models (``private.namespaces``): names that live on the mirror only, never asked of an upstream.

Real parts: the distribution registry behind the counting fault proxy, and the daemon under twistd.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.helpers import UPSTREAM_SETTINGS, registry_error_code, wait_until
from tests.support.cli import run_cli
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import MiB, Response, build_model, http_request
from tests.support.ollamakey import OllamaKey, parse_challenge, token_url
from tests.support.puller import pull
from tests.support.pusher import push

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def private_mirror(mirror_factory: MirrorFactory, proxy: FaultProxy) -> MirrorDaemon:
    config = {"upstream": UPSTREAM_SETTINGS, "private": {"namespaces": ["team", "lab-*"]}}
    return mirror_factory(upstream_url=proxy.url, config=config)


def test_a_private_name_never_pushed_is_unknown_without_asking_any_upstream(
    private_mirror: MirrorDaemon, proxy: FaultProxy
) -> None:
    proxy.clear_records()
    for namespace in ("team", "lab-3"):
        manifest = http_request("GET", f"{private_mirror.url}/v2/{namespace}/mymodel/manifests/latest")
        assert manifest.status == 404 and registry_error_code(manifest) == "MANIFEST_UNKNOWN"
        by_digest = http_request("GET", f"{private_mirror.url}/v2/{namespace}/mymodel/manifests/{DIGEST}")
        assert by_digest.status == 404 and registry_error_code(by_digest) == "MANIFEST_UNKNOWN"
        for method in ("HEAD", "GET"):
            blob = http_request(method, f"{private_mirror.url}/v2/{namespace}/mymodel/blobs/{DIGEST}")
            assert blob.status == 404
        pulled = http_request(
            "POST",
            f"{private_mirror.url}/api/pull",
            body=json.dumps({"model": f"{namespace}/mymodel", "stream": False}).encode(),
        )
        assert "file does not exist" in pulled.json()["error"]  # (Ollama's own answer to an unknown model)
    assert proxy.records() == []  # not one request upstream
    public = http_request("GET", f"{private_mirror.url}/v2/other/mymodel/manifests/latest")
    assert public.status == 404 and proxy.records()  # (a namespace that is not private is asked upstream)


# --- pushes, request by request, as Ollama sends them (server/upload.go) ---------------------------


def token(mirror: MirrorDaemon, key: OllamaKey, repository: str) -> Response:
    """The token request Ollama makes after a 401 on a push: signed with its key, scope push,pull."""
    challenge = http_request("POST", f"{mirror.url}/v2/{repository}/blobs/uploads/")
    assert challenge.status == 401, challenge
    url = token_url(parse_challenge(challenge.header("www-authenticate")))
    assert "push%2Cpull" in url
    return http_request("GET", url, headers={"Authorization": key.token_request_authorization(url)})


def bearer(mirror: MirrorDaemon, key: OllamaKey, repository: str) -> dict[str, str]:
    answer = token(mirror, key, repository)
    assert answer.status == 200, answer.body
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def push_blob(
    mirror: MirrorDaemon, auth: dict[str, str], repository: str, data: bytes, parts: int = 3
) -> str:
    """POST, PATCH each part with Content-Range, PUT ?digest=: the blob's digest."""
    started = http_request("POST", f"{mirror.url}/v2/{repository}/blobs/uploads/", headers=auth)
    assert started.status == 202 and started.header("docker-upload-uuid"), started
    location = started.header("location")
    assert location.startswith("http://127.0.0.1:")  # absolute: Ollama uses it as given
    step = -(-len(data) // parts)
    for offset in range(0, len(data), step):
        piece = data[offset : offset + step]
        headers = {**auth, "Content-Type": "application/octet-stream", "X-Redirect-Uploads": "1"}
        headers["Content-Range"] = f"{offset}-{offset + len(piece) - 1}"
        answered = http_request("PATCH", location, headers=headers, body=piece)
        assert answered.status == 202, answered
        location = answered.header("location")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    committed = http_request("PUT", f"{location}?digest={digest}&etag=x-1", headers=auth)
    assert committed.status == 201, committed
    return digest


def manifest_of(config: str, config_size: int, layer: str, layer_size: int) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": config,
                "size": config_size,
            },
            "layers": [
                {"mediaType": "application/vnd.ollama.image.model", "digest": layer, "size": layer_size}
            ],
        }
    ).encode()


@pytest.fixture
def pusher_key() -> OllamaKey:
    return OllamaKey("pusher@test")


@pytest.fixture
def push_mirror(
    mirror_factory: MirrorFactory, proxy: FaultProxy, pusher_key: OllamaKey, tmp_path: Path
) -> MirrorDaemon:
    keys = tmp_path / "push_keys"
    keys.write_text(f'namespaces="team" {pusher_key.public_line()}\n# a comment\n')
    private = {"namespaces": ["team", "lab-*"], "push_authorized_keys": str(keys), "max_size_gb": 0.05}
    return mirror_factory(upstream_url=proxy.url, config={"upstream": UPSTREAM_SETTINGS, "private": private})


def test_a_model_pushed_part_by_part_is_served_and_listed_and_never_sent_upstream(
    push_mirror: MirrorDaemon, pusher_key: OllamaKey, proxy: FaultProxy
) -> None:
    proxy.clear_records()
    auth = bearer(push_mirror, pusher_key, "team/mine")
    weights, config = os.urandom(3 * MiB + 5), json.dumps({"model_format": "gguf"}).encode()
    layer = push_blob(push_mirror, auth, "team/mine", weights)
    config_digest = push_blob(push_mirror, auth, "team/mine", config, parts=1)
    manifest = manifest_of(config_digest, len(config), layer, len(weights))
    put = http_request(
        "PUT",
        f"{push_mirror.url}/v2/team/mine/manifests/v1",
        headers={**auth, "Content-Type": "application/vnd.docker.distribution.manifest.v2+json"},
        body=manifest,
    )
    assert (
        put.status == 201
        and put.header("docker-content-digest") == "sha256:" + hashlib.sha256(manifest).hexdigest()
    )
    got = http_request("GET", f"{push_mirror.url}/v2/team/mine/manifests/v1")
    assert got.status == 200 and got.body == manifest
    blob = http_request("GET", f"{push_mirror.url}/v2/team/mine/blobs/{layer}")
    assert blob.status == 200 and blob.body == weights
    tags = http_request("GET", f"{push_mirror.url}/api/tags").json()
    assert "team/mine:v1" in [m["name"] for m in tags["models"]]
    mounted = http_request(
        "POST",
        f"{push_mirror.url}/v2/team/other/blobs/uploads/?mount={layer}&from=team/mine",
        headers=bearer(push_mirror, pusher_key, "team/other"),
    )
    assert mounted.status == 201 and mounted.header("docker-content-digest") == layer
    assert [r for r in proxy.records() if r.path != "/v2/"] == []  # nothing of it went upstream
    removed = http_request(
        "DELETE", f"{push_mirror.url}/api/delete", body=json.dumps({"model": "team/mine:v1"}).encode()
    )
    assert removed.status == 200
    assert http_request("GET", f"{push_mirror.url}/v2/team/mine/manifests/v1").status == 404


def test_what_may_not_be_pushed_is_refused_before_any_byte_is_kept(
    push_mirror: MirrorDaemon, pusher_key: OllamaKey
) -> None:
    public = http_request("POST", f"{push_mirror.url}/v2/library/mine/blobs/uploads/")
    assert public.status == 403 and "namespace library is not private on this mirror" in public.body.decode()
    stranger = token(push_mirror, OllamaKey("stranger@test"), "team/mine")
    assert stranger.status == 401 and "private.push_authorized_keys" in stranger.body.decode()
    elsewhere = token(push_mirror, pusher_key, "lab-1/mine")  # private, but not this key's namespace
    assert elsewhere.status == 403 and "may push only to team" in elsewhere.body.decode()

    auth = bearer(push_mirror, pusher_key, "team/mine")
    started = http_request("POST", f"{push_mirror.url}/v2/team/mine/blobs/uploads/", headers=auth)
    location = started.header("location")
    part = http_request("PATCH", location, headers={**auth, "Content-Range": "0-9"}, body=b"0123456789")
    assert part.status == 202
    wrong = "sha256:" + "0" * 64
    bad = http_request("PUT", f"{part.header('location')}?digest={wrong}", headers=auth)
    assert bad.status == 400 and registry_error_code(bad) == "DIGEST_INVALID"
    assert not (push_mirror.cache_dir / "blobs" / ("sha256-" + "0" * 64)).exists()
    assert list((push_mirror.cache_dir / ".mirror" / "uploads").iterdir()) == []
    unknown = manifest_of(wrong, 10, wrong, 10)
    refused = http_request("PUT", f"{push_mirror.url}/v2/team/mine/manifests/v1", headers=auth, body=unknown)
    assert refused.status == 400 and registry_error_code(refused) == "MANIFEST_BLOB_UNKNOWN"
    missing_mount = http_request(
        "POST", f"{push_mirror.url}/v2/team/mine/blobs/uploads/?mount={wrong}&from=team/x", headers=auth
    )
    assert missing_mount.status == 202  # (a session instead: Ollama then uploads it)
    too_big = http_request("POST", f"{push_mirror.url}/v2/team/mine/blobs/uploads/", headers=auth)
    over = http_request(
        "PATCH",
        too_big.header("location"),
        headers={**auth, "Content-Range": f"0-{60 * MiB - 1}"},
        body=b"x" * (60 * MiB),
    )
    assert over.status == 403 and "private.max_size_gb" in over.body.decode()


def cut_off_patch(location: str, auth: dict[str, str], data: bytes, sent: int) -> None:
    """A PATCH whose connection dies after *sent* of its bytes (a client killed, a network cut)."""
    parts = urlsplit(location)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = (
            f"PATCH {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(data)}\r\n"
            f"Content-Range: 0-{len(data) - 1}\r\nAuthorization: {auth['Authorization']}\r\n\r\n"
        )
        sock.sendall(head.encode() + data[:sent])
        time.sleep(0.3)


def test_a_part_cut_off_midway_can_be_sent_again_and_a_killed_daemon_publishes_nothing(
    push_mirror: MirrorDaemon, pusher_key: OllamaKey
) -> None:
    auth = bearer(push_mirror, pusher_key, "team/mine")
    data = os.urandom(2 * MiB)
    started = http_request("POST", f"{push_mirror.url}/v2/team/mine/blobs/uploads/", headers=auth)
    location = started.header("location")
    cut_off_patch(location, auth, data, MiB)
    again = http_request(
        "PATCH", location, headers={**auth, "Content-Range": f"0-{len(data) - 1}"}, body=data
    )
    assert again.status == 202, again  # (the cut-off part was undone: it starts at 0 again)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert http_request("PUT", f"{again.header('location')}?digest={digest}", headers=auth).status == 201

    other = os.urandom(2 * MiB)
    started = http_request("POST", f"{push_mirror.url}/v2/team/mine/blobs/uploads/", headers=auth)
    http_request(
        "PATCH",
        started.header("location"),
        headers={**auth, "Content-Range": f"0-{MiB - 1}"},
        body=other[:MiB],
    )
    push_mirror.kill()  # mid-upload
    uploads = push_mirror.cache_dir / ".mirror" / "uploads"
    assert list(uploads.iterdir())  # (the unfinished upload's file)
    push_mirror.start()
    wait_until(lambda: not list(uploads.iterdir()), 10.0, "the unfinished upload removed at start")
    assert not (push_mirror.cache_dir / "blobs" / ("sha256-" + hashlib.sha256(other).hexdigest())).exists()
    assert (push_mirror.cache_dir / "blobs" / ("sha256-" + digest.removeprefix("sha256:"))).exists()


# --- whole pushes, as the Go Ollama server makes them (tests.support.pusher), then pulled back ---------


def test_a_push_as_ollama_makes_it_then_a_pull_as_ollama_makes_it(
    push_mirror: MirrorDaemon, pusher_key: OllamaKey, proxy: FaultProxy, tmp_path: Path
) -> None:
    model = build_model(tmp_path / "models", size=6 * MiB, seed=31, name="pushed")
    proxy.clear_records()
    first = push(
        push_mirror.url, "team/pushed", "v1", model, key=pusher_key, part_size_min=MiB, part_size_max=2 * MiB
    )
    assert first.manifest_status == 201 and first.token_requests >= 1
    patches = first.requests_for(method="PATCH")
    assert len(patches) >= 3 and all(r.status == 202 for r in patches)  # the model layer in parts
    assert set(first.uploaded) == {blob.digest for blob in model.blobs}

    again = push(push_mirror.url, "team/pushed", "v1", model, key=pusher_key)
    assert again.uploaded == [] and set(again.skipped) == {blob.digest for blob in model.blobs}
    derived = push(  # a model created FROM it: Ollama mounts the layers it shares
        push_mirror.url,
        "team/derived",
        "v1",
        model,
        key=pusher_key,
        from_names={model.model_layer.digest: "team/pushed:v1"},
    )
    assert derived.manifest_status == 201

    pulled = pull(
        push_mirror.url, "team/pushed", "v1", tmp_path / "puller", part_size_min=MiB, part_size_max=2 * MiB
    )
    assert {digest for digest, _, _ in pulled.blobs} == {
        blob.digest for blob in model.blobs
    }  # (sha256 checked)
    assert [r for r in proxy.records() if r.path != "/v2/"] == []  # nothing of it upstream


def test_a_pushed_model_is_shown_like_any_other_and_removed_only_on_purpose(
    push_mirror: MirrorDaemon, pusher_key: OllamaKey, tmp_path: Path
) -> None:
    model = build_model(tmp_path / "models", size=2 * MiB, seed=33, name="shown")
    assert push(push_mirror.url, "team/shown", "v1", model, key=pusher_key).manifest_status == 201
    shown = http_request("POST", f"{push_mirror.url}/api/show", body=b'{"model": "team/shown:v1"}')
    assert shown.status == 200 and "template" in shown.json()
    stats = http_request("GET", f"{push_mirror.url}/mirror/stats").json()
    listed = {m["name"]: m for m in stats["models"]}
    assert listed["team/shown:v1"]["size"] == model.total_size
    metrics = http_request("GET", f"{push_mirror.url}/metrics").body.decode()
    assert f"ollama_mirror_cached_models {float(stats['cached_models'])}" in metrics
    ls = run_cli("ls", "--json", "--cache-dir", str(push_mirror.cache_dir))
    assert ls.returncode == 0, ls.stderr
    assert "team/shown:v1" in [m["name"] for m in json.loads(ls.stdout)["models"]]

    removed = run_cli("rm", "team/shown:v1", "--mirror", push_mirror.url)
    assert removed.returncode == 0, removed.stderr
    tags = http_request("GET", f"{push_mirror.url}/api/tags").json()
    assert "team/shown:v1" not in [m["name"] for m in tags["models"]]
    assert http_request("GET", f"{push_mirror.url}/v2/team/shown/manifests/v1").status == 404


def test_a_pushed_model_travels_in_an_export_bundle(
    push_mirror: MirrorDaemon,
    pusher_key: OllamaKey,
    mirror_factory: MirrorFactory,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    model = build_model(tmp_path / "models", size=2 * MiB, seed=32, name="travels")
    push(push_mirror.url, "team/travels", "v1", model, key=pusher_key, part_size_min=MiB, part_size_max=MiB)
    push_mirror.stop()
    bundle = tmp_path / "team.tar"
    exported = run_cli(
        "export", "team/travels:v1", "-o", str(bundle), "--cache-dir", str(push_mirror.cache_dir)
    )
    assert exported.returncode == 0, exported.stderr
    site = tmp_path / "site"
    imported = run_cli("import", str(bundle), "--cache-dir", str(site))
    assert imported.returncode == 0, imported.stderr
    config = {"upstream": UPSTREAM_SETTINGS, "private": {"namespaces": ["team"]}}
    elsewhere = mirror_factory(upstream_url=proxy.url, config=config, cache_dir=site)
    pulled = pull(elsewhere.url, "team/travels", "v1", tmp_path / "puller")
    assert {digest for digest, _, _ in pulled.blobs} == {blob.digest for blob in model.blobs}


def test_a_push_whose_requests_reach_different_worker_processes(
    mirror_factory: MirrorFactory, proxy: FaultProxy, pusher_key: OllamaKey, tmp_path: Path
) -> None:
    keys = tmp_path / "push_keys"
    keys.write_text(pusher_key.public_line() + "\n")
    config = {
        "server": {"workers": 2},
        "upstream": UPSTREAM_SETTINGS,
        "private": {"namespaces": ["team"], "push_authorized_keys": str(keys)},
        "security": {"signing_secret": "a-secret-every-worker-shares-for-tokens"},
    }
    mirror = mirror_factory(upstream_url=proxy.url, config=config)
    for seed in (51, 52, 53):  # (a new connection per request: the kernel spreads them over the workers)
        model = build_model(tmp_path / f"models{seed}", size=4 * MiB, seed=seed, name=f"w{seed}")
        pushed = push(
            mirror.url, f"team/w{seed}", "v1", model, key=pusher_key, part_size_min=MiB, part_size_max=MiB
        )
        assert pushed.manifest_status == 201
        pulled = pull(mirror.url, f"team/w{seed}", "v1", tmp_path / f"puller{seed}")
        assert {digest for digest, _, _ in pulled.blobs} == {blob.digest for blob in model.blobs}
    assert not [p for p in (mirror.cache_dir / ".mirror" / "uploads").iterdir()]


def test_an_oci_tool_pushes_with_an_api_key_and_pulls_it_back(
    mirror_factory: MirrorFactory, proxy: FaultProxy, tmp_path: Path
) -> None:
    import oras.client  # type: ignore[import-untyped]

    api_key = "an-operators-api-key"
    config = {
        "upstream": UPSTREAM_SETTINGS,
        "private": {"namespaces": ["team"]},
        "security": {"api_key": api_key, "signing_secret": "a-secret-for-the-tokens-of-this-test"},
    }
    mirror = mirror_factory(upstream_url=proxy.url, config=config)
    artifact = tmp_path / "weights.bin"
    artifact.write_bytes(os.urandom(3 * MiB + 17))
    client = oras.client.OrasClient(hostname=mirror.host, insecure=True)
    client.login(username="operator", password=api_key, hostname=mirror.host)
    target = f"{mirror.host}/team/artifact:v1"
    pushed = client.push(files=[str(artifact)], target=target, disable_path_validation=True)
    assert pushed.status_code in (200, 201), pushed.text
    outdir = tmp_path / "pulled"
    files = client.pull(target=target, outdir=str(outdir))
    assert [Path(f).read_bytes() for f in files] == [artifact.read_bytes()]

    challenge = http_request("POST", f"{mirror.url}/v2/team/other/blobs/uploads/")
    url = token_url(parse_challenge(challenge.header("www-authenticate")))
    wrong = base64.b64encode(b"someone:not-the-key").decode()
    refused = http_request("GET", url, headers={"Authorization": f"Basic {wrong}"})
    assert refused.status == 401 and "not an API key of this mirror" in refused.body.decode()
    assert [r for r in proxy.records() if "/team/" in r.path] == []
