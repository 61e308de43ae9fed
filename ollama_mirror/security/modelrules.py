"""``security.allowed_models`` and ``security.blocked_models``: which models the mirror serves.

A rule is a model name or a glob (``fnmatch``: ``*``, ``?``, ``[...]``), written the way users
write model names: ``llama3.2`` means ``library/llama3.2`` and, without a tag, every tag of it;
``llama3.2:1b`` only that tag; ``myteam/*`` every model of a namespace; ``*`` every library model;
``*/*/*`` everything.  A rule without a host applies on every upstream host (the mirror may serve
several, ``upstream.hosts``); ``hf.co/*/*`` names one.  Block rules win over allow rules.
Matching ignores case, as Ollama's names do (``Llama3.2:70B`` is ``llama3.2:70b``).

Blobs carry no model name.  A blob request is judged by the repository in its URL
(``/v2/<namespace>/<model>/blobs/...``): allowed when some allow rule names that repository for
at least one tag, refused when a block rule covers every tag of it.  A rule naming a single tag
therefore guards that tag's manifest, and its blobs only as far as they are reachable without
its manifest (by digest, through a repository that is allowed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..names import DEFAULT_NAMESPACE, ModelName


@dataclass(frozen=True)
class Rule:
    text: str  # as the operator wrote it (named in refusals)
    repository: str  # host/namespace/model pattern
    tag: str  # tag pattern; "*" when the rule has none

    @classmethod
    def parse(cls, text: str) -> Rule:
        rest, tag = text.strip(), "*"
        colon, slash = rest.rfind(":"), rest.rfind("/")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :] or "*"
        parts = rest.split("/")
        if len(parts) == 1:
            parts = ["*", DEFAULT_NAMESPACE, *parts]
        elif len(parts) == 2:
            parts = ["*", *parts]
        return cls(text, "/".join(parts).lower(), tag.lower())

    def matches(self, name: ModelName) -> bool:
        repository = f"{name.host}/{name.namespace}/{name.model}".lower()
        return fnmatchcase(repository, self.repository) and fnmatchcase(name.tag.lower(), self.tag)

    def matches_repository(self, repository: str) -> bool:
        return fnmatchcase(repository.lower(), self.repository)


class ModelRules:
    """Checks names against the rules; each check returns ``None`` (allowed) or why it is not."""

    def __init__(self, allowed: Iterable[str], blocked: Iterable[str]) -> None:
        self.allowed = [Rule.parse(t) for t in allowed if t.strip()]
        self.blocked = [Rule.parse(t) for t in blocked if t.strip()]

    @property
    def active(self) -> bool:
        return bool(self.allowed or self.blocked)

    def check(self, name: ModelName) -> str | None:
        for rule in self.blocked:
            if rule.matches(name):
                return f"model {name} is blocked by the rule {rule.text!r} in security.blocked_models"
        if self.allowed and not any(rule.matches(name) for rule in self.allowed):
            return f"model {name} is not in security.allowed_models"
        return None

    def check_repository(self, host: str, namespace: str, model: str) -> str | None:
        """For requests that name no tag (blobs, manifests by digest)."""
        repository = f"{host}/{namespace}/{model}"
        for rule in self.blocked:
            if rule.tag == "*" and rule.matches_repository(repository):
                return (
                    f"repository {repository} is blocked by the rule {rule.text!r} in security.blocked_models"
                )
        if self.allowed and not any(rule.matches_repository(repository) for rule in self.allowed):
            return f"repository {repository} is not in security.allowed_models"
        return None
