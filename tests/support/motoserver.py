"""A second real S3 implementation for integration tests: moto's server mode on loopback, authentication on.

``MotoServer`` runs ``moto.server`` (what ``moto_server`` runs; PyPI ``moto`` with its ``s3`` extra, plus ``flask`` and ``flask-cors``,
which its server mode imports) as one process of this Python, bound to ``127.0.0.1`` on a port chosen free
at run time, in a process group of its own, with its temporary files (objects over about 5 MiB are spooled
to disk) and its log in one working directory. It is a real HTTP server speaking S3 on the wire, like
SeaweedFS in ``tests.support.s3server``: the code under test cannot tell it is a test double. It keeps
everything in memory and forgets it when it stops.

Authentication is on, as with SeaweedFS. moto only checks signatures once its "no-auth" allowance is used
up, and it checks them against IAM users of its own, so the constructor, while the allowance lasts, makes
an IAM user ``tests`` with an access key (moto chooses the id and the secret: they cannot be given) and an
inline policy that allows ``s3:*``, creates ``bucket``, then sets the allowance to zero
(``POST /moto-api/reset-auth``). From then on a wrong secret answers ``403 SignatureDoesNotMatch`` and an
unsigned request is refused (below). The ``/moto-api/`` endpoints are not authenticated.

How moto 5.2 answers where it differs from SeaweedFS and AWS (``tests/integration/test_cluster_testbed.py``
runs the same checks on both stores, and checks the first four of these). None changes what the mirror's
client does; the first means only that moto would not catch a part whose bytes changed between the
digest and the upload, as SeaweedFS and AWS do:

- ``Content-MD5`` is **not** checked: a body that does not match it is stored (SeaweedFS and AWS answer
  ``400 BadDigest``). Nor is the signed ``X-Amz-Content-Sha256`` (as with SeaweedFS), nor the region of
  the credential scope.
- A ``416`` answer has no ``Content-Range`` header (SeaweedFS sends ``bytes */SIZE``); its XML body names
  the size in ``<ActualObjectSize>``, as AWS's does.
- With authentication on, a presigned URL answers ``500`` (moto looks for an ``Authorization`` header), and
  so does an unsigned request for a bucket; an unsigned request for an object answers ``403`` with an
  empty body.
- A PUT whose ``Content-Type`` is ``application/x-www-form-urlencoded`` stores an empty object (its web
  framework reads the body as a form). ``urllib.request`` sends that type for a body unless told another.
- Every answer closes its connection (``Connection: close``); an inverted range (``bytes=5-2``) answers
  ``200`` with the whole object, as HTTP says.

As SeaweedFS (and AWS) do: quoted MD5 ETags, ``"<MD5 of MD5s>-N"`` for a multipart object, ranges
(``206``, an end past the object clipped), ``416 InvalidRange`` for a start at or past the end,
``EntityTooSmall`` for a part under 5 MiB but the last, ``InvalidPart`` for a wrong ETag, ``NoSuchUpload``
after an abort, ``412`` for ``If-None-Match: *`` on an existing key, ``204`` for DELETE of a missing key,
``HEAD`` on the bucket answering ``200``, ``404`` when there is none and ``403`` for a wrong secret.

The process stops with :meth:`MotoServer.stop` (``SIGTERM`` to its group, ``SIGKILL`` after a few seconds),
and by itself within a few seconds should the process that started it die without stopping it. Usage::

    with MotoServer() as s3:
        s3.endpoint, s3.bucket, s3.access_key_id, s3.secret_access_key, s3.region
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import re
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
from typing import IO

from tests.support.s3server import (
    REGION,
    S3RequestError,
    S3Response,
    S3StartError,
    StoreAccess,
    free_ports,
    sign_v4,
    tail,
)

__all__ = ["MotoServer", "moto_missing"]

DEFAULT_BUCKET = "test-bucket"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02
PROBE_TIMEOUT = 1.0
USER = "tests"
S3_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)
IGNORED_ENV_PREFIXES = ("AWS_", "MOTO_", "TEST_SERVER_MODE", "TEST_PROXY_MODE", "INITIAL_NO_AUTH")

# The child: a thread that ends the process once its parent is gone (the test run was killed), then moto's
# own server (werkzeug, one thread per request) with the arguments given.
CHILD = """
import os, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(sys.argv[2:])
"""


def moto_missing() -> str | None:
    """Why moto's server mode cannot run here (a module it needs is not installed), or ``None``."""
    for module in ("moto.server", "flask", "flask_cors"):
        try:
            if importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(module)
        except ModuleNotFoundError:
            return f"no module {module} (install moto[s3], flask and flask-cors: the test extra has them)"
    return None


