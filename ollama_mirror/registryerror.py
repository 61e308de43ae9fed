"""An error in the registry protocol's own terms, raised below the web layer and answered by it.

The layers that speak the registry protocol without serving HTTP themselves (a push's upload sessions in
:mod:`ollama_mirror.private`) say what went wrong with the status and error code the distribution spec
gives it; :mod:`ollama_mirror.web` turns it into the ``{"errors": [...]}`` body.
"""

from __future__ import annotations


class RegistryError(Exception):
    """An error a registry route answers with its status and registry error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
