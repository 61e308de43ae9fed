"""Cached blobs go out with sendfile over plain TCP: framing, ranges, HEAD, keep-alive, slow readers,
hang-ups, and the copying path over TLS, all against the real daemon."""

from __future__ import annotations

import datetime
import http.client
import ssl
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.models import Blob, PushedModel
from tests.support.registry import free_port

from .helpers import (
    CLIENT_TIMEOUT,
    RawClient,
    assert_blob_served,
    fetch_blob,
    sha256_hex,
    wait_cached,
)


def warm(mirror: MirrorDaemon, model: PushedModel) -> Blob:
    blob = model.model_layer
    assert_blob_served(fetch_blob(mirror, model, blob), blob)
    wait_cached(mirror, blob)
    return blob


def read_response(
    conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str]
) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    return response, response.read()


def test_a_cached_blob_keeps_exact_framing_across_requests_on_one_connection(
    mirror: MirrorDaemon, big_model: PushedModel
) -> None:
    blob = warm(mirror, big_model)
    data = blob.read_bytes()
    path = f"/v2/{big_model.repo}/blobs/{blob.digest}"
    conn = http.client.HTTPConnection("127.0.0.1", mirror.port, timeout=CLIENT_TIMEOUT)
    try:
        response, body = read_response(conn, "GET", path, {})
        assert response.status == 200 and response.getheader("x-mirror-cache") == "hit"
        assert response.getheader("content-length") == str(blob.size)
        assert response.getheader("transfer-encoding") is None
        assert sha256_hex(body) == blob.hex
        first_socket = conn.sock
        for rng, first, last in (
            ("bytes=1000-2000999", 1000, 2000999),
            ("bytes=0-0", 0, 0),
            (f"bytes={blob.size - 10}-", blob.size - 10, blob.size - 1),
            ("bytes=-4096", blob.size - 4096, blob.size - 1),
        ):
            response, body = read_response(conn, "GET", path, {"Range": rng})
            assert response.status == 206, rng
            assert response.getheader("content-range") == f"bytes {first}-{last}/{blob.size}"
            assert body == data[first : last + 1], rng
        response, body = read_response(conn, "HEAD", path, {})
        assert response.status == 200 and body == b""
        assert response.getheader("content-length") == str(blob.size)
        response, body = read_response(conn, "GET", path, {})
        assert response.status == 200 and body == data
        assert conn.sock is first_socket  # every response framed exactly: the connection was kept
    finally:
        conn.close()


def test_a_slow_reader_gets_every_byte_and_a_hang_up_mid_body_harms_nobody(
    mirror: MirrorDaemon, big_model: PushedModel
) -> None:
    blob = warm(mirror, big_model)
    path = f"/v2/{big_model.repo}/blobs/{blob.digest}"
    slow = RawClient(mirror, path, rcvbuf=16 * 1024)
    gone = RawClient(mirror, path, rcvbuf=16 * 1024)
    try:
        while gone.body_bytes() < 1_000_000:
            assert gone.recv(65536) > 0
        gone.close()  # hangs up mid-body while the server's socket is full
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while slow.body_bytes() < blob.size:  # small reads, often: the server's socket fills and drains
            assert time.monotonic() < deadline, "slow reader did not get the whole body"
            assert slow.recv(32 * 1024) > 0
            if slow.body_bytes() % (2 * 2**20) < 32 * 1024:
                time.sleep(0.01)
        assert slow.status_line() == "HTTP/1.1 200 OK"
        header_end = slow.received.find(b"\r\n\r\n") + 4
        assert len(slow.received) - header_end == blob.size  # not a byte more
        assert sha256_hex(bytes(slow.received[header_end:])) == blob.hex
    finally:
        slow.close()
        gone.close()
    assert_blob_served(fetch_blob(mirror, big_model, blob), blob)  # the daemon serves on
    assert "Traceback" not in mirror.log_text()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_over_tls_a_cached_blob_is_copied_through_the_tls_transport(
    mirror_factory: MirrorFactory, big_model: PushedModel, tmp_path: Path
) -> None:
    key, cert = _self_signed(tmp_path)
    port, tls_port = free_port(), free_port()
    mirror = mirror_factory(
        port=port,
        config={
            "server": {
                "listen": [
                    f"tcp:{port}:interface=127.0.0.1",
                    f"ssl:{tls_port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
                ]
            }
        },
    )
    blob = warm(mirror, big_model)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=CLIENT_TIMEOUT, context=context)
    try:
        path = f"/v2/{big_model.repo}/blobs/{blob.digest}"
        response, body = read_response(conn, "GET", path, {})
        assert response.status == 200 and sha256_hex(body) == blob.hex
        response, body = read_response(conn, "GET", path, {"Range": "bytes=10-1000009"})
        assert response.status == 206 and body == blob.read_range(10, 1000009)
    finally:
        conn.close()