class MotoServer(StoreAccess):
    """moto's S3 on ``127.0.0.1:<free port>``, authentication on, one bucket; started at construction.

    ``workdir`` holds ``moto.log`` and moto's temporary files; without it a temporary directory is made, and
    removed by :meth:`stop`. A given ``workdir`` is the caller's: :meth:`stop` leaves it in place.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        bucket: str = DEFAULT_BUCKET,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.name = "moto"
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="motoserver-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "moto.log"
        self.bucket = bucket
        self.access_key_id = ""
        self.secret_access_key = ""
        self.region = REGION
        self.start_timeout = start_timeout
        self.startup_seconds = 0.0
        self._port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start moto from empty and set it up; a new port on each try (up to 3 when the port was taken in
        the meantime)."""
        if self.is_running():
            raise RuntimeError("moto already running")
        missing = moto_missing()
        if missing:
            raise FileNotFoundError(missing)
        last_error: S3StartError | None = None
        for _attempt in range(3):
            try:
                self._start_once()
                return
            except S3StartError as exc:
                last_error = exc
                port_taken = "address already in use" in tail(self.log_path).lower()
                self._kill()
                if not port_taken:
                    break
        assert last_error is not None
        raise last_error

    def _start_once(self) -> None:
        began = time.monotonic()
        deadline = began + self.start_timeout
        self._port = free_ports(1)[0]
        self.log_path.unlink(missing_ok=True)
        self._log = self.log_path.open("ab")
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(IGNORED_ENV_PREFIXES)}
        env.update({"TMPDIR": str(tmp), "HOME": str(self.workdir), "PYTHONUNBUFFERED": "1"})
        self._process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(os.getpid()), "-H", "127.0.0.1", "-p", str(self._port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            process_group=0,
        )
        self._wait(deadline, "the port to accept connections", self._accepts)
        self._set_up()
        self.startup_seconds = time.monotonic() - began

    def _accepts(self) -> bool:
        with socket.create_connection(("127.0.0.1", self._port), timeout=PROBE_TIMEOUT):
            return True

    def _set_up(self) -> None:
        """While requests go unchecked: the IAM user, its key and policy, the bucket; then checks on."""
        self._iam("CreateUser", UserName=USER)
        created = self._iam("CreateAccessKey", UserName=USER)
        self.access_key_id = _element(created, "AccessKeyId")
        self.secret_access_key = _element(created, "SecretAccessKey")
        self._iam("PutUserPolicy", UserName=USER, PolicyName="s3", PolicyDocument=S3_POLICY)
        self.create_bucket(self.bucket)
        answer = self._plain("POST", "/moto-api/reset-auth", b"0")
        if answer.status != 200:
            raise S3StartError(f"moto did not turn authentication on: {answer}; {self.log_tail()}")

    def _iam(self, action: str, **params: str) -> bytes:
        """One IAM call (a form POST signed for the ``iam`` service, which is how moto routes it)."""
        body = urllib.parse.urlencode({"Action": action, "Version": "2010-05-08", **params}).encode()
        headers = sign_v4(
            "POST",
            self.endpoint + "/",
            access_key_id="AKIAIOSFODNN7EXAMPLE",  # (not checked yet: see the module's docstring)
            secret_access_key="unchecked",
            region=self.region,
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
            payload_sha256=hashlib.sha256(body).hexdigest(),
            service="iam",
        )
        answer = self._plain("POST", "/", body, headers)
        if answer.status != 200:
            raise S3StartError(f"moto answered {answer.status} to IAM {action}: {answer.body[:500]!r}")
        return answer.body

    def _plain(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> S3Response:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10.0)
        try:
            connection.request(method, path, body=body or None, headers=dict(headers or {}))
            response = connection.getresponse()
            data = response.read()
            return S3Response(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        finally:
            connection.close()

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise S3StartError(
                    f"moto exited with {self._process.returncode} while waiting for {what}; {self.log_tail()}"
                )
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise S3StartError(
                    f"moto did not start within {self.start_timeout:g} s (waiting for {what}); "
                    f"{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def create_bucket(self, bucket: str) -> None:
        """Create one more bucket (3-63 characters; one that already exists is fine)."""
        response = self.request("PUT", f"/{bucket}")
        if response.status != 200 and b"BucketAlreadyOwnedByYou" not in response.body:
            raise S3RequestError(
                f"creating bucket {bucket!r} answered {response.status}: {response.body[:500]!r}"
            )

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, n_bytes: int = 2000) -> str:
        """The end of moto's log, for error messages."""
        return f"--- moto.log (last {n_bytes} bytes):\n{tail(self.log_path, n_bytes)}"

    def _kill(self) -> None:
        """``SIGTERM`` to the process group, ``SIGKILL`` after :data:`STOP_TIMEOUT`; reap; close the log."""
        process, self._process = self._process, None
        if process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_TIMEOUT)
                    break
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (its data is gone with it), and remove the working directory if this object
        made it. Idempotent."""
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<MotoServer {self.endpoint} bucket={self.bucket} pid={self.pid}>"


def _element(xml: bytes, name: str) -> str:
    found = re.search(rb"<%s>([^<]*)</%s>" % (name.encode(), name.encode()), xml)
    if not found:
        raise S3StartError(f"moto's answer has no {name}: {xml[:500]!r}")
    return found.group(1).decode()
