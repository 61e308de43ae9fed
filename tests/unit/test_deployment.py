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


def test_the_install_steps_work_on_a_fresh_machine(tmp_path: Path) -> None:
    """The ``install`` lines of the unit's header and of the README, run as written but under a scratch
    root: on a fresh machine ``/etc/ollama-mirror`` does not exist yet (``install -D`` makes it)."""
    readme = (ROOT / "README.md").read_text()
    header = [
        line.removeprefix("#").strip() for line in UNIT.read_text().splitlines() if line.startswith("#")
    ]
    for source in (header, readme.splitlines()):
        steps = [line.split("#", 1)[0].strip() for line in source if line.strip().startswith("install ")]
        assert len(steps) == 2, steps
        root = tmp_path / f"root-{len(list(tmp_path.iterdir()))}"
        for step in steps:
            command = step.replace(" /etc/", f" {root}/etc/")
            result = subprocess.run(
                ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, check=False
            )
            assert result.returncode == 0, (command, result.stderr)
        assert (root / "etc/ollama-mirror/mirror.json").read_bytes() == (
            ROOT / "etc/mirror.json"
        ).read_bytes()
        assert (root / "etc/systemd/system/ollama-mirror.service").read_bytes() == UNIT.read_bytes()
