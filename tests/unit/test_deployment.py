"""The systemd unit in ``etc/`` as systemd itself reads it (``systemd-analyze verify``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "ollama-mirror.service"
INSTALLED = "/opt/ollama-mirror/bin/ollama-mirror"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve " in text
    # verify checks that ExecStart's program exists: point it at one that does, change nothing else.
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED, sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
