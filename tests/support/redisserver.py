"""A real Redis for integration tests: ``/usr/bin/redis-server`` on loopback, nothing persisted.

``RedisServer`` runs ``redis-server`` (Debian package ``redis-server``) in the foreground, bound to
``127.0.0.1`` on a port chosen free at run time, with no RDB snapshots (``--save ""``), no append-only file
(``--appendonly no``), no Unix socket, its working directory and log in a private temporary directory, and
``requirepass`` when a password is given. The constructor returns once ``PING`` answers ``PONG`` (after
``AUTH`` when there is a password). Usage::

    with RedisServer(password="secret") as redis:
        redis.url   # redis://:secret@127.0.0.1:PORT/0
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import IO

__all__ = ["REDIS_BINARY", "RedisServer", "RedisStartError", "resp_command"]

REDIS_BINARY = "/usr/bin/redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message holds the tail of its log."""


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
            fh.seek(max(0, fh.tell() - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def resp_command(*args: str | bytes) -> bytes:
    """One command in RESP (an array of bulk strings), as a client sends it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_line(sock: socket.socket) -> bytes:
    """One simple reply line (``+OK``, ``-ERR ...``, ``:1``) without its CRLF."""
    data = b""
    while not data.endswith(b"\r\n"):
        piece = sock.recv(1)
        if not piece:
            raise ConnectionError("redis closed the connection")
        data += piece
    return data[:-2]


class RedisServer:
    """``redis-server`` on ``127.0.0.1:<free port>``, started at construction.

    ``workdir`` holds its working directory (``dir``) and ``redis.log``; without it a temporary directory is
    made, and removed by :meth:`stop`. A given ``workdir`` is the caller's and is left in place.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        password: str | None = None,
        binary: str = REDIS_BINARY,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.password = password
        self.binary = binary
        self.start_timeout = start_timeout
        self.port = 0
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0`` (``redis://127.0.0.1:PORT/0`` without a password)."""
        auth = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self, port: int | None = None) -> None:
        """Start redis-server on *port*, or on a new free port (up to 3 tries when the port was taken
        meanwhile)."""
        if self.is_running():
            raise RuntimeError("redis-server already running")
        last_error: RedisStartError | None = None
        for _attempt in range(1 if port else 3):
            self.port = port or free_port()
            try:
                self._spawn_and_wait()
                return
            except RedisStartError as exc:
                last_error = exc
                self._kill()
                if "already in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def _spawn_and_wait(self) -> None:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", "",  # stdout, which is redis.log
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        began = time.monotonic()
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        deadline = began + self.start_timeout
        while True:
            if self._process.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with {self._process.returncode} during start-up; "
                    f"log tail:\n{tail(self.log_path)}"
                )
            if self.ping():
                self.startup_seconds = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                raise RedisStartError(
                    f"redis-server did not answer PING within {self.start_timeout:g} s; "
                    f"log tail:\n{tail(self.log_path)}"
                )
            time.sleep(0.01)

    def command(self, *args: str | bytes, timeout: float = 2.0) -> bytes:
        """Send one command (after ``AUTH`` if there is a password) and return its first reply line
        (``+PONG``, ``-ERR ...``, ``:1``, ``$5`` ...): enough for ``PING``, ``SET``, ``FLUSHALL``."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            if self.password:
                sock.sendall(resp_command("AUTH", self.password))
                answer = _read_line(sock)
                if answer != b"+OK":
                    raise ConnectionError(f"AUTH answered {answer!r}")
            sock.sendall(resp_command(*args))
            return _read_line(sock)

    def ping(self) -> bool:
        try:
            return self.command("PING", timeout=1.0) == b"+PONG"
        except OSError:
            return False

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _kill(self) -> None:
        process = self._process
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_TIMEOUT)
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Kill redis-server (``SIGKILL`` to its process group: nothing is persisted anyway), and remove the
        working directory if this object made it. Idempotent."""
        self._kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<RedisServer 127.0.0.1:{self.port} pid={self.pid}>"
