"""The HTTP channel's limits: header size and count, body size, slow and idle clients, JSON answers."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from ollama_mirror.config import ServerConfig
from ollama_mirror.ops.accesslog import MirrorSite
from ollama_mirror.security.connections import ConnectionLimits, automatic_total
from ollama_mirror.security.hardening import harden


class Echo(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        return b"got %d bytes" % len(request.content.read())


def connect(**limits: float) -> tuple[object, StringTransport, Clock]:
    clock = Clock()
    site = harden(MirrorSite(Echo(), reactor=clock), ServerConfig(**limits))  # type: ignore[arg-type]
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    assert protocol is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    return protocol, transport, clock


def answer(transport: StringTransport) -> tuple[int, dict[str, str]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body)


def test_a_normal_request_still_works() -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 200") and transport.value().endswith(b"got 5 bytes")


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, "larger than 16384"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
            431,
            "more than 100",
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413, "max_body_size"),
        (b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", 400, "malformed"),
        (b"NOT-HTTP\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400, "malformed"),
    ],
    ids=["huge-header", "many-headers", "huge-body", "bad-length", "bad-header", "not-http", "nul"],
)
def test_bad_requests_get_json_and_a_closed_connection(data: bytes, status: int, words: str) -> None:
    protocol, transport, _ = connect()
    protocol.dataReceived(data)  # type: ignore[attr-defined]
    got, document = answer(transport)
    assert got == status and words in document["error"]
    assert transport.disconnecting


def test_a_chunked_body_is_counted_as_it_comes() -> None:
    protocol, transport, _ = connect(max_body_size=2048)
    protocol.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")  # type: ignore[attr-defined]
    for _ in range(100):
        if transport.disconnecting:
            break
        protocol.dataReceived(b"1000\r\n" + b"x" * 4096 + b"\r\n")  # type: ignore[attr-defined]
    assert answer(transport)[0] == 413


def test_a_slow_client_is_cut_off_after_request_timeout() -> None:
    protocol, transport, clock = connect(request_timeout=10, idle_timeout=5)
    for _ in range(9):  # slowloris: a byte every 4 s keeps the idle timer happy
        protocol.dataReceived(b"G")  # type: ignore[attr-defined]
        clock.advance(1.1)
    assert not transport.disconnecting
    clock.advance(1)
    assert answer(transport) == (
        408,
        {"error": "the request did not arrive within 10 s (server.request_timeout)"},
    )


def test_an_idle_connection_is_closed_but_a_request_being_answered_is_not() -> None:
    protocol, transport, clock = connect(idle_timeout=5)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting or transport.disconnected  # type: ignore[attr-defined]


# --- connection caps -------------------------------------------------------------------------------


def open_from(site: MirrorSite, host: str) -> tuple[object, StringTransport]:
    address = IPv4Address("TCP", host, 5555)
    protocol = site.buildProtocol(address)
    assert protocol is not None
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def test_one_address_cannot_hold_more_than_its_share_of_connections() -> None:
    clock = Clock()
    limits = ConnectionLimits(clock, per_client=3, total=5)
    site = harden(MirrorSite(Echo(), reactor=clock), ServerConfig(), limits)  # type: ignore[arg-type]
    flood = [open_from(site, "127.0.0.2") for _ in range(3)]
    protocol, refused = open_from(site, "127.0.0.2")  # the fourth from that address
    status, body = answer(refused)
    assert status == 503 and refused.disconnecting
    assert b"retry-after: 1" in refused.value().lower()
    assert "3 connections are open from 127.0.0.2 (server.max_connections_per_client)" in body["error"]
    protocol.connectionLost(None)  # type: ignore[attr-defined]
    assert limits.open["127.0.0.2"] == 3  # a refused connection was never counted

    protocol, normal = open_from(site, "127.0.0.1")  # another address is served
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert normal.value().startswith(b"HTTP/1.1 200")

    flood[0][0].connectionLost(None)  # type: ignore[attr-defined]
    assert limits.open["127.0.0.2"] == 2
    _, again = open_from(site, "127.0.0.2")  # room again
    assert not again.disconnecting


def test_the_total_cap_refuses_everyone_beyond_it_and_counts_the_refusals() -> None:
    clock = Clock()
    limits = ConnectionLimits(clock, per_client=0, total=2)
    site = harden(MirrorSite(Echo(), reactor=clock), ServerConfig(), limits)  # type: ignore[arg-type]
    open_from(site, "10.0.0.1")
    open_from(site, "10.0.0.2")
    _, refused = open_from(site, "10.0.0.3")
    assert answer(refused)[0] == 503 and "(server.max_connections)" in answer(refused)[1]["error"]
    assert limits.refused == 1 and limits.open_total == 2


def test_the_automatic_total_leaves_room_for_files_and_never_drops_to_nothing() -> None:
    assert automatic_total(4096) == (4096 - 256) // 2
    assert automatic_total(100) == 64
