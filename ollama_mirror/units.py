"""Sizes in words, the way Ollama prints them: ``1.2 GB`` (powers of 1000, as disks and networks count)."""

from __future__ import annotations


def human_size(n: float) -> str:
    """``512 B``, ``1.5 KB``, ``1.2 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
