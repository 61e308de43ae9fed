"""Deprecated path: the service tree lives in :mod:`ollama_mirror.daemon.service`.

Earlier releases documented ``ollama_mirror.service`` for applications that embed the mirror; it keeps
working in this release, with a warning, and goes in the next one.
"""

from __future__ import annotations

import warnings

from .daemon.service import MirrorService, build_service

warnings.warn(
    "ollama_mirror.service is deprecated: import from ollama_mirror.daemon.service",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["MirrorService", "build_service"]
