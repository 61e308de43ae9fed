"""The configuration as documents show it: the README's reference table and ``etc/mirror.json``."""

from __future__ import annotations

from typing import Any

from .schema import Key, keys


def default_text(key: Key) -> str:
    value = key.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if key.kind in ("upstreams", "hostmap"):
        return "{}"
    if isinstance(value, tuple):
        return "(none)" if not value else ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if key.kind == "size":
        return size_text(value)
    return str(value) if value != "" else "(empty)"


def size_text(value: int) -> str:
    """A size as the configuration accepts it, exactly: ``64MiB``, ``16KiB``, ``10MB``, or bytes."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("GB", 10**9), ("MB", 10**6)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def reference_table() -> str:
    """The configuration reference in Markdown, as the README shows it."""
    rows = ["| JSON key | Environment variable | Default | Meaning |", "| --- | --- | --- | --- |"]
    for key in keys():
        doc = key.doc + (
            " *(Accepted, not in effect yet: setting it logs a warning.)*" if key.planned else ""
        )
        rows.append(f"| `{key.dotted}` | `{key.env}` | `{default_text(key)}` | {doc} |")
    return "\n".join(rows)


def sample_document() -> dict[str, dict[str, Any]]:
    """Every key with its default, as ``etc/mirror.json`` holds them."""
    document: dict[str, dict[str, Any]] = {}
    for key in keys():
        value = list(key.default) if isinstance(key.default, tuple) else key.default
        if key.kind in ("upstreams", "hostmap"):
            value = {}
        document.setdefault(key.section, {})[key.name] = value
    return document
