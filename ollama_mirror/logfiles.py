"""Deprecated path: the daemon"s log observer lives in :mod:`ollama_mirror.ops.logoutput`.

Earlier releases documented ``ollama_mirror.logfiles`` for applications that embed the mirror; it keeps
working in this release, with a warning, and goes in the next one.
"""

from __future__ import annotations

import warnings

from .ops.logoutput import log_observer, twistd_destination

warnings.warn(
    "ollama_mirror.logfiles is deprecated: import from ollama_mirror.ops.logoutput",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["log_observer", "twistd_destination"]
