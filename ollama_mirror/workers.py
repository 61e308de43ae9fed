"""``python -m ollama_mirror.workers``: the entry of a worker process under ``server.workers``.

The supervisor starts its workers by this name (and process lists show it), so it stays here while the
code lives in :mod:`ollama_mirror.daemon.workers`.
"""

from __future__ import annotations

if __name__ == "__main__":
    from .daemon.workers import worker_main

    raise SystemExit(worker_main())
