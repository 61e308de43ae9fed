"""Model names and digests, validated before they ever become part of a path.

Follows Ollama's ``types/model/name.go``: ``[host/][namespace/]model[:tag]`` with the defaults
``registry.ollama.ai``, ``library`` and ``latest``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


class InvalidName(ValueError):
    """A model name, tag or digest that does not follow Ollama's rules."""


def is_namespace(text: str) -> bool:
    return _NAMESPACE.fullmatch(text) is not None


def is_model(text: str) -> bool:
    return _MODEL.fullmatch(text) is not None


def is_tag(text: str) -> bool:
    return _TAG.fullmatch(text) is not None


def is_host(text: str) -> bool:
    return _HOST.fullmatch(text) is not None


def parse_digest(text: str) -> str:
    """``sha256:<64 hex>`` → the hex; anything else raises :class:`InvalidName`."""
    match = _DIGEST.fullmatch(text)
    if match is None:
        raise InvalidName(f"invalid digest {text!r}")
    return match.group(1)


def is_digest(text: str) -> bool:
    return _DIGEST.fullmatch(text) is not None


@dataclass(frozen=True, order=True)
class ModelName:
    """A fully qualified model name; every part has been validated."""

    host: str
    namespace: str
    model: str
    tag: str

    def __post_init__(self) -> None:
        for part, ok in (
            (self.host, is_host(self.host)),
            (self.namespace, is_namespace(self.namespace)),
            (self.model, is_model(self.model)),
            (self.tag, is_tag(self.tag)),
        ):
            if not ok:
                raise InvalidName(f"invalid name part {part!r}")

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse ``[host/][namespace/]model[:tag]`` as Ollama does."""
        rest, tag = text, DEFAULT_TAG
        colon, slash = text.rfind(":"), text.rfind("/")
        if colon > slash:
            rest, tag = text[:colon], text[colon + 1 :]
        parts = rest.split("/")
        if len(parts) == 1:
            host, namespace, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
        elif len(parts) == 2:
            host, (namespace, model) = DEFAULT_HOST, parts
        elif len(parts) == 3:
            host, namespace, model = parts
        else:
            raise InvalidName(f"invalid model name {text!r}")
        return cls(host, namespace, model, tag)

    @property
    def repository(self) -> str:
        """The registry repository, ``namespace/model``."""
        return f"{self.namespace}/{self.model}"

    def display(self) -> str:
        """The shortest name Ollama shows for this model, e.g. ``llama3.2:latest``."""
        if self.host == DEFAULT_HOST:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


class PrivateNamespaces:
    """``private.namespaces``: the namespaces (names or globs) whose models live on this mirror only."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(patterns)

    def __contains__(self, namespace: object) -> bool:
        return isinstance(namespace, str) and any(fnmatchcase(namespace, p) for p in self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def holds(self, name: ModelName) -> bool:
        """Whether *name* is a private model (pushed here, never asked of an upstream)."""
        return name.namespace in self
