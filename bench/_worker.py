"""Helper processes for the benchmarks (``bench/pull_1g.py``, ``bench/push.py``...): each runs in a process of
its own, so that no client or proxy shares an interpreter (and a GIL) with another part of the measurement.

``python bench/_worker.py ranged URL SIZE DEST [--parts N | --go-parts] [--digest D] [--discover] ...``
    Go-style parallel ranged GETs of ``URL`` (``tests.support.puller.pull_blob_ranged``) into ``DEST``;
    prints one JSON line: ``elapsed`` (the ranged download only), ``bytes``, ``parts``, the status codes
    seen, retries, and, with ``--digest``, whether the file's sha256 matched (checked after the clock
    stopped). With ``--discover``, ``URL`` is a registry's blob URL and the client first does what Ollama
    does before its ranges (the puller's steps 2 and 3): ``HEAD`` for the size (which must be ``SIZE``;
    before the clock), then the discovery ``GET`` without ``Range`` (redirects followed only to the same
    host name, the connection hung up at once), whose ``Location`` the ranged GETs then go to; ``elapsed``
    then runs from the discovery ``GET`` to the last byte, and the report adds the HEAD's and the
    discovery's status, seconds and headers and the ``Location``.

``python bench/_worker.py proxy UPSTREAM --rate BYTES_PER_S [--keep-host]``
    A ``tests.support.faultproxy.FaultProxy`` in front of ``UPSTREAM`` with ``throttle(rate)`` per connection;
    prints ``{"url": ...}`` once listening, and stops when its standard input reaches EOF (or on SIGTERM).
    ``--keep-host``: the client's ``Host`` is forwarded as it came (an S3 endpoint checks the signed one).

``python bench/_worker.py push BASE_URL REPO FILE --digest D [--key PEM] [--tag T --config FILE]``
    Pushes ``FILE`` as one blob of ``REPO`` the way Ollama does (``server/upload.go``, ``bench/push.py``
    says how); prints one JSON line: ``elapsed`` (from the blob's ``HEAD`` to the commit's ``201``),
    each request's seconds and status, and the CPU seconds this process used.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.ollamakey import OllamaKey, parse_challenge, token_url  # noqa: E402
from tests.support.puller import (  # noqa: E402
    DEFAULT_USER_AGENT,
    DISCOVERY_TIMEOUT,
    GO_MAX_PART_SIZE,
    GO_MIN_PART_SIZE,
    PullError,
    _discover,
    _head_size,
    _Log,
    pull_blob_ranged,
)

HASH_READ = 4 * 2**20


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_READ):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


def run_ranged(args: argparse.Namespace) -> int:
    size: int = args.size
    if args.go_parts:
        part_min, part_max = GO_MIN_PART_SIZE, GO_MAX_PART_SIZE
    else:  # exactly ``parts`` parts (the last one may be shorter)
        part_min = part_max = max(1, -(-size // args.parts))
    dest = Path(args.dest)
    cpu0 = time.process_time()
    url: str = args.url
    started: float | None = None  # (with --discover: when the discovery GET was sent)
    discovery: dict[str, object] = {}
    try:
        if args.discover:
            url, started, discovery = discover(args.url, size, args.timeout)
        result = pull_blob_ranged(
            url,
            size,
            dest,
            part_size_min=part_min,
            part_size_max=part_max,
            stall_timeout=args.stall_timeout,
            timeout=args.timeout,
        )
    except (PullError, OSError, http.client.HTTPException) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", **discovery}))
        return 1
    ended = time.monotonic()
    report: dict[str, object] = {
        "elapsed": result.elapsed if started is None else ended - started,
        "bytes": sum(p.completed for p in result.parts),
        "parts": len(result.parts),
        "statuses": sorted({s for p in result.parts for s in p.statuses}),
        "retries": sum(max(0, p.attempts - 1) for p in result.parts),
        "cpu_s": time.process_time() - cpu0,
    }
    if args.discover:
        report["ranged_elapsed"] = result.elapsed
        report.update(discovery)
    if args.digest:
        report["digest_ok"] = file_digest(dest) == args.digest
    print(json.dumps(report))
    return 0


def discover(blob_url: str, size: int, timeout: float) -> tuple[str, float, dict[str, object]]:
    """Ollama's steps before its ranged GETs (``tests.support.puller``'s steps 2 and 3): ``HEAD`` for the
    size (not timed), then the discovery ``GET`` without ``Range``; the URL the ranges go to, the monotonic
    time the discovery ``GET`` was sent, and what was seen."""
    log = _Log()
    headers = [("User-Agent", DEFAULT_USER_AGENT)]
    head_started = time.monotonic()
    head_size = _head_size(blob_url, headers, log=log, ssl_context=None, timeout=min(timeout, 30.0))
    head_s = time.monotonic() - head_started
    if head_size != size:
        raise PullError(f"HEAD {blob_url}: Content-Length {head_size}, expected {size}")
    started = time.monotonic()
    location = _discover(
        blob_url,
        headers,
        log=log,
        ssl_context=None,
        discovery_timeout=min(timeout, DISCOVERY_TIMEOUT),
        newer_discovery=False,
    )
    discovery_s = time.monotonic() - started
    entries = log.entries()
    head = next(e for e in entries if e.method == "HEAD")
    gets = [e for e in entries if e.method == "GET"]
    seen: dict[str, object] = {
        "head_status": head.status,
        "head_s": head_s,
        "head_headers": head.headers,
        "discovery_statuses": [e.status for e in gets],  # one per hop (and per retry)
        "discovery_headers": gets[-1].headers if gets else {},
        "discovery_s": discovery_s,
        "location": location,
    }
    return location, started, seen


def run_proxy(args: argparse.Namespace) -> int:
    proxy = FaultProxy(args.upstream, upstream_timeout=args.upstream_timeout, keep_host=args.keep_host)
    proxy.throttle(args.rate)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)

    def wait_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed our stdin (or died)
        stop.set()

    proxy.start()
    try:
        print(json.dumps({"url": proxy.url, "pid": os.getpid()}), flush=True)
        threading.Thread(target=wait_stdin, daemon=True).start()
        while not stop.wait(0.2):
            pass
    finally:
        proxy.stop()
    return 0


# --- push: one blob sent the way Ollama sends it (server/upload.go) -------------------------------------

MB = 1000 * 1000
OLLAMA_UPLOAD_PARTS = 16  # numUploadParts: the blob is cut in 16 parts, each within the bounds below
OLLAMA_MIN_PART = 100 * MB  # minUploadPartSize
OLLAMA_MAX_PART = 1000 * MB  # maxUploadPartSize
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
USER_AGENT = "ollama/bench (amd64 linux) Go/bench"
NO_ETAG = "0" * 32  # (Ollama sends an md5 of the parts' md5s as ``etag``; neither server reads it)


class PushFailed(RuntimeError):
    pass


def ollama_part_size(size: int) -> int:
    """The part size Ollama picks for a blob: size/16, within 100 MB and 1,000 MB."""
    return min(max(size // OLLAMA_UPLOAD_PARTS, OLLAMA_MIN_PART), OLLAMA_MAX_PART)


class PushClient:
    """Requests one after another on one kept-alive connection per host (as Go's transport reuses one);
    a ``401`` is answered as Ollama answers it: a token request signed with the key, then the request
    again with ``Authorization: Bearer``. A body is sent from its file with ``sendfile``: the blob is
    never in this process's memory."""

    def __init__(self, key: OllamaKey | None, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        self.auth: dict[str, str] = {}
        self.connections: dict[str, http.client.HTTPConnection] = {}
        self.log: list[dict[str, Any]] = []

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()

    def request(
        self,
        method: str,
        url: str,
        what: str,
        headers: dict[str, str] | None = None,
        *,
        file: BinaryIO | None = None,
        offset: int = 0,
        count: int = 0,
        data: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        started = time.monotonic()
        answer = self._send(method, url, headers, file, offset, count, data)
        if answer[0] == 401 and self.key is not None and not self.auth:
            self.log.append(
                {"what": f"{what} (no token)", "status": 401, "seconds": time.monotonic() - started}
            )
            self._token(answer[1].get("www-authenticate", ""))
            answer = self._send(method, url, headers, file, offset, count, data)
        self.log.append({"what": what, "status": answer[0], "seconds": time.monotonic() - started})
        return answer

    def _token(self, challenge: str) -> None:
        assert self.key is not None
        started = time.monotonic()
        url = token_url(parse_challenge(challenge))
        headers = {"Authorization": self.key.token_request_authorization(url)}
        status, _, body = self._send("GET", url, headers, None, 0, 0, b"")
        self.log.append({"what": "token", "status": status, "seconds": time.monotonic() - started})
        if status != 200:
            raise PushFailed(f"token request: HTTP {status} {body[:300]!r}")
        self.auth = {"Authorization": f"Bearer {json.loads(body)['token']}"}

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None,
        file: BinaryIO | None,
        offset: int,
        count: int,
        data: bytes,
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        conn = self.connections.get(parts.netloc)
        if conn is None:
            if parts.scheme != "http" or parts.hostname is None:
                raise PushFailed(f"only http:// URLs: {url}")
            conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=self.timeout)
            self.connections[parts.netloc] = conn
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        all_headers = {"User-Agent": USER_AGENT, **self.auth, **(headers or {})}
        if method in ("POST", "PUT", "PATCH"):
            all_headers["Content-Length"] = str(count or len(data))
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in all_headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            if count:
                assert file is not None and conn.sock is not None
                sent = conn.sock.sendfile(file, offset, count)
                if sent != count:
                    raise PushFailed(f"{method} {url}: sent {sent} of {count} bytes")
            elif data:
                conn.send(data)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise PushFailed(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def with_query(url: str, **values: str) -> str:
    """*url* with *values* added to its query (Ollama adds ``digest`` to the last ``Location``)."""
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *values.items()]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def expect(answer: tuple[int, dict[str, str], bytes], status: int, what: str) -> dict[str, str]:
    if answer[0] != status:
        raise PushFailed(f"{what}: HTTP {answer[0]} (expected {status}) {answer[2][:500]!r}")
    return answer[1]


def push_one_blob(
    client: PushClient, base: str, repo: str, path: Path, digest: str, part_size: int, label: str
) -> int:
    """``HEAD`` (absent), ``POST`` (202), ``PATCH`` each part in order (202 each, the next ``Location``
    from the answer), ``PUT ?digest=`` (201); the number of parts."""
    size = path.stat().st_size
    head = client.request("HEAD", f"{base}/v2/{repo}/blobs/{digest}", f"{label} head")
    if head[0] != 404:
        raise PushFailed(f"HEAD of {digest} before its push: HTTP {head[0]} (expected 404: a fresh target)")
    started = client.request("POST", f"{base}/v2/{repo}/blobs/uploads/", f"{label} start")
    location = urljoin(base, expect(started, 202, "POST .../blobs/uploads/")["location"])
    n = 0
    with path.open("rb") as fh:
        for offset in range(0, size, part_size):
            count = min(part_size, size - offset)
            n += 1
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + count - 1}",
                "X-Redirect-Uploads": "1",
            }
            answer = client.request(
                "PATCH", location, f"{label} part {n}", headers, file=fh, offset=offset, count=count
            )
            location = urljoin(location, expect(answer, 202, f"PATCH part {n}")["location"])
    commit = with_query(location, digest=digest, etag=f"{NO_ETAG}-{n}")
    answer = client.request("PUT", commit, f"{label} commit", {"Content-Type": "application/octet-stream"})
    if expect(answer, 201, "PUT ?digest=").get("docker-content-digest", digest) != digest:
        raise PushFailed(f"the commit answered digest {answer[1].get('docker-content-digest')}")
    return n


