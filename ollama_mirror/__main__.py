"""``python -m ollama_mirror``: the ``ollama-mirror`` command (``serve``, ``prefetch``, ``ls``, ...)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
