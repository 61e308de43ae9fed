"""A full disk: telling "no space left" apart from other write failures, and saying so in words.

Whatever the mirror writes can meet a full disk: a blob's data, the record of its progress, the index,
a manifest.  Each place turns that into :class:`NoSpace`, keeps what it had written, and the request
that met it is answered 507 Insufficient Storage; the same request succeeds once space is freed (by the
sweep or an operator), resuming where it stopped.
"""

from __future__ import annotations

import errno
import os
import sqlite3

from ..units import human_size


class NoSpace(Exception):
    """The cache's disk has no room for what the mirror had to write (see the module docstring).

    The message is for clients and names no path; *path* is where the write failed and *free* the bytes
    free on that disk just after (when known), for the operator's log.
    """

    def __init__(self, message: str, path: str, free: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.free = free


def is_no_space(error: BaseException) -> bool:
    """Whether *error* says the disk (or the user's quota) is full: ENOSPC, EDQUOT, or SQLite's FULL."""
    if isinstance(error, NoSpace):
        return True
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return False


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the disk holding *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def no_space(what: str, path: str) -> NoSpace:
    """The :class:`NoSpace` for a write of *what* at *path* that found the disk full.  Its message is for
    clients (it names no path); the path and the free space are for the operator's log line."""
    try:
        free: int | None = free_bytes(os.path.dirname(path) or ".")
    except OSError:
        free = None
    return NoSpace(
        f"the mirror's disk is full: no space left to store {what}; what was fetched is kept, "
        "and a retry resumes once space is freed",
        path,
        free,
    )


def describe(error: NoSpace) -> str:
    """For the operator: where the write failed and how much is free there."""
    free = "unknown" if error.free is None else human_size(error.free)
    return f"no space left writing {error.path} ({free} free)"
