"""The twistd dropin ships in the wheel and is found after a plain ``pip install``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

ROOT = Path(__file__).resolve().parents[2]


def test_plugin_is_discoverable() -> None:
    makers = {plugin.tapname: plugin for plugin in getPlugins(IServiceMaker)}
    assert "ollama-mirror" in makers
    assert makers["ollama-mirror"].module == "ollama_mirror.tap"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        cwd=build,
    )
    (path,) = out.glob("ollama_mirror-*.whl")
    return path


def test_wheel_holds_the_dropin_and_nothing_of_twisted(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/ollama_mirror_plugin.py" in names
    assert "ollama_mirror/tap.py" in names and "ollama_mirror/py.typed" in names
    ui = "ollama_mirror/web/ui/"  # the web page's files ship inside the package (no CDN, air-gapped sites)
    for shipped in (
        "static/app.css",
        "static/app.js",
        "static/icon.svg",
        "templates/page.html",
        "templates/signin.html",
    ):
        assert ui + shipped in names
    assert not {"twisted/__init__.py", "twisted/plugins/__init__.py", "twisted/plugins/dropin.cache"} & names
    assert not [n for n in names if n.startswith("tests/")]


def test_installed_wheel_is_found_by_twistd_outside_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """A fresh environment with only the wheel of its own; its dependencies (Twisted...) are taken from
    the environment running the tests, whether that is the system's Python or a virtual environment
    (``--system-site-packages`` would reach the base interpreter's packages, not a venv's)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # a .pth line only adds a directory to sys.path: the outer environment's own .pth files (an editable
    # install of the checkout) are not run, so the checkout stays out of the picture
    Path(own, "outer-environment.pth").write_text("".join(f"{path}\n" for path in sorted(outer)))
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(python), "-c", "from twisted.scripts.twistd import run; run()", "ollama-mirror", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    where = subprocess.run(
        [str(python), "-c", "import ollama_mirror; print(ollama_mirror.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(venv) in where.stdout  # the installed copy, not the checkout


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("ollama_mirror.service", "ollama_mirror.daemon.service", "build_service"),
        ("ollama_mirror.logfiles", "ollama_mirror.ops.logoutput", "log_observer"),
    ],
)
def test_the_import_paths_earlier_releases_documented_still_work_and_warn(
    old: str, new: str, name: str
) -> None:
    code = f"import {old} as old, {new} as new; assert old.{name} is new.{name}"
    result = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"{old} is deprecated: import from {new}" in result.stderr
