"""Pinned models: tags an operator wants kept whatever the retention and the size cap say.

A pin is the operator's intent, which no file of the cache can tell, so it is not in the index (which is
rebuilt from the files when damaged) but in a small JSON file of its own, ``.mirror/pins.json``.  The
daemon, its worker processes and ``ollama-mirror pin`` may all change it: each change takes an ``flock``
on ``.mirror/pins.lock``, reads the file, and replaces it atomically, so no change is lost and a crash
leaves the old list or the new one.  Readers (the sweep) read the file each time, so a pin made by the
command is honoured by a running daemon's next sweep.  Every method does file I/O: call them in a
worker thread from the reactor.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator

from ..names import InvalidName, ModelName

PINS_FILE = "pins.json"
LOCK_FILE = "pins.lock"


class Pins:
    """The pinned tags of one cache (see the module docstring)."""

    def __init__(self, work_dir: str) -> None:
        self.path = os.path.join(work_dir, PINS_FILE)
        self._lock_path = os.path.join(work_dir, LOCK_FILE)
        self._work_dir = work_dir

    def names(self) -> frozenset[str]:
        """Every pinned tag, as ``str(ModelName)``; a missing or unreadable file pins nothing."""
        try:
            with open(self.path, "rb") as f:
                document = json.load(f)
        except (FileNotFoundError, ValueError):
            return frozenset()
        found = document.get("pinned", []) if isinstance(document, dict) else []
        names = set()
        for text in found if isinstance(found, list) else []:
            with contextlib.suppress(InvalidName, TypeError, AttributeError):
                names.add(str(ModelName.parse(text)))
        return frozenset(names)

    def holds(self, name: ModelName) -> bool:
        return str(name) in self.names()

    def pin(self, name: ModelName) -> bool:
        """Pin *name*; ``False`` if it already was."""
        return self._change(lambda names: names | {str(name)})

    def unpin(self, name: ModelName) -> bool:
        """Unpin *name*; ``False`` if it was not pinned."""
        return self._change(lambda names: names - {str(name)})

    def _change(self, change: Callable[[frozenset[str]], frozenset[str]]) -> bool:
        with self._locked():
            before = self.names()
            after = change(before)
            if after == before:
                return False
            self._write(after)
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self._work_dir, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held only for a read and a small write
            yield
        finally:
            os.close(fd)

    def _write(self, names: frozenset[str]) -> None:
        data = json.dumps({"pinned": sorted(names)}, indent=1).encode() + b"\n"
        fd, temporary = tempfile.mkstemp(prefix=".tmp-pins-", dir=self._work_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
