"""The ``ollama-mirror`` command line: one subcommand per operation, each with its options."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from .. import __version__
from .bundles import cmd_export, cmd_import
from .common import EXIT_USAGE
from .maintenance import cmd_gc, cmd_ls, cmd_pin, cmd_rm
from .prefetch import cmd_prefetch
from .remote import cmd_health


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ollama-mirror",
        description="Pull-through caching mirror for the Ollama model registry.",
        epilog="Exit status: 0 done, 1 failed, 2 usage or configuration error, 3 partly done "
        "(some models failed), 130 interrupted. Run 'ollama-mirror COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ollama-mirror {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.add_parser(
        "serve",
        help="run the daemon in the foreground (options: 'ollama-mirror serve --help')",
        add_help=False,
    )
    _add_prefetch(commands)
    _add_ls(commands)
    _add_export(commands)
    _add_import(commands)
    _add_gc(commands)
    _add_rm(commands)
    _add_pin(commands)
    _add_health(commands)
    return parser


def _add_prefetch(commands: Any) -> None:
    prefetch = commands.add_parser(
        "prefetch",
        help="cache models, through a running mirror (--mirror) or directly on the cache",
        description="Cache models ahead of use. With --mirror URL the running mirror pulls them (its "
        "/api/pull); without it they are pulled straight into the cache directory, which no daemon may "
        "be using meanwhile. Either way each blob is verified (sha256) before it is published.",
    )
    prefetch.add_argument("models", nargs="*", metavar="MODEL", help="e.g. llama3.2 or qwen2.5:7b")
    prefetch.add_argument(
        "--from", dest="from_file", metavar="FILE", help="read model names from FILE, one a line ('-': stdin)"
    )
    remote_options(prefetch)
    cache = cache_options(prefetch)
    cache.add_argument("--upstream-url", metavar="URL", help="the registry to pull from (upstream.url)")
    quiet_option(prefetch)
    prefetch.set_defaults(func=cmd_prefetch)


def _add_ls(commands: Any) -> None:
    ls = commands.add_parser(
        "ls",
        help="list cached models with sizes and last use",
        description="List the models in the cache directory, largest use first: size, when last used "
        "(from the cache index, else the manifest's time) and how often pulled.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON document on standard output")
    ls.add_argument("--all", action="store_true", help="include models whose blobs are not all cached")
    cache_options(ls)
    ls.set_defaults(func=cmd_ls)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write models into a tar bundle",
        description="Write cached models (manifests, blobs, and an index of their digests and sizes) into "
        "one tar bundle for 'ollama-mirror import' on another cache. Blobs are streamed and re-verified.",
    )
    export.add_argument("models", nargs="*", metavar="MODEL")
    export.add_argument("--all", action="store_true", help="every complete model of the cache")
    export.add_argument(
        "-o", "--output", required=True, metavar="BUNDLE", help="the bundle file ('-': standard output)"
    )
    cache_options(export)
    quiet_option(export)
    export.set_defaults(func=cmd_export)


def _add_import(commands: Any) -> None:
    imp = commands.add_parser(
        "import",
        help="add the models of a bundle to the cache",
        description="Read a bundle, verify every blob and manifest against its digest, and only then add "
        "the models to the cache. Safe while a daemon serves the cache: models appear complete or not at "
        "all. A damaged or truncated bundle adds nothing.",
    )
    imp.add_argument("bundle", metavar="BUNDLE", help="the bundle file ('-': standard input)")
    cache_options(imp)
    quiet_option(imp)
    imp.set_defaults(func=cmd_import)


def _add_gc(commands: Any) -> None:
    gc = commands.add_parser(
        "gc",
        help="run one eviction sweep now",
        description="One sweep of the cache with the configured limits (cache.retention_days, "
        "cache.max_size_gb), as the daemon runs every cache.cleanup_interval seconds.",
    )
    cache_options(gc)
    gc.set_defaults(func=cmd_gc)


def _add_rm(commands: Any) -> None:
    rm = commands.add_parser(
        "rm",
        help="remove models from the cache (shared blobs stay)",
        description="Remove models; blobs another model uses stay. With --mirror URL the running mirror "
        "does it (/api/delete); without it, on the cache directory no daemon may be using.",
    )
    rm.add_argument("models", nargs="+", metavar="MODEL")
    remote_options(rm)
    cache_options(rm)
    rm.set_defaults(func=cmd_rm)


def _add_pin(commands: Any) -> None:
    for command, unpin in (("pin", False), ("unpin", True)):
        sub = commands.add_parser(
            command,
            help="keep tags whatever retention and the size cap say"
            if not unpin
            else "let tags be evicted again",
            description="Pinned tags are never evicted (cache.retention_days, cache.max_size_gb) nor removed "
            "by DELETE /mirror/cache; 'rm' still removes them, and their pin with them. Safe while a daemon "
            "serves the cache: its next sweep reads the pins."
            if not unpin
            else "Unpin tags: the sweeps may evict them again.",
        )
        sub.add_argument("models", nargs="+", metavar="MODEL")
        cache_options(sub)
        sub.set_defaults(func=cmd_pin, unpin=unpin)


def _add_health(commands: Any) -> None:
    health = commands.add_parser(
        "health",
        help="check a running mirror (exit 0 if it can serve)",
        description="Ask a running mirror's /mirror/health: exit 0 for ok or degraded, 1 for failing or "
        "no answer (for container health checks and monitoring).",
    )
    health.add_argument(
        "--mirror", default="http://127.0.0.1:11434", metavar="URL", help="default: %(default)s"
    )
    health.add_argument("--api-key", metavar="KEY", help="default: $OLLAMA_MIRROR_API_KEY")
    health.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    health.set_defaults(func=cmd_health)


def cache_options(parser: argparse.ArgumentParser) -> Any:
    """The options naming the cache and its configuration; the group, for a command to add to it."""
    group = parser.add_argument_group("the cache (as the daemon is configured)")
    group.add_argument("-c", "--config", metavar="FILE", help="the daemon's JSON configuration file")
    group.add_argument("--cache-dir", metavar="DIR", help="the cache directory (cache.directory)")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any configuration key (repeatable)",
    )
    return group


def remote_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("through a running mirror")
    group.add_argument("--mirror", metavar="URL", help="e.g. http://mirror.example:11434")
    group.add_argument(
        "--api-key", metavar="KEY", help="bearer key for the mirror (default: $OLLAMA_MIRROR_API_KEY)"
    )


def quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and results")
