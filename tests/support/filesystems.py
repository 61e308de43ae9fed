"""Filesystem conditions for tests: a directory made read-only, even for root; a small disk to fill up."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make *path* read-only (for this process and the daemons it starts): mode bits for a normal user; for root (whom mode bits do not
    stop), a read-only bind mount of the directory over itself, as a read-only remount would be."""
    if os.geteuid() != 0:
        directories = [path, *(p for p in path.rglob("*") if p.is_dir())]
        modes = {d: d.stat().st_mode for d in directories}
        for d in directories:
            d.chmod(modes[d] & ~0o222)
        try:
            yield
        finally:
            for d in directories:
                d.chmod(modes[d])
        return
    mount = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {mount.stderr.decode().strip()}")
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, check=False
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.decode().strip()}")
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # busy: detach it now, free it later


@contextlib.contextmanager
def small_disk(path: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of *size_mib* MiB mounted at *path* (created), for disk-full tests; needs root, else the
    test skips (under CI, where it must run, it fails)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mount.returncode != 0:
        message = f"cannot mount a small tmpfs here (root is needed): {mount.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill_up(directory: Path, keep_free: int = 0) -> Path:
    """Write a ballast file in *directory* until its disk is full (or has only *keep_free* bytes left);
    removing the file gives the space back."""
    ballast = directory / "ballast"
    piece = b"\0" * (1 << 20)
    with ballast.open("wb", buffering=0) as f:
        while True:
            st = os.statvfs(directory)
            room = st.f_bavail * st.f_frsize - keep_free
            if room <= 0:
                break
            try:
                f.write(piece[: min(len(piece), room)])
            except OSError:
                break
    return ballast
