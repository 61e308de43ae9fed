"""The real mirror daemon as a subprocess: ``twistd -n ollama-mirror --config CONFIG.json``.

twistd is run from the current interpreter (``python -c "from twisted.scripts.twistd import run; run()"``),
with the repository root first on ``PYTHONPATH`` so that the source tree's ``twisted/plugins`` dropin and the
``ollama_mirror`` package are used without installation, in its own session (process group), with every
``OLLAMA_MIRROR_*`` variable of the test run removed from its environment, and bound to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tests.support.registry import free_port, tail

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
TWISTD = "from twisted.scripts.twistd import run; run()"

# Test-bed defaults, overridable through ``config``: one loopback client makes many requests in a test run,
# so rate limiting is off unless a test turns it on.
DEFAULT_CONFIG: dict[str, dict[str, Any]] = {
    "security": {"rate_limit_requests": 0},
}


class DaemonStartError(RuntimeError):
    """The daemon did not come up; the message holds the tail of its log and its stderr."""


class MirrorFactory(Protocol):
    """The ``mirror_factory`` fixture: keyword arguments of :class:`MirrorDaemon` (``config``, ``env``,
    ``overrides``, ``start``…); ``cache_dir`` and ``upstream_url`` default to a fresh directory and the
    session's registry."""

    created: list[MirrorDaemon]  # every daemon made so far in the test

    def __call__(self, **kwargs: Any) -> MirrorDaemon: ...


def merge_config(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (``{"upstream": {"timeout": 5}}``)."""
    merged: dict[str, Any] = {section: dict(values) for section, values in base.items()}
    for section, values in extra.items():
        if isinstance(values, Mapping):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    return merged


class MirrorDaemon:
    """``twistd -n ollama-mirror`` on a free loopback port, started by the constructor unless ``start=False``.

    ``config`` holds extra sections/keys merged over the generated ones (``server.host``/``server.port``,
    ``cache.directory``, ``upstream.url``, and :data:`DEFAULT_CONFIG`); ``overrides`` become
    ``--set SECTION.KEY=VALUE`` flags; ``env`` adds environment variables (e.g. ``OLLAMA_MIRROR_*`` to test
    the environment layer). Files: ``workdir/config.json``, ``twistd.log`` (the daemon's log; twistd appends
    to it across restarts), ``stdout.log`` and ``stderr.log``.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        upstream_url: str,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        overrides: Mapping[str, str] | None = None,
        workdir: Path | str | None = None,
        port: int | None = None,
        start: bool = True,
        start_timeout: float = START_TIMEOUT,
        open_files: int | None = None,
    ) -> None:
        """*open_files*: the daemon's limit of open files (soft and hard), as a service manager sets it."""
        self._own_workdir = workdir is None
        self.open_files = open_files
        self.workdir = Path(tempfile.mkdtemp(prefix="mirror-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = Path(cache_dir)
        self.upstream_url = upstream_url
        self.port = free_port() if port is None else port
        self.config_path = self.workdir / "config.json"
        self.log_path = self.workdir / "twistd.log"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.overrides = dict(overrides or {})
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        generated: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": self.port},
            "cache": {"directory": str(self.cache_dir)},
            "upstream": {"url": upstream_url},
        }
        self.config: dict[str, Any] = merge_config(merge_config(DEFAULT_CONFIG, generated), config or {})
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")
        self._process: subprocess.Popen[bytes] | None = None
        self._files: list[Any] = []
        if start:
            self.start()

    # -- addresses -------------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what goes before ``/library/model`` in a registry-mode model name."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); also the ``OLLAMA_HOST`` / ``Client(host=...)``."""
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-c",
            TWISTD,
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "ollama-mirror",
            "--config",
            str(self.config_path),
        ]
        for key, value in self.overrides.items():
            args += ["--set", f"{key}={value}"]
        if self.open_files is not None:  # (util-linux's prlimit sets it for the command it runs)
            args = ["prlimit", f"--nofile={self.open_files}:{self.open_files}", "--", *args]
        return args

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
        pythonpath = [str(REPO_ROOT)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self, wait: bool = True) -> None:
        """Spawn the daemon; with ``wait``, return once ``HEAD /`` answers 200 or raise DaemonStartError."""
        if self.is_running():
            raise RuntimeError("daemon already running")
        self._close_files()
        stdout = self.stdout_path.open("ab")
        stderr = self.stderr_path.open("ab")
        self._files = [stdout, stderr]
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=REPO_ROOT,
            env=self.environment(),
            start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise DaemonStartError(
                    f"ollama-mirror exited with {code} during start-up\n{self.diagnostics()}"
                )
            if self.answers():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise DaemonStartError(
                    f"ollama-mirror did not answer HEAD / within {self.start_timeout:.0f} s\n"
                    + self.diagnostics()
                )
            time.sleep(0.05)

    def answers(self) -> bool:
        """True if ``HEAD /`` answers 200 now."""
        request = urllib.request.Request(self.url + "/", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the daemon, wait ``timeout`` s, then SIGKILL its process group; returns the exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        self._kill_group()
        self._close_files()
        return process.returncode

    def kill(self) -> int | None:
        """SIGKILL the daemon's whole process group at once (crash tests); returns the exit code."""
        process = self._process
        if process is None:
            return None
        self._kill_group()
        self._close_files()
        return process.returncode

    def _kill_group(self) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # also anything the daemon started
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT)

    def restart(self, wait: bool = True) -> None:
        """Stop (if running) and start again on the same port with the same configuration."""
        self.stop()
        self.start(wait=wait)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the daemon to exit on its own (e.g. a bad configuration); SIGKILL and raise on timeout."""
        assert self._process is not None
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def _close_files(self) -> None:
        for fh in self._files:
            fh.close()
        self._files = []

    def cleanup(self) -> None:
        """Stop, and remove the working directory if this object created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- output ----------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """The whole twistd log (all runs)."""
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace") if self.stderr_path.exists() else ""

    def stdout_text(self) -> str:
        return self.stdout_path.read_text("utf-8", "replace") if self.stdout_path.exists() else ""

    def diagnostics(self) -> str:
        return (
            f"command: {' '.join(self.command())}\n"
            f"--- twistd.log (tail) ---\n{tail(self.log_path)}\n"
            f"--- stderr (tail) ---\n{tail(self.stderr_path)}\n"
            f"--- stdout (tail) ---\n{tail(self.stdout_path, 2000)}"
        )

    def __enter__(self) -> MirrorDaemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<MirrorDaemon {self.url} pid={self.pid}>"


def run_daemon_args(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``twistd ... ollama-mirror ARGS`` to completion (``--help``, a bad flag) with the daemon's
    environment rules; returns its output. The caller supplies every plugin argument."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH", "")]))
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "ollama-mirror", *args],
        cwd=REPO_ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )
