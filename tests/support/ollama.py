"""The real ``ollama`` binary, found through ``OLLAMA_BIN``: servers of its own and its command line.

Nothing here builds Ollama: a developer builds it by hand from Ollama's public source and points
``OLLAMA_BIN`` at it; tests that need it call :func:`require_ollama`, which skips them (saying why) when it
is unset. Every :class:`OllamaServer` is isolated: its own ``HOME`` (so its own ``~/.ollama/id_ed25519``
key), its own ``OLLAMA_MODELS``, ``OLLAMA_HOST=127.0.0.1:PORT`` on loopback, cloud features off
(``OLLAMA_NO_CLOUD=1``), no proxy variables, and its own process group, killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.support.registry import free_port, tail

OLLAMA_BIN_ENV = "OLLAMA_BIN"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 300.0
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def ollama_binary() -> str | None:
    """The path in ``OLLAMA_BIN`` if it names an executable file, else ``None``."""
    path = os.environ.get(OLLAMA_BIN_ENV, "")
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def require_ollama() -> str:
    """The binary, or skip the calling test with the reason."""
    path = ollama_binary()
    if path is None:
        given = os.environ.get(OLLAMA_BIN_ENV)
        reason = (
            f"{OLLAMA_BIN_ENV} is unset: set it to an ollama binary built from Ollama's source to run the "
            "real-client tests (CI replays their recorded vectors instead)"
            if not given
            else f"{OLLAMA_BIN_ENV}={given} is not an executable file"
        )
        pytest.skip(reason)
    return path


def ollama_version(binary: str) -> str:
    """``0.32.15`` for a binary that prints ``client version is 0.32.15``."""
    result = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, env=_clean_env({}), check=False
    )
    found = re.search(r"version is (\S+)", result.stdout + result.stderr)
    return found.group(1) if found else "unknown"


def plain_text(output: str) -> str:
    """The CLI's output without its terminal control sequences and spinner redraws: one line per line."""
    text = _ANSI.sub("", output).replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.splitlines() if line.strip())


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OLLAMA_") and k.lower() not in _PROXY_VARIABLES
    }
    env["OLLAMA_NO_CLOUD"] = "1"
    env.update(extra)
    return env


def run_cli(
    binary: str, host: str, home: Path, *args: str, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``ollama ARGS`` with ``OLLAMA_HOST=host`` (a server of ours, or the mirror in API mode)."""
    env = _clean_env({"HOME": str(home), "OLLAMA_HOST": host})
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class OllamaServer:
    """``ollama serve`` on ``127.0.0.1:<free port>``, with a home and a models directory of its own.

    ``models_dir`` may name an existing directory (the mirror's cache, for the inference backend);
    ``env`` adds variables (``OLLAMA_NOPRUNE``...). Started by the constructor unless ``start=False``.
    """

    def __init__(
        self,
        binary: str,
        workdir: Path | str | None = None,
        *,
        models_dir: Path | str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> None:
        self.binary = binary
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="ollama-")) if workdir is None else Path(workdir)
        self.home = self.workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.models_dir = Path(models_dir) if models_dir is not None else self.workdir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        self.log_path = self.workdir / "serve.log"
        self.extra_env = dict(env or {})
        self._process: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def public_key_path(self) -> Path:
        """``~/.ollama/id_ed25519.pub`` of this server (made by ``ollama serve`` on its first start)."""
        return self.home / ".ollama" / "id_ed25519.pub"

    def public_key(self) -> str:
        return self.public_key_path.read_text().strip()

    def environment(self) -> dict[str, str]:
        return _clean_env(
            {
                "HOME": str(self.home),
                "OLLAMA_MODELS": str(self.models_dir),
                "OLLAMA_HOST": self.host,
                **self.extra_env,
            }
        )

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [self.binary, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"ollama serve did not come up on {self.host}\n{tail(self.log_path)}")
            time.sleep(0.1)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/api/version", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``ollama ARGS`` against this server."""
        return run_cli(self.binary, self.host, self.home, *args, timeout=timeout)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server and whatever it started (its runners)."""
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=STOP_TIMEOUT)
        self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> OllamaServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
