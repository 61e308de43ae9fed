"""``python -m ollama_mirror``: the ``ollama-mirror`` command (``serve``, ``prefetch``, ``ls``, ...)."""

from __future__ import annotations

from .cli.main import main

if __name__ == "__main__":
    main()
