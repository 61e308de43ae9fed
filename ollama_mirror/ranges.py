"""The ``Range`` request header, for blobs (one range is what Ollama and every registry client sends)."""

from __future__ import annotations

import re

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class InvalidRange(ValueError):
    """A Range header we cannot parse (answered with 400)."""


class UnsatisfiableRange(ValueError):
    """A well-formed range outside the blob (answered with 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte of a single range, or ``None`` for the whole blob.

    ``a-b``, ``a-`` and ``-n`` are understood; a multi-range request is answered in full
    (RFC 9110 lets a server ignore Range), which no Ollama client sends.  A unit other than
    ``bytes`` is ignored too.
    """
    if header is None:
        return None
    text = header.strip()
    if not text.lower().startswith("bytes="):
        return None  # RFC 9110 14.2: a range unit we don't know is ignored
    if "," in text:
        parts = text.removeprefix("bytes=").split(",")
        if not text.startswith("bytes=") or not all(re.fullmatch(r"\s*\d*-\d*\s*", p) for p in parts):
            raise InvalidRange(f"invalid range {header!r}")
        return None
    match = _RANGE.fullmatch(text)
    if match is None or match.group(1) == match.group(2) == "":
        raise InvalidRange(f"invalid range {header!r}")
    first_text, last_text = match.groups()
    if first_text == "":
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange(header)
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        raise InvalidRange(f"invalid range {header!r}")
    if first >= size:
        raise UnsatisfiableRange(header)
    return first, min(int(last_text), size - 1) if last_text else size - 1
