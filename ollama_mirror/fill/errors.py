"""How a Fill fails: what its readers see, and what the daemon does with the partial data."""

from __future__ import annotations


class FillFailed(Exception):
    """The download could not be completed; readers of the partial data must not end cleanly."""


class DigestMismatch(FillFailed):
    """The bytes received do not hash to the digest: they were discarded."""


class DiskFull(FillFailed):
    """The cache's disk ran out of space: the partial file is discarded."""


class PullFailed(Exception):
    """Ends a pull of a whole model; the message is what ``ollama pull`` prints."""
