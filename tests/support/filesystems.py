"""Filesystem conditions for tests: a directory made read-only, even for root."""

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
