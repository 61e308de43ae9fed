"""Node-to-node signatures: what lets another node of the cluster past this node's access rules."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from ollama_mirror.cluster.peers import PEER_HEADER, PeerSigner
from ollama_mirror.config import load_config
from ollama_mirror.security.access import AccessControl

PATH = "/v2/library/tiny/blobs/sha256:" + "a" * 64


def request_with(signature: bytes | None, path: str = PATH, method: bytes = b"GET") -> DummyRequest:
    request = DummyRequest(path.lstrip("/").split("/"))
    request.method = method
    request.uri = path.encode()
    if signature is not None:
        request.requestHeaders.setRawHeaders(PEER_HEADER, [signature])
    return request


def test_a_node_signs_and_another_node_with_the_same_secret_recognises_it() -> None:
    clock = Clock()
    a = PeerSigner(b"cluster secret", "http://a:11434", clock)
    b = PeerSigner(b"cluster secret", "http://b:11434", clock)
    assert b.verify(request_with(a.sign("GET", PATH))) == "http://a:11434"


def test_anything_else_is_an_ordinary_request() -> None:
    clock = Clock()
    clock.advance(1_000_000)
    a = PeerSigner(b"cluster secret", "http://a:11434", clock)
    b = PeerSigner(b"cluster secret", "http://b:11434", clock)
    stranger = PeerSigner(b"another secret", "http://a:11434", clock)
    signed = a.sign("GET", PATH)
    assert b.verify(request_with(None)) is None
    assert b.verify(request_with(stranger.sign("GET", PATH))) is None  # not of this cluster
    assert b.verify(request_with(signed, path=PATH.replace("tiny", "other"))) is None  # another blob
    assert b.verify(request_with(signed, method=b"DELETE")) is None  # another method
    assert b.verify(request_with(signed.replace(b"http://a", b"http://x"))) is None  # another node's name
    assert b.verify(request_with(b"garbage")) is None
    clock.advance(61)
    assert b.verify(request_with(signed)) is None  # too old to replay


def test_a_signed_node_passes_the_registry_rules_that_stop_everyone_else(tmp_path: Path) -> None:
    clock = Clock()
    config = load_config(
        None,
        {},
        {
            "security.registry_access": "networks",
            "security.registry_networks": "10.0.0.0/8",
            "security.rate_limit_requests": "1",
        },
    ).security
    peers = PeerSigner(b"cluster secret", "http://b:11434", clock)
    access = AccessControl(config, clock, str(tmp_path), lambda host: "registry.ollama.ai", peers=peers)
    node_a = PeerSigner(b"cluster secret", "http://a:11434", clock)
    for _ in range(5):  # neither the network rule nor the rate limit applies to a node of the cluster
        assert access.check(request_with(node_a.sign("GET", PATH)), PATH) is None
    refusal = access.check(request_with(None), PATH)
    assert refusal is not None and refusal.status == 403
