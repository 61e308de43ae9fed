"""The command line as an operator meets it: twistd and ``ollama-mirror serve`` (``python -m ollama_mirror``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
    clean["PYTHONPATH"] = str(ROOT) + os.pathsep + clean.get("PYTHONPATH", "")
    return clean


def twistd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
    command += ["ollama-mirror", *args]
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=60)


def test_bad_configuration_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = twistd("--set", "server.port=eleven", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'ollama-mirror: configuration error: server.port = "eleven" (from command line): expected a whole number'
    ]
    assert "Traceback" not in result.stdout + result.stderr


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ollama_mirror", "serve"]
    result = subprocess.run(
        command,
        cwd=tmp_path,
        env={**env(), "OLLAMA_MIRROR_CACHE_MAX_SIZE_GB": "-5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert 'cache.max_size_gb = "-5" (from OLLAMA_MIRROR_CACHE_MAX_SIZE_GB): is negative' in result.stderr


def test_port_in_use_exits_with_one_clear_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = twistd(
            "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path
        )
    finally:
        taken.close()
    assert result.returncode == 2
    output = result.stdout + result.stderr  # by then twistd routes stderr into its log (stdout with -n)
    assert f"ollama-mirror: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in output
    assert "Traceback" not in output


def test_help_lists_the_options(tmp_path: Path) -> None:
    result = twistd("--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--config", "--listen", "--set", "--cache-dir", "--upstream-url"):
        assert option in result.stdout


def test_serve_serves_head_slash(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "ollama_mirror", "serve", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/", method="HEAD")
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "python -m ollama_mirror never answered"
                time.sleep(0.1)
        assert (tmp_path / "cache" / "blobs").is_dir()  # the default cache directory, relative to cwd
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_version_is_ours_under_serve_and_twistd(tmp_path: Path) -> None:
    from ollama_mirror import __version__

    for result in (
        twistd("--version", cwd=tmp_path),
        subprocess.run(
            [sys.executable, "-m", "ollama_mirror", "serve", "--version"],
            cwd=tmp_path,
            env=env(),
            capture_output=True,
            text=True,
            timeout=60,
        ),
    ):
        assert result.returncode == 0
        assert result.stdout.startswith(f"ollama-mirror {__version__} (Twisted "), result.stdout


@pytest.mark.parametrize(
    ("args", "pidfile"),
    [
        (["-n", "ollama-mirror"], ""),  # in the foreground: no twistd.pid left in the working directory
        (["--nodaemon", "ollama-mirror"], ""),
        (["-n", "--pidfile=/run/m.pid", "ollama-mirror"], "/run/m.pid"),  # asked for: kept
        (["ollama-mirror"], os.path.abspath("twistd.pid")),  # daemonized: twistd's default stays
    ],
)
def test_a_foreground_daemon_writes_no_pidfile_unless_asked(args: list[str], pidfile: str) -> None:
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions([*args, "--cache-dir", "/nonexistent/cache"])
    assert options["pidfile"] == pidfile
