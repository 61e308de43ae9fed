"""Several upstreams: which one a request means, redirects, credentials, the loop guard, TLS parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trustme
from treq.testing import RequestTraversalAgent
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from ollama_mirror.config import ConfigError, load_config
from ollama_mirror.daemon.mirror import Mirror
from ollama_mirror.daemon.service import build_service
from ollama_mirror.security.tls import ServerTLS
from ollama_mirror.upstream.client import Upstream
from ollama_mirror.upstream.hosts import Upstreams
from ollama_mirror.upstream.trust import InsecurePolicy, UpstreamEndpoints, client_policy

from .fakeregistry import FakeRegistry
from .harness import Harness

ROOT = Path(__file__).resolve().parents[2]

SECOND = json.dumps({"second.example": {"url": "http://second.example"}})
VHOSTS = json.dumps({"hf.mirror.test": "second.example"})
MANIFEST = "/v2/library/tiny/manifests/latest"
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def two_upstreams(tmp_path: Path, registry: FakeRegistry, **settings: str) -> Harness:
    """The default upstream at registry.example and second.example, both answered by *registry*."""
    return Harness(
        tmp_path, registry, **{"upstream.hosts": SECOND, "server.virtual_hosts": VHOSTS, **settings}
    )


def asked_hosts(registry: FakeRegistry) -> set[str]:
    return {s.host for s in registry.seen}


@pytest.mark.parametrize(
    ("host", "upstream_host", "cache_dir"),
    [
        (None, "registry.example", "registry.ollama.ai"),  # the mirror's own name: the default
        ("hf.mirror.test", "second.example", "second.example"),  # a virtual host
        ("hf.mirror.test:8443", "second.example", "second.example"),  # with a port
        ("second.example", "second.example", "second.example"),  # transparent mode: the model host
        ("registry.ollama.ai", "registry.example", "registry.ollama.ai"),
        ("unknown.example", "registry.example", "registry.ollama.ai"),
    ],
)
def test_v2_routes_choose_the_upstream_by_host(
    tmp_path: Path, registry: FakeRegistry, host: str | None, upstream_host: str, cache_dir: str
) -> None:
    h = two_upstreams(tmp_path, registry)
    headers = {"Host": host} if host else {}
    response, body = h.request("GET", MANIFEST, headers=headers)
    assert response.code == 200
    assert asked_hosts(registry) == {upstream_host}
    stored = tmp_path / "cache" / ".mirror" / "staged" / cache_dir / "library" / "tiny" / "latest"
    assert stored.read_bytes() == body  # (kept apart by host, until its blobs are cached)
    digest = registry.digests()[1]
    _, data = h.request("GET", f"/v2/library/tiny/blobs/{digest}", headers=headers)
    assert data == registry.blobs[digest]
    assert asked_hosts(registry) == {upstream_host}  # the blob came from the same upstream


def test_api_pull_chooses_the_upstream_by_the_model_names_host(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = two_upstreams(tmp_path, registry)
    response, body = h.request(
        "POST", "/api/pull", json={"model": "second.example/library/tiny", "stream": False}
    )
    assert (response.code, json.loads(body)) == (200, {"status": "success"})
    assert asked_hosts(registry) == {"second.example"}
    assert (tmp_path / "cache/manifests/second.example/library/tiny/latest").exists()
    assert not (tmp_path / "cache/manifests/registry.ollama.ai").exists()

    response, body = h.request("POST", "/api/pull", json={"model": "nowhere.example/library/tiny"})
    assert response.code == 400
    assert json.loads(body)["error"] == (
        "no upstream is configured for nowhere.example (this mirror serves registry.ollama.ai, second.example)"
    )


def test_hf_style_302_redirects_are_followed_and_never_reach_the_client(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.redirect_to, registry.redirect_status = "http://storage.example", 302
    h = Harness(tmp_path, registry, **{"upstream.token": "good-token"})
    registry.auth = "bearer"
    digest = registry.digests()[1]
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert response.code == 200 and body == registry.blobs[digest]
    assert response.headers.getRawHeaders("location") == [f"/v2/library/tiny/blobs/{digest}"]
    storage = [s for s in registry.seen if s.host == "storage.example"]
    assert storage and all(s.authorization is None for s in storage)  # credentials stay with the registry
    own = [s for s in registry.seen if s.host == "registry.example"]
    assert own and all(s.authorization == "Bearer good-token" for s in own)  # a fixed token, no token dance
    assert registry.tokens_issued == 0


def test_every_upstream_request_carries_this_mirrors_via_marker(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    h.request("GET", MANIFEST)
    assert {s.via for s in registry.seen} == {h.mirror.marker}
    assert h.mirror.marker.startswith("1.1 ollama-mirror-")


def test_a_request_carrying_our_own_marker_is_refused_as_a_loop(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", MANIFEST, headers={"Via": f"1.0 proxy, {h.mirror.marker}"})
    assert response.code == 508
    assert json.loads(body)["errors"][0]["message"].startswith(
        "request loop: this request came from this mirror"
    )
    assert registry.seen == []
    response, body = h.request("POST", "/api/pull", headers={"Via": h.mirror.marker}, json={"model": "x"})
    assert response.code == 508 and "request loop" in json.loads(body)["error"]
    # another mirror's marker is a chain of mirrors, not a loop
    response, _ = h.request("GET", MANIFEST, headers={"Via": "1.1 ollama-mirror-0123456789ab"})
    assert response.code == 200


def test_processes_serving_one_cache_share_the_marker_and_other_caches_do_not(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    """With server.workers, a request one worker sent may come back to another: it must still be
    known as ours.  A second mirror (its own cache) is a chain, not a loop."""
    first = Harness(tmp_path, registry).mirror.marker
    again = Harness(tmp_path, registry).mirror.marker  # another process on the same cache
    other = Harness(tmp_path / "elsewhere", registry).mirror.marker
    assert first == again and first != other


def test_cache_files_made_by_racing_processes_are_read_whole_and_agree(tmp_path: Path) -> None:
    """Workers start together: none may read a secret another has created but not yet written."""
    script = (
        "import sys, secrets; from ollama_mirror.cache.files import read_or_create; "
        "sys.stdout.write(read_or_create(sys.argv[1], lambda: secrets.token_hex(32).encode()).decode())"
    )
    path = str(tmp_path / "work" / "signing.key")
    processes = [
        subprocess.Popen([sys.executable, "-c", script, path], stdout=subprocess.PIPE, cwd=ROOT)
        for _ in range(8)
    ]
    outputs = {p.communicate(timeout=60)[0] for p in processes}
    assert len(outputs) == 1 and len(outputs.pop()) == 64
    assert sorted(os.listdir(tmp_path / "work")) == ["signing.key"]  # no staging file left behind


def test_a_mirror_whose_upstream_is_itself_refuses_the_loop_once(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    h.upstream = RequestTraversalAgent(h.mirror.resource())  # the upstream leads back to the mirror
    h.mirror.upstream.agent = h.upstream
    response, body = h.request("GET", MANIFEST)
    assert response.code == 502
    message = json.loads(body)["errors"][0]["message"]
    assert message.startswith(
        "request loop: upstream registry.ollama.ai (http://registry.example) leads back"
    )
    assert registry.seen == []


def test_another_508_is_an_ordinary_upstream_error(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.fail_with = 508
    response, body = Harness(tmp_path, registry).request("GET", MANIFEST)
    assert response.code == 502
    assert "answered 508" in json.loads(body)["errors"][0]["message"]


def test_request_host_matching() -> None:
    a, b = SimpleNamespace(host="registry.ollama.ai"), SimpleNamespace(host="hf.co")
    upstreams = Upstreams(
        cast(list[Upstream], [a, b]), {"hf.mirror.example": "hf.co", "m.test:8443": "hf.co"}
    )
    assert upstreams.for_request_host(None) is a
    assert upstreams.for_request_host("mirror.example:11434") is a
    assert upstreams.for_request_host("HF.Mirror.Example") is b
    assert upstreams.for_request_host("m.test:8443") is b
    assert upstreams.for_request_host("m.test:9999") is a  # the port is part of that virtual host
    assert upstreams.for_request_host("hf.co:443") is b
    assert upstreams.for_request_host("[::1]:11434") is a
    assert upstreams.for_model_host("HF.CO") is b and upstreams.for_model_host("x.example") is None


# --- configuration ---------------------------------------------------------------------------------


def test_upstream_hosts_and_virtual_hosts_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "mirror.json"
    document: dict[str, Any] = {
        "upstream": {
            "hosts": {
                "hf.co": {"url": "https://hf.co/", "timeout": 20, "token": "t"},
                "registry.example.com": {
                    "url": "https://registry.example.com",
                    "username": "u",
                    "password": "p",
                    "ca_bundle": "/etc/ssl/org-ca.pem",
                    "address": "10.0.0.5:443",
                },
            }
        },
        "server": {"virtual_hosts": {"hf.mirror.example": "hf.co"}},
    }
    path.write_text(json.dumps(document))
    config = load_config(str(path))
    default, hf, private = config.upstreams()
    assert (default.host, default.url, default.timeout) == (
        "registry.ollama.ai",
        "https://registry.ollama.ai",
        300,
    )
    assert (hf.host, hf.url, hf.timeout, hf.token) == ("hf.co", "https://hf.co", 20, "t")
    assert (private.username, private.password, private.address) == ("u", "p", "10.0.0.5:443")
    assert config.server.virtual_hosts == (("hf.mirror.example", "hf.co"),)
    env = {"OLLAMA_MIRROR_UPSTREAM_HOSTS": json.dumps({"hf.co": {"url": "https://hf.co"}})}
    assert [u.host for u in load_config(str(path), env).upstreams()] == ["registry.ollama.ai", "hf.co"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"upstream.hosts": '{"hf.co": {}}'}, "hf.co: expected an object with at least a url"),
        (
            {"upstream.hosts": '{"hf.co": {"url": "https://hf.co", "pasword": "x"}}'},
            "hf.co: unknown key 'pasword'",
        ),
        (
            {"upstream.hosts": '{"hf.co": {"url": "https://hf.co", "timeout": 0}}'},
            "hf.co.timeout: must be positive",
        ),
        (
            {"upstream.hosts": '{"hf.co": {"url": "https://hf.co", "insecure": "yes"}}'},
            "hf.co.insecure: expected",
        ),
        ({"upstream.hosts": '{"bad host": {"url": "https://x"}}'}, "'bad host' is not a model host"),
        ({"upstream.hosts": '{"registry.ollama.ai": {"url": "https://x"}}'}, "already the default upstream"),
        ({"upstream.hosts": "[1]"}, 'upstream.hosts = "[1]" (from command line): expected a JSON object'),
        ({"upstream.address": "registry.ollama.ai"}, "expected host:port"),
        ({"upstream.address": "1.2.3.4:0"}, "expected a port number from 1 to 65535"),
        (
            {"server.virtual_hosts": '{"hf.mirror.example": "hf.co"}'},
            "maps to hf.co, which no upstream serves",
        ),
        (
            {"server.tls_certificate": "c.pem"},
            "server.tls_certificate and server.tls_key must be set together",
        ),
    ],
)
def test_bad_upstream_settings_are_named(settings: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(None, {}, settings)
    assert message in str(caught.value)


def test_a_missing_ca_bundle_stops_start_up(tmp_path: Path) -> None:
    config = load_config(
        None, {}, {"cache.directory": str(tmp_path / "c"), "upstream.ca_bundle": str(tmp_path / "none.pem")}
    )
    with pytest.raises(ConfigError, match=r"^upstream.ca_bundle: cannot read .*none.pem: No such file"):
        Mirror(config, MemoryReactorClock())


# --- TLS parts -------------------------------------------------------------------------------------


def test_address_override_keeps_the_name_for_tls_and_applies_only_to_the_upstreams_host() -> None:
    reactor = MemoryReactorClock()
    endpoints = UpstreamEndpoints(
        reactor, BrowserLikePolicyForHTTPS(), "registry.ollama.ai", "127.0.0.9:5000", 10
    )
    factory = Factory.forProtocol(Protocol)
    endpoints.endpointForURI(URI.fromBytes(b"https://registry.ollama.ai/v2/")).connect(factory)
    endpoints.endpointForURI(URI.fromBytes(b"https://storage.example/blob")).connect(factory)
    # (MemoryReactor resolves every name to 127.0.0.1: the ports tell where each connection went)
    assert [client[1] for client in reactor.tcpClients] == [5000, 443]


def test_client_policies(tmp_path: Path) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert isinstance(client_policy("", True, "x"), InsecurePolicy)
    assert isinstance(client_policy(str(bundle), False, "x"), BrowserLikePolicyForHTTPS)
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="upstream.ca_bundle: .*junk.pem holds no readable PEM certificate"):
        client_policy(str(tmp_path / "junk.pem"), False, "upstream.ca_bundle")


def write_pair(ca: trustme.CA, directory: Path, organization: str) -> tuple[Path, Path]:
    issued = ca.issue_cert("mirror.example", organization_name=organization)
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def test_server_certificate_reload(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path, "first")
    tls = ServerTLS(str(cert), str(key))
    assert "O=first" in tls.subject and "mirror.example" in tls.subject
    write_pair(ca, tmp_path, "second")
    assert tls.reload() and "O=second" in tls.subject
    key.write_text("garbage")
    assert not tls.reload() and "O=second" in tls.subject  # a broken renewal keeps what is served


def test_ssl_listeners_serve_the_configured_certificate_and_reload(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path, "first")
    settings = {
        "cache.directory": str(tmp_path / "cache"),
        "server.listen": "tcp:8080:interface=127.0.0.1,ssl:8443:interface=127.0.0.1",
        "server.tls_certificate": str(cert),
        "server.tls_key": str(key),
    }
    reactor = MemoryReactorClock()
    service = build_service(load_config(None, {}, settings), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        ports = {port: factory for port, factory, *_ in reactor.tcpServers}
        assert set(ports) == {8080, 8443}
        assert isinstance(ports[8443], TLSMemoryBIOFactory) and not isinstance(
            ports[8080], TLSMemoryBIOFactory
        )
        write_pair(ca, tmp_path, "second")
        assert service.reload_certificates()
        assert service.tls is not None and "O=second" in service.tls.subject
    finally:
        service.stopService()
    without = {**settings, "server.tls_certificate": "", "server.tls_key": ""}
    with pytest.raises(ConfigError, match="needs server.tls_certificate and server.tls_key"):
        build_service(load_config(None, {}, without), MemoryReactorClock())


def test_the_daemon_reloads_certificates_on_sighup_and_restores_the_handler() -> None:
    import signal

    from twisted.application.service import Service

    from ollama_mirror.tap import _Daemon

    class Child(Service):
        reloads = 0

        def reload_certificates(self) -> bool:
            self.reloads += 1
            return True

    calls: list[Any] = []
    reactor = SimpleNamespace(callFromThread=lambda f, *a: calls.append(f) or f(*a))
    daemon, child = _Daemon(None, reactor), Child()
    child.setServiceParent(daemon)
    before = signal.getsignal(signal.SIGHUP)
    daemon.startService()
    try:
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler is not before
        handler(signal.SIGHUP, None)
        assert child.reloads == 1 and len(calls) == 1  # through the reactor, not inside the signal handler
    finally:
        daemon.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_the_content_type_of_a_manifest_is_the_one_its_registry_gives() -> None:
    """Cached manifests have no header left: the type comes from the bytes as a registry derives it."""
    from ollama_mirror.upstream.client import MANIFEST_V2, OCI_INDEX, OCI_MANIFEST, media_type_of

    docker = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","config":{},"layers":[]}'
    bare_oci = b'{"schemaVersion":2,"config":{},"layers":[]}'
    bare_index = b'{"schemaVersion":2,"manifests":[]}'
    assert (
        media_type_of(docker, "text/plain") == MANIFEST_V2
    )  # registry.ollama.ai's header is no manifest type
    assert media_type_of(bare_oci, "") == OCI_MANIFEST
    assert media_type_of(bare_oci, OCI_MANIFEST + "; charset=utf-8") == OCI_MANIFEST
    assert media_type_of(bare_index, "") == OCI_INDEX
    assert media_type_of(b"not json", "") == MANIFEST_V2
