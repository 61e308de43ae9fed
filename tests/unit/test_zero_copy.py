"""The sendfile path of BlobProducer, step by step: a real TCP connection whose server side is a Twisted
``tcp.Server`` on a fake reactor, so that the test decides when the socket is read and written."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ollama_mirror.web.blobstream import BlobProducer

SIZE = 3 * 2**20 + 12345


class BlobResource(Resource):
    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.producers: list[BlobProducer] = []

    def render_GET(self, request: Request) -> Any:
        first, last = 0, SIZE - 1
        rng = request.getHeader(b"range")
        if rng is not None:
            a, b = rng.decode().removeprefix("bytes=").split("-")
            first, last = int(a), int(b)
            request.setResponseCode(206)
        request.setHeader(b"content-length", str(last - first + 1).encode())
        producer = BlobProducer(request, os.open(self.path, os.O_RDONLY), first, last)
        self.producers.append(producer)
        producer.start()
        return NOT_DONE_YET


class _Port:
    _realPortNumber = 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 1)


class Connection:
    """One client connection to the site; ``pump()`` plays the reactor."""

    def __init__(self, site: Any, reactor: MemoryReactorClock) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(listener.getsockname())
        server, address = listener.accept()
        listener.close()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)  # the socket fills often
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        server.setblocking(False)
        self.client.setblocking(False)
        self.reactor = reactor
        self.protocol = site.buildProtocol(IPv4Address("TCP", *address))
        self.transport = tcp.Server(server, self.protocol, address, _Port(), 1, reactor)
        self.protocol.makeConnection(self.transport)
        self.received = bytearray()
        self.write_events = 0

    def request(self, text: str) -> None:
        self.client.sendall(text.encode())
        self.transport.doRead()

    def pump(self, until: int, limit: int = 100_000) -> None:
        """Read the client side and hand write events to the transport until *until* bytes arrived."""
        for _ in range(limit):
            try:
                data = self.client.recv(65536)
                self.received += data
            except BlockingIOError:
                pass
            if len(self.received) >= until:
                return
            if self.transport in self.reactor.writers:
                self.write_events += 1
                self.transport.doWrite()
        raise AssertionError(f"only {len(self.received)} of {until} bytes arrived")

    def take_response(self, body_size: int) -> tuple[bytes, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.received:
            self.pump(len(self.received) + 1)
        head, _, _ = bytes(self.received).partition(b"\r\n\r\n")
        self.pump(len(head) + 4 + body_size)
        status, *lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        body = bytes(self.received[len(head) + 4 : len(head) + 4 + body_size])
        del self.received[: len(head) + 4 + body_size]
        return status.encode(), headers, body


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def site_and_resource(blob: tuple[Path, bytes]) -> Iterator[tuple[Site, BlobResource, MemoryReactorClock]]:
    reactor = MemoryReactorClock()
    resource = BlobResource(blob[0])
    yield Site(resource, reactor=reactor), resource, reactor


def test_whole_body_range_and_keep_alive_over_sendfile(
    site_and_resource: tuple[Site, BlobResource, MemoryReactorClock], blob: tuple[Path, bytes]
) -> None:
    site, resource, reactor = site_and_resource
    _, data = blob
    conn = Connection(site, reactor)
    conn.request("GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = conn.take_response(SIZE)
    assert status == b"HTTP/1.1 200 OK" and headers["content-length"] == str(SIZE)
    assert "transfer-encoding" not in headers
    assert body == data
    assert resource.producers[0].zero_copy
    assert conn.write_events > 10  # the socket filled up and drained many times
    conn.request("GET /b HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-2000999\r\n\r\n")  # same connection
    status, headers, body = conn.take_response(2_000_000)
    assert status == b"HTTP/1.1 206 Partial Content" and body == data[1000:2001000]
    assert resource.producers[1].zero_copy
    assert conn.received == bytearray()  # not a byte more than Content-Length said
    assert conn.transport.connected


def test_a_client_hanging_up_mid_body_stops_the_producer(
    site_and_resource: tuple[Site, BlobResource, MemoryReactorClock],
) -> None:
    site, resource, reactor = site_and_resource
    conn = Connection(site, reactor)
    conn.request("GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.pump(200_000)
    producer = resource.producers[0]
    conn.client.close()
    for _ in range(100):  # as the reactor would: read and write events, until it is torn down
        for event in (conn.transport.doRead, conn.transport.doWrite):
            if conn.transport.connected:
                why = event()
                if why:
                    conn.transport.connectionLost(Failure(why))
        reactor.advance(0)
        if not conn.transport.connected:
            break
    assert not conn.transport.connected
    assert producer._stopped and producer._fd == -1
    assert producer.sent < SIZE


def test_a_wrapped_transport_gets_the_copying_path(
    site_and_resource: tuple[Site, BlobResource, MemoryReactorClock], blob: tuple[Path, bytes]
) -> None:
    """Under a protocol wrapper (as TLS, rate limiting or HTTP/2 put one) the socket is not ours to write."""
    site, resource, reactor = site_and_resource
    conn = Connection(WrappingFactory(site), reactor)
    conn.request("GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = conn.take_response(SIZE)
    assert status == b"HTTP/1.1 200 OK" and body == blob[1]
    assert not resource.producers[0].zero_copy
