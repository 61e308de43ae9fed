"""Several upstreams, TLS on both sides, transparent mode and the loop guard, with the real daemon.

A test CA (trustme) signs the mirror's certificate and that of a TLS-serving registry process. The
"transparent" tests use the name ``registry.ollama.ai`` without any DNS: the client connects to the
mirror by ``connect_to`` (as if its DNS pointed that name at the mirror), and the mirror reaches the
TLS registry fixture through its ``upstream.address`` override, verifying the certificate for the
real name against the test CA.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
import trustme

from tests.integration.helpers import UPSTREAM_HOST, UPSTREAM_SETTINGS, wait_until
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.models import (
    SMALL_MODEL_SIZE,
    KiB,
    PushedModel,
    build_model,
    http_request,
    push_model,
)
from tests.support.puller import PullError, pull
from tests.support.registry import RegistryProcess, free_port

CLIENT_TIMEOUT = 30.0
NAMES = ("registry.ollama.ai", "hf.co", "localhost", "127.0.0.1")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: the CA, the mirror's certificate and key, and the TLS registry's."""
    directory = tmp_path_factory.mktemp("pki")
    files = {"ca": directory / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for who in ("mirror", "registry"):
        issued = ca.issue_cert(*NAMES, organization_name=f"{who} test")
        files[f"{who}_cert"] = directory / f"{who}.pem"
        files[f"{who}_key"] = directory / f"{who}.key"
        issued.cert_chain_pems[0].write_to_path(str(files[f"{who}_cert"]))
        issued.private_key_pem.write_to_path(str(files[f"{who}_key"]))
    return files


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """What a client whose system trusts the organisation's CA uses."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(scope="module")
def tls_registry(
    registry: RegistryProcess, small_model: PushedModel, medium_model: PushedModel, pki: dict[str, Path]
) -> Iterator[RegistryProcess]:
    """A second registry process serving the session registry's storage over HTTPS."""
    process = RegistryProcess(
        registry.workdir.parent / "tls-registry",
        tls=(pki["registry_cert"], pki["registry_key"]),
        storage_dir=registry.storage_dir,
    )
    try:
        yield process
    finally:
        process.cleanup()


def tls_mirror(factory: MirrorFactory, pki: dict[str, Path], **config: Any) -> tuple[MirrorDaemon, int]:
    """A daemon listening by plain HTTP (for readiness) and by HTTPS with the test CA's certificate."""
    port, tls_port = free_port(), free_port()
    server = {
        "listen": [f"tcp:{port}:interface=127.0.0.1", f"ssl:{tls_port}:interface=127.0.0.1"],
        "tls_certificate": str(pki["mirror_cert"]),
        "tls_key": str(pki["mirror_key"]),
        **config.pop("server", {}),
    }
    return factory(port=port, config={"server": server, **config}), tls_port


def transparent_upstream(tls_registry: RegistryProcess, **settings: Any) -> dict[str, Any]:
    """The default upstream as in transparent mode: the real name, reached at the fixture's address."""
    return {
        **UPSTREAM_SETTINGS,
        "url": "https://registry.ollama.ai",
        "address": tls_registry.host_port,
        **settings,
    }


def served_certificate(port: int) -> str:
    """The PEM certificate the mirror presents on *port* (no verification: we only look at it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="registry.ollama.ai") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der)


def same_certificate(a: str, b: str) -> bool:
    return ssl.PEM_cert_to_DER_cert(a) == ssl.PEM_cert_to_DER_cert(b)


# --- transparent mode ------------------------------------------------------------------------------


def test_go_puller_pulls_through_https_as_registry_ollama_ai_from_a_verified_upstream(
    mirror_factory: MirrorFactory,
    pki: dict[str, Path],
    tls_registry: RegistryProcess,
    medium_model: PushedModel,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    mirror, tls_port = tls_mirror(
        mirror_factory, pki, upstream=transparent_upstream(tls_registry, ca_bundle=str(pki["ca"]))
    )
    result = pull(
        "https://registry.ollama.ai",
        medium_model.repo,
        medium_model.tag,
        tmp_path / "client",
        ssl_context=client_tls,
        connect_to={"registry.ollama.ai:443": ("127.0.0.1", tls_port)},
        part_size_min=256 * KiB,
        timeout=60,
    )
    assert result.manifest_bytes == medium_model.manifest  # verbatim, and every blob's sha256 checked
    assert result.requests and all(r.url.startswith("https://registry.ollama.ai/") for r in result.requests)
    assert len([r for r in result.requests if r.range]) > 1  # the parallel ranged GETs, over TLS too
    assert "GET /v2/library/medium/manifests/latest" in tls_registry.log_text()  # verified TLS upstream
    cached = mirror.cache_dir / "manifests" / UPSTREAM_HOST / "library" / "medium" / "latest"
    wait_until(cached.exists, 10.0, "the model published with its last blob")  # (just after it)
    assert cached.read_bytes() == medium_model.manifest
    for blob in medium_model.blobs:
        assert (mirror.cache_dir / "blobs" / f"sha256-{blob.hex}").stat().st_size == blob.size


def test_upstream_certificates_are_verified_by_default(
    mirror_factory: MirrorFactory,
    pki: dict[str, Path],
    tls_registry: RegistryProcess,
    small_model: PushedModel,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    """No ca_bundle: the system CAs do not know the test CA, so the mirror refuses the upstream."""
    mirror, tls_port = tls_mirror(mirror_factory, pki, upstream=transparent_upstream(tls_registry))
    with pytest.raises(PullError) as caught:
        pull(
            "https://registry.ollama.ai",
            small_model.repo,
            small_model.tag,
            tmp_path / "client",
            ssl_context=client_tls,
            connect_to={"registry.ollama.ai:443": ("127.0.0.1", tls_port)},
            timeout=30,
        )
    assert "certificate verify failed" in str(caught.value)
    assert not (mirror.cache_dir / "manifests" / UPSTREAM_HOST / "library" / "tiny").exists()


def test_insecure_upstream_works_and_is_logged_loudly(
    mirror_factory: MirrorFactory,
    pki: dict[str, Path],
    tls_registry: RegistryProcess,
    small_model: PushedModel,
    client_tls: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    mirror, tls_port = tls_mirror(
        mirror_factory, pki, upstream=transparent_upstream(tls_registry, insecure=True)
    )
    result = pull(
        "https://registry.ollama.ai",
        small_model.repo,
        small_model.tag,
        tmp_path / "client",
        ssl_context=client_tls,
        connect_to={"registry.ollama.ai:443": ("127.0.0.1", tls_port)},
        timeout=30,
    )
    assert result.manifest_bytes == small_model.manifest
    warning = [line for line in mirror.log_text().splitlines() if "TLS VERIFICATION IS OFF" in line]
    assert len(warning) == 1 and "registry.ollama.ai" in warning[0] and "#warn" in warning[0]


def test_official_client_over_https(
    mirror_factory: MirrorFactory,
    pki: dict[str, Path],
    small_model: PushedModel,
    client_tls: ssl.SSLContext,
) -> None:
    _, tls_port = tls_mirror(mirror_factory, pki, upstream=dict(UPSTREAM_SETTINGS))
    client = ollama.Client(host=f"https://127.0.0.1:{tls_port}", verify=client_tls, timeout=CLIENT_TIMEOUT)
    assert client.pull("tiny").status == "success"
    names = {m.model for m in client.list().models}
    assert "tiny:latest" in names
    assert client.show("tiny").modelinfo  # the body carried model_info
    with pytest.raises(ConnectionError) as caught:  # without the organisation's CA: refused
        ollama.Client(host=f"https://127.0.0.1:{tls_port}", timeout=CLIENT_TIMEOUT).list()
    causes = []
    cause: BaseException | None = caught.value
    while cause is not None:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert any("CERTIFICATE_VERIFY_FAILED" in text for text in causes), causes


# --- several upstreams -----------------------------------------------------------------------------


@pytest.fixture
def second_registry(tmp_path: Path) -> Iterator[RegistryProcess]:
    process = RegistryProcess(tmp_path / "second-registry")
    try:
        yield process
    finally:
        process.cleanup()


def test_two_upstreams_by_host_without_cross_talk(
    mirror_factory: MirrorFactory,
    registry: RegistryProcess,
    second_registry: RegistryProcess,
    small_model: PushedModel,
    tmp_path: Path,
) -> None:
    """``library/tiny`` exists in both registries with different contents; each host gets its own."""
    other = push_model(
        second_registry.url,
        "library/tiny",
        "latest",
        build_model(tmp_path / "other-model", size=SMALL_MODEL_SIZE, seed=99, name="tiny"),
    )
    assert other.digest != small_model.digest
    mirror = mirror_factory(
        config={
            "upstream": {**UPSTREAM_SETTINGS, "hosts": {"second.example": {"url": second_registry.url}}},
            "server": {"virtual_hosts": {"second.mirror.test": "second.example"}},
        }
    )
    client = ollama.Client(host=mirror.url, timeout=CLIENT_TIMEOUT)
    assert client.pull("tiny").status == "success"
    assert client.pull("second.example/library/tiny").status == "success"

    manifests = mirror.cache_dir / "manifests"
    assert (manifests / UPSTREAM_HOST / "library/tiny/latest").read_bytes() == small_model.manifest
    assert (manifests / "second.example/library/tiny/latest").read_bytes() == other.manifest
    listed = {m.model: m.digest for m in client.list().models}
    assert listed["tiny:latest"] == small_model.manifest_hex
    assert listed["second.example/library/tiny:latest"] == other.manifest_hex

    # /v2 by Host: the virtual host means the second upstream, the mirror's own address the default.
    by_vhost = pull(
        f"http://second.mirror.test:{mirror.port}",
        "library/tiny",
        "latest",
        tmp_path / "vhost",
        connect_to={f"second.mirror.test:{mirror.port}": ("127.0.0.1", mirror.port)},
        timeout=30,
    )
    assert by_vhost.manifest_bytes == other.manifest
    direct = pull(mirror.url, "library/tiny", "latest", tmp_path / "direct", timeout=30)
    assert direct.manifest_bytes == small_model.manifest

    # Each registry was asked only for its own model's layer.
    own, theirs = small_model.layers[0].hex, other.layers[0].hex
    assert theirs in second_registry.log_text() and own not in second_registry.log_text()
    assert own in registry.log_text() and theirs not in registry.log_text()

    # Deleting one host's model leaves the other's, though the names differ only by host.
    client.delete("second.example/library/tiny")
    assert {m.model for m in client.list().models} == {"tiny:latest"}
    assert (manifests / UPSTREAM_HOST / "library/tiny/latest").read_bytes() == small_model.manifest
    for blob in small_model.blobs:
        assert (mirror.cache_dir / "blobs" / blob.cache_name).exists()


def test_unknown_model_host_is_refused(mirror: MirrorDaemon) -> None:
    client = ollama.Client(host=mirror.url, timeout=CLIENT_TIMEOUT)
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("nowhere.example/library/tiny")
    assert caught.value.status_code == 400
    assert "no upstream is configured for nowhere.example" in caught.value.error


# --- the loop guard --------------------------------------------------------------------------------


def test_a_request_loop_is_refused_with_a_clear_error(
    mirror_factory: MirrorFactory, small_model: PushedModel
) -> None:
    """An upstream whose address leads back to the mirror (transparent mode without an override)."""
    port = free_port()
    mirror = mirror_factory(
        port=port,
        config={
            "upstream": {
                **UPSTREAM_SETTINGS,
                "hosts": {"loop.example": {"url": "http://loop.example", "address": f"localhost:{port}"}},
            }
        },
    )
    client = ollama.Client(host=mirror.url, timeout=CLIENT_TIMEOUT)
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("loop.example/library/tiny")
    assert "request loop" in caught.value.error and "loop.example" in caught.value.error

    answer = http_request(
        "GET",
        f"{mirror.url}/v2/library/tiny/manifests/latest",
        headers={"Host": "loop.example", "Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    assert answer.status == 502
    assert "request loop" in json.loads(answer.body)["errors"][0]["message"]
    refused = [line for line in mirror.log_text().splitlines() if "refused GET" in line and "loop" in line]
    assert len(refused) == 2  # one refusal per attempt: the loop is never retried nor amplified
    assert mirror.is_running()


# --- serving TLS -----------------------------------------------------------------------------------


def test_sighup_reloads_the_certificate_without_dropping_the_listener(
    mirror_factory: MirrorFactory, pki: dict[str, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = tmp_path / "served.pem", tmp_path / "served.key"
    cert.write_bytes(pki["mirror_cert"].read_bytes())
    key.write_bytes(pki["mirror_key"].read_bytes())
    mirror, tls_port = tls_mirror(
        mirror_factory, pki, server={"tls_certificate": str(cert), "tls_key": str(key)}
    )
    first = served_certificate(tls_port)
    assert same_certificate(first, pki["mirror_cert"].read_text())

    renewed = ca.issue_cert(*NAMES, organization_name="renewed")
    renewed.cert_chain_pems[0].write_to_path(str(cert))
    renewed.private_key_pem.write_to_path(str(key))
    assert mirror.pid is not None
    os.kill(mirror.pid, signal.SIGHUP)
    new_pem = renewed.cert_chain_pems[0].bytes().decode()
    wait_until(lambda: same_certificate(served_certificate(tls_port), new_pem), 10, "the renewed certificate")
    assert mirror.is_running() and mirror.answers()
    assert "TLS certificate reloaded" in mirror.log_text()

    cert.write_text("not a certificate\n")  # a broken renewal: the old certificate stays
    os.kill(mirror.pid, signal.SIGHUP)
    wait_until(lambda: "TLS certificate not reloaded" in mirror.log_text(), 10, "the refusal in the log")
    assert same_certificate(served_certificate(tls_port), new_pem)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("other_key", "server.tls_key: {key} is not the key of the certificate in {cert}"),
        ("missing", "server.tls_certificate: cannot read {cert}: No such file or directory"),
        ("garbage", "server.tls_certificate: {cert} holds no readable PEM certificate"),
        ("no_certificate", "server.listen: 'ssl:"),
    ],
)
def test_a_bad_certificate_configuration_stops_start_up_with_one_line(
    mirror_factory: MirrorFactory, pki: dict[str, Path], tmp_path: Path, problem: str, message: str
) -> None:
    cert, key = tmp_path / "c.pem", pki["mirror_key"]
    server: dict[str, Any] = {"tls_certificate": str(cert), "tls_key": str(key)}
    if problem == "other_key":
        cert.write_bytes(pki["registry_cert"].read_bytes())
    elif problem == "garbage":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    elif problem == "no_certificate":
        server = {"tls_certificate": "", "tls_key": ""}
    port = free_port()
    mirror = mirror_factory(
        port=port,
        start=False,
        config={"server": {"listen": [f"ssl:{free_port()}:interface=127.0.0.1"], **server}},
    )
    mirror.start(wait=False)
    assert mirror.wait_exit(timeout=20) == 2
    lines = mirror.stderr_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ollama-mirror: configuration error: ")
    assert message.format(cert=cert, key=key) in lines[0]


def test_ssl_listener_with_its_own_private_key_still_works(
    mirror_factory: MirrorFactory, pki: dict[str, Path], client_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    """A plain strports ``ssl:`` description (no reload) is passed through as before."""
    port, tls_port = free_port(), free_port()
    combined = tmp_path / "server.pem"
    combined.write_bytes(pki["mirror_key"].read_bytes() + pki["mirror_cert"].read_bytes())
    mirror_factory(
        port=port,
        config={
            "server": {
                "listen": [
                    f"tcp:{port}:interface=127.0.0.1",
                    f"ssl:{tls_port}:interface=127.0.0.1:privateKey={combined}",
                ]
            }
        },
    )
    started = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", tls_port), timeout=5) as sock,
        client_tls.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < 10
