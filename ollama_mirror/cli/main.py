"""The ``ollama-mirror`` command: the daemon, and what an operator does to its cache.

::

    ollama-mirror serve [daemon options]           the daemon in the foreground (= twistd -n ollama-mirror)
    ollama-mirror prefetch MODEL... | --from FILE  cache models, through a running mirror or on the cache
    ollama-mirror ls                               cached models, sizes, last use
    ollama-mirror export MODEL... -o BUNDLE        models into a tar bundle (air-gapped sites, backups)
    ollama-mirror import BUNDLE                    a bundle into the cache, verified before anything appears
    ollama-mirror gc                               one eviction sweep now
    ollama-mirror rm MODEL...                      remove models (blobs other models use stay)
    ollama-mirror pin MODEL... / unpin MODEL...    keep tags whatever retention and the size cap say
    ollama-mirror health                           a running mirror's /mirror/health, as an exit status

Exit status: 0 done; 1 the operation failed (nothing or not everything done, see the message);
2 wrong usage or configuration; 3 some of several models failed, the others are done; 130
interrupted.  Errors are one line on standard error; progress goes to standard error too, results
to standard output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import NoReturn

from ..cache.lock import CacheBusy
from ..config import ConfigError
from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CommandError, error_line
from .parser import build_parser


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        serve(args[1:])
    options = build_parser().parse_args(args)
    if options.command is None:
        build_parser().print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    raise SystemExit(run(options))


def run(options: argparse.Namespace) -> int:
    """Run a parsed command; every expected failure becomes one line and an exit status."""
    previous = signal.signal(signal.SIGTERM, terminate)  # so that `finally` cleans up on SIGTERM too
    try:
        code: int = options.func(options)
        return code
    except CommandError as e:
        error_line(str(e))
        return e.code
    except ConfigError as e:
        error_line(f"configuration error: {e}")
        return EXIT_USAGE
    except CacheBusy as e:
        error_line(f"{e}; {busy_hint(options.command, str(e))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nothing more may be written to the pipe)
        return EXIT_FAILED
    except OSError as e:  # the cache directory or a file given cannot be used
        where = f" ({e.filename})" if e.filename else ""
        error_line(f"{e.strerror or e}{where}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


def busy_hint(command: str, reason: str) -> str:
    """What to do instead when the cache is locked: go through the daemon where the command can."""
    if "daemon" not in reason:
        return "try again when it is done"
    if command in ("prefetch", "rm"):
        return f"to {command} through the running daemon, add --mirror URL (e.g. --mirror http://127.0.0.1:11434)"
    if command == "gc":
        return "the running daemon sweeps by itself every cache.cleanup_interval seconds"
    return "stop the daemon, or try again when the import is done"


def terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(args: list[str]) -> NoReturn:
    """``twistd --nodaemon --pidfile= ollama-mirror ARGS``: the same plugin, options and service."""
    from twisted.scripts.twistd import run as twistd

    if "--help" in args or "-h" in args:
        from ..tap import Options

        options = Options()
        sys.stdout.write(
            f"Usage: ollama-mirror serve {options.synopsis}\n"
            "Runs the daemon in the foreground: the same service as 'twistd -n ollama-mirror'.\n"
            + options.getUsage()
        )
        raise SystemExit(EXIT_OK)
    sys.argv = ["ollama-mirror serve", "--nodaemon", "--pidfile=", "ollama-mirror", *args]
    twistd()
    raise SystemExit(EXIT_OK)
