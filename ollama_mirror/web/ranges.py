"""The ``Range`` request header, for blobs (one range is what Ollama and every registry client sends).

Parsing is werkzeug's (a dependency through Klein), which follows RFC 9110: the unit is
case-insensitive (``Bytes=0-3``) and whitespace around the parts is allowed.
"""

from __future__ import annotations

import re

from werkzeug.http import parse_range_header

_EMPTY_SUFFIX = re.compile(r"\s*-\s*0+\s*")


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
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None  # RFC 9110 14.2: a range unit we don't know is ignored
    if _EMPTY_SUFFIX.fullmatch(spec):
        raise UnsatisfiableRange(header)  # "the last 0 bytes"
    parsed = parse_range_header(header)
    if parsed is None:
        raise InvalidRange(f"invalid range {header!r}")
    if len(parsed.ranges) != 1:
        return None
    start, stop = parsed.ranges[0]  # stop is exclusive; a negative start is a suffix length
    if start < 0:
        if size == 0:
            raise UnsatisfiableRange(header)
        return max(0, size + start), size - 1
    if start >= size:
        raise UnsatisfiableRange(header)
    return start, size - 1 if stop is None else min(stop - 1, size - 1)
