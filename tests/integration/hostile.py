"""Raw HTTP for the hostile-input tests: whatever bytes a test wants on the wire, and a check of the
answer that every one of them must pass."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field

SECRET = "outside-the-cache-7f3a9c"  # the content of a file beside the cache: no answer may hold it


@dataclass
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def exchange(port: int, data: bytes, timeout: float = 10.0) -> Answer:
    """Send *data* on a new connection and read until the server closes it or one response is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may close before reading it all (a refused body)
            sock.sendall(data)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            answer = parse(bytes(received))
            length = answer.headers.get("content-length")
            if answer.status is not None and length is not None and len(answer.body) >= int(length):
                break
    return parse(bytes(received))


def parse(data: bytes) -> Answer:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return Answer(None)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None, headers, body)


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + body


def check(answer: Answer, what: str, method: str = "GET", proxied: bool = False) -> None:
    """No 5xx, JSON errors, nothing that looks like a traceback or a file from outside the cache.

    *proxied*: an inference route forwarded to the backend Ollama, which these tests do not run; its
    answer is the gateway's 502 ("the backend ... is unreachable"), a true statement, not a failure."""
    assert answer.status is not None, f"{what}: no answer"
    allowed = (502,) if proxied else ()
    assert answer.status < 500 or answer.status in allowed, f"{what}: {answer.status} {answer.body[:300]!r}"
    text = answer.body.decode("utf-8", "replace")
    assert "Traceback" not in text and "<html" not in text.lower(), f"{what}: {text[:300]}"
    assert SECRET not in text and "root:x:0:0" not in text, f"{what}: served a file from outside the cache"
    if answer.status >= 400 and method != "HEAD":
        try:
            document = json.loads(answer.body)
        except ValueError:
            raise AssertionError(
                f"{what}: {answer.status} answered without a JSON body: {answer.body[:200]!r}"
            ) from None
        assert "error" in document or "errors" in document, f"{what}: {document}"
