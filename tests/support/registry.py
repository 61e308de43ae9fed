"""A real upstream registry for integration tests: the CNCF distribution registry on loopback.

``RegistryProcess`` runs ``/usr/bin/docker-registry serve CONFIG`` (Debian package ``docker-registry``,
distribution 2.8.x) with filesystem storage in a private temporary directory, bound to ``127.0.0.1`` only.

Behaviour of this registry that the mirror must cope with (as Ollama's client meets it):

- a manifest GET *by tag* without ``Accept: application/vnd.docker.distribution.manifest.v2+json`` answers
  ``400 MANIFEST_INVALID`` (the registry would have to down-convert to schema 1, which it cannot);
- blob GETs honour ``Range`` (``206`` + ``Content-Range``);
- ``GET /v2/`` answers ``200 {}`` (``registry.ollama.ai`` answers 404 there);
- a blob that exists in storage but was never pushed to *this* repository is ``404`` for that repository.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class RegistryStartError(RuntimeError):
    """The registry did not come up; the message holds the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, n_bytes: int = 4000) -> str:
    """The last ``n_bytes`` of a (log) file, decoded leniently; empty if it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash (``$2b$``) of ``password``, the only format distribution's htpasswd accepts.

    Uses the ``bcrypt`` package if installed, else the stdlib ``crypt`` module (libxcrypt supports bcrypt on
    Debian; ``crypt`` is deprecated in 3.11 and gone in 3.13, hence the lazy import).
    """
    try:
        import bcrypt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pass
    else:
        hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
        return hashed.decode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    hashed_str = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed_str or not hashed_str.startswith("$2"):
        raise RuntimeError("no bcrypt implementation available (install the 'bcrypt' package)")
    return hashed_str


class RegistryProcess:
    """The distribution registry on ``127.0.0.1:<free port>`` with its own storage, started at construction.

    ``basic_auth=(user, password)`` turns on ``auth: htpasswd`` (Basic challenge); ``silly_auth=(realm,
    service)`` turns on the ``silly`` provider, which answers ``401`` with a ``Bearer`` challenge to any
    request without an ``Authorization`` header and accepts any header value. ``access_log`` keeps the
    per-request log lines (useful to see which requests the mirror sent upstream). Storage lives in
    ``workdir/storage`` unless ``storage_dir`` names another (a second process may serve the storage of the
    first, read-only in practice); the process's stdout and stderr go to ``workdir/registry.log``.
    ``tls=(certificate, key)`` (PEM files) serves HTTPS instead of HTTP (``url`` is then ``https://``).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        basic_auth: tuple[str, str] | None = None,
        silly_auth: tuple[str, str] | None = None,
        access_log: bool = True,
        binary: str = REGISTRY_BINARY,
        start_timeout: float = START_TIMEOUT,
        tls: tuple[Path | str, Path | str] | None = None,
        storage_dir: Path | str | None = None,
    ) -> None:
        if basic_auth is not None and silly_auth is not None:
            raise ValueError("choose one of basic_auth and silly_auth")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="registry-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage" if storage_dir is None else Path(storage_dir)
        self.storage_dir.mkdir(exist_ok=True)
        self.tls = tls
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.basic_auth = basic_auth
        self.silly_auth = silly_auth
        self.access_log = access_log
        self.binary = binary
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.start()

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``, as it appears in model names (``127.0.0.1:PORT/library/tiny``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (``https://`` with ``tls``; no trailing slash)."""
        return f"{'https' if self.tls else 'http'}://{self.host_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def auth_headers(self) -> dict[str, str]:
        """Headers that get a request past the configured auth (empty when there is none)."""
        if self.basic_auth is not None:
            token = base64.b64encode(f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        if self.silly_auth is not None:
            return {"Authorization": "Bearer anything"}
        return {}

    # -- life cycle ------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "warn",
                "formatter": "text",
                "accesslog": {"disabled": not self.access_log},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # No blobdescriptor cache: tests delete and re-push, and want storage to be the only truth.
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host_port,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.basic_auth is not None:
            user, password = self.basic_auth
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{user}:{bcrypt_hash(password)}\n")
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}
        elif self.silly_auth is not None:
            realm, service = self.silly_auth
            config["auth"] = {"silly": {"realm": realm, "service": service}}
        # YAML is a superset of JSON: no YAML library needed and no quoting surprises.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def start(self) -> None:
        """Start (or restart, keeping storage) the registry; a new port is picked only on the first start."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("registry already running")
        last_error: RegistryStartError | None = None
        for attempt in range(3):
            if self.port == 0 or attempt > 0:
                self.port = free_port()
            self._write_config()
            try:
                self._spawn_and_wait()
                return
            except RegistryStartError as exc:
                last_error = exc
                if "address already in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def _spawn_and_wait(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._reap()
                raise RegistryStartError(
                    f"docker-registry exited with {code} during start-up; log tail:\n{tail(self.log_path)}"
                )
            if self._answers_v2():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RegistryStartError(
                    f"docker-registry did not answer GET /v2/ within {self.start_timeout:.0f} s; "
                    f"log tail:\n{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _answers_v2(self) -> bool:
        request = urllib.request.Request(self.url + "/v2/", headers=self.auth_headers())
        context = None
        if self.tls is not None:  # readiness only: whether the certificate is trusted is the tests' business
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL the registry's process group. Idempotent."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the registry's process group (an upstream that vanishes mid-transfer)."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT)
        self._reap()

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<RegistryProcess {self.url} pid={self.pid}>"
