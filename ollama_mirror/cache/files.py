"""Small files every process serving one cache must agree on: made once, then only read.

Workers (``server.workers``) and daemons sharing a cache start at the same moment, so "create it if
missing" must never let one process read a file another has created but not yet written.  The
content is written to a file of this process's own first, then linked into place: ``link`` fails if
the name exists, so exactly one process's content wins and every other reads that complete file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable


def read_or_create(path: str, make: Callable[[], bytes], mode: int = 0o600) -> bytes:
    """The content of *path*, creating it with ``make()`` if it does not exist yet."""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        return f.read()
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    staging = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: its content wins
            os.link(staging, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    with open(path, "rb") as f:
        return f.read()


def cache_marker(work_dir: str) -> str:
    """The ``Via`` value sent upstream: one per cache, so that every worker process of a mirror
    knows a request any of them sent, and a chain of mirrors (each with its own cache) is no loop."""
    path = os.path.join(work_dir, "instance-id")
    instance = read_or_create(path, lambda: secrets.token_hex(6).encode(), 0o644).decode().strip()
    if not instance.isalnum():
        raise ValueError(f"{path} holds no usable instance id; delete it to make a new one")
    return f"1.1 ollama-mirror-{instance}"
