"""How a Fill fails: what its readers see, and what the daemon does with the partial data."""

from __future__ import annotations

from ..cache.space import NoSpace, no_space


class FillFailed(Exception):
    """The download could not be completed; readers of the partial data must not end cleanly."""


class DigestMismatch(FillFailed):
    """The bytes received do not hash to the digest: they were discarded."""


class DiskFull(FillFailed, NoSpace):
    """The cache's disk ran out of space: the download stops, keeping what it wrote and its record, and
    resumes from there when asked again once space is freed."""


def disk_full(digest: str, path: str) -> DiskFull:
    """The :class:`DiskFull` of blob *digest*, whose write at *path* found the disk full."""
    found = no_space(f"blob {digest}", path)
    return DiskFull(found.message, found.path, found.free)


class PullFailed(Exception):
    """Ends a pull of a whole model; the message is what ``ollama pull`` prints, *status* what a
    non-streaming ``/api/pull`` answers (507 when the mirror's disk is full)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status
