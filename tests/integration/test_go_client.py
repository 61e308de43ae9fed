"""Ollama's official Go client library (``github.com/ollama/ollama/api``) against the mirror's API mode.

``tests/goclient`` is a small Go program using the library as Go programs that embed Ollama's client do;
it is built here with the Go toolchain (modules from the Go module proxy, pinned by its ``go.sum``) and
run against the real daemon: heartbeat, version, a streamed pull, list, show, an unknown model, delete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import MirrorDaemon
from tests.support.models import PushedModel

PROGRAM = Path(__file__).resolve().parents[1] / "goclient"


@pytest.fixture(scope="module")
def goclient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        message = "the Go toolchain (go) is not installed: it builds the Go client test program"
        if os.environ.get("CI"):
            pytest.fail(message + "; under CI this test must run", pytrace=False)
        pytest.skip(message)
    binary = tmp_path_factory.mktemp("goclient") / "goclient"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=PROGRAM,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return binary


def test_the_official_go_client_pulls_lists_shows_and_deletes(
    goclient: Path, mirror: MirrorDaemon, small_model: PushedModel
) -> None:
    result = subprocess.run(
        [
            str(goclient),
            "-host",
            mirror.url,
            "-model",
            small_model.repo.removeprefix("library/"),
            "-digest",
            small_model.manifest_hex,
            "-size",
            str(small_model.total_size),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "ok"
    assert any(
        line.startswith("pull tiny:") and line.endswith("pulling manifest ... success") for line in lines
    )
    assert "pull no-such-model: pull model manifest: file does not exist" in lines
    assert any(line.startswith("delete, then show: 404 model 'tiny' not found") for line in lines)
