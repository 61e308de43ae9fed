"""``python -m ollama_mirror [options]``: the daemon in the foreground, for people who don't use twistd.

Equivalent to ``twistd -n --pidfile= ollama-mirror [options]``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.scripts.twistd import run

    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], "--nodaemon", "--pidfile=", "ollama-mirror", *args]
    run()


if __name__ == "__main__":
    main()
