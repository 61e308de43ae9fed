"""The ``ollama-mirror`` command as a subprocess: ``python -m ollama_mirror ARGS`` from the source tree.

Run like the daemon (:mod:`tests.support.daemon`): the repository root first on ``PYTHONPATH``, every
``OLLAMA_MIRROR_*`` variable of the test run removed (``env`` adds some back), in its own session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_MIRROR_")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), clean.get("PYTHONPATH", "")]))
    clean["PYTHONUNBUFFERED"] = "1"
    clean.update(env or {})
    return clean


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ollama_mirror", *args]


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = TIMEOUT,
    cwd: Path | str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the command to its end; stdout and stderr are kept as bytes (``export -o -`` writes a tar)."""
    return subprocess.run(
        cli_command(*args),
        input=input,
        capture_output=True,
        env=cli_env(env),
        cwd=cwd or REPO_ROOT,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode("utf-8", "replace").strip().splitlines()