def run_push(args: argparse.Namespace) -> int:
    key = None
    if args.key:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        private = load_pem_private_key(Path(args.key).read_bytes(), password=None)
        assert isinstance(private, Ed25519PrivateKey)
        key = OllamaKey("bench@push", private)
    base = args.base_url.rstrip("/")
    path = Path(args.file)
    part_size = args.part_size or ollama_part_size(path.stat().st_size)
    client = PushClient(key, args.timeout)
    cpu0 = time.process_time()
    report: dict[str, Any] = {"part_size": part_size}
    try:
        t0 = time.monotonic()
        report["parts"] = push_one_blob(client, base, args.repo, path, args.digest, part_size, "blob")
        report["elapsed"] = time.monotonic() - t0
        report["cpu_s"] = time.process_time() - cpu0
        if args.tag:  # the rest of a model, untimed: its config blob, then the manifest naming both
            t1 = time.monotonic()
            config = Path(args.config)
            config_digest = "sha256:" + hashlib.sha256(config.read_bytes()).hexdigest()
            push_one_blob(client, base, args.repo, config, config_digest, part_size, "config")
            manifest = Path(args.manifest).read_bytes()
            answer = client.request(
                "PUT",
                f"{base}/v2/{args.repo}/manifests/{args.tag}",
                "manifest",
                {"Content-Type": MANIFEST_TYPE},
                data=manifest,
            )
            expect(answer, 201, f"PUT manifest {args.tag}")
            report["rest_of_model_s"] = time.monotonic() - t1
    except PushFailed as exc:
        report["error"] = str(exc)
    finally:
        client.close()
    report["requests"] = client.log
    print(json.dumps(report))
    return 1 if "error" in report else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/_worker.py")
    sub = parser.add_subparsers(dest="command", required=True)
    ranged = sub.add_parser("ranged", help="Go-style parallel ranged GETs of one blob URL")
    ranged.add_argument("url")
    ranged.add_argument("size", type=int)
    ranged.add_argument("dest")
    ranged.add_argument("--parts", type=int, default=16)
    ranged.add_argument("--go-parts", action="store_true", help="Go's clamp(size/16, 100 MB, 1000 MB)")
    ranged.add_argument("--digest", default="")
    ranged.add_argument(
        "--discover",
        action="store_true",
        help="URL is a registry blob URL: HEAD it, then read the discovery GET's Location (as Ollama)",
    )
    ranged.add_argument("--timeout", type=float, default=600.0)
    ranged.add_argument("--stall-timeout", type=float, default=30.0)
    proxy = sub.add_parser("proxy", help="a throttling FaultProxy in front of UPSTREAM")
    proxy.add_argument("upstream")
    proxy.add_argument("--rate", type=float, required=True, help="bytes per second per connection")
    proxy.add_argument("--upstream-timeout", type=float, default=60.0)
    proxy.add_argument("--keep-host", action="store_true", help="forward the client's Host unchanged")
    push = sub.add_parser("push", help="push FILE as one blob of REPO, in Ollama's way")
    push.add_argument("base_url")
    push.add_argument("repo")
    push.add_argument("file")
    push.add_argument("--digest", required=True)
    push.add_argument("--part-size", type=int, default=0, help="bytes (default: Ollama's choice)")
    push.add_argument("--key", default="", help="PEM file of the Ollama key that answers a 401")
    push.add_argument("--tag", default="", help="then push --config and PUT --manifest as this tag")
    push.add_argument("--config", default="")
    push.add_argument("--manifest", default="")
    push.add_argument("--timeout", type=float, default=120.0, help="seconds per socket operation")
    args = parser.parse_args(argv)
    runs = {"ranged": run_ranged, "proxy": run_proxy, "push": run_push}
    return runs[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
