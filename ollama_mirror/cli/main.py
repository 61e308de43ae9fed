"""The ``ollama-mirror`` command: the daemon, and what an operator does to its cache.

::

    ollama-mirror serve [daemon options]           the daemon in the foreground (= twistd -n ollama-mirror)
    ollama-mirror prefetch MODEL... | --from FILE  cache models, through a running mirror or on the cache
    ollama-mirror ls                               cached models, sizes, last use
    ollama-mirror export MODEL... -o BUNDLE        models into a tar bundle (air-gapped sites, backups)
    ollama-mirror import BUNDLE                    a bundle into the cache, verified before anything appears
    ollama-mirror gc                               one eviction sweep now
    ollama-mirror rm MODEL...                      remove models (blobs other models use stay)
    ollama-mirror health                           a running mirror's /mirror/health, as an exit status

Exit status: 0 done; 1 the operation failed (nothing or not everything done, see the message);
2 wrong usage or configuration; 3 some of several models failed, the others are done; 130
interrupted.  Errors are one line on standard error; progress goes to standard error too, results
to standard output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import replace as dc_replace
from datetime import UTC, datetime
from typing import IO, Any, NoReturn, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .. import __version__
from ..cache.lock import CacheBusy, CacheLock
from ..config import Config, ConfigError, load_config
from ..names import InvalidName, ModelName
from .progress import Progress, human_size

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130
HTTP_TIMEOUT = 120.0  # a pull through a mirror sends a progress line at least every second

T = TypeVar("T")


class CommandError(Exception):
    """Ends the command with one line on stderr and *code* as exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class MirrorUnreachable(CommandError):
    """The mirror does not answer, or refuses us: no use trying the next model."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


# --- entry point -----------------------------------------------------------------------------------


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
    previous = signal.signal(signal.SIGTERM, _terminate)  # so that `finally` cleans up on SIGTERM too
    try:
        code: int = options.func(options)
        return code
    except CommandError as e:
        _error(str(e))
        return e.code
    except ConfigError as e:
        _error(f"configuration error: {e}")
        return EXIT_USAGE
    except CacheBusy as e:
        _error(f"{e}; {_busy_hint(options.command, str(e))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (nothing more may be written to the pipe)
        return EXIT_FAILED
    except OSError as e:  # the cache directory or a file given cannot be used
        where = f" ({e.filename})" if e.filename else ""
        _error(f"{e.strerror or e}{where}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


def _busy_hint(command: str, reason: str) -> str:
    """What to do instead when the cache is locked: go through the daemon where the command can."""
    if "daemon" not in reason:
        return "try again when it is done"
    if command in ("prefetch", "rm"):
        return f"to {command} through the running daemon, add --mirror URL (e.g. --mirror http://127.0.0.1:11434)"
    if command == "gc":
        return "the running daemon sweeps by itself every cache.cleanup_interval seconds"
    return "stop the daemon, or try again when the import is done"


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _error(message: str) -> None:
    sys.stderr.write(f"ollama-mirror: error: {message}\n")
    sys.stderr.flush()


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


# --- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ollama-mirror",
        description="Pull-through caching mirror for the Ollama model registry.",
        epilog="Exit status: 0 done, 1 failed, 2 usage or configuration error, 3 partly done "
        "(some models failed), 130 interrupted. Run 'ollama-mirror COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ollama-mirror {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.add_parser(
        "serve",
        help="run the daemon in the foreground (options: 'ollama-mirror serve --help')",
        add_help=False,
    )

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
    _remote_options(prefetch)
    cache = _cache_options(prefetch)
    cache.add_argument("--upstream-url", metavar="URL", help="the registry to pull from (upstream.url)")
    _quiet_option(prefetch)
    prefetch.set_defaults(func=cmd_prefetch)

    ls = commands.add_parser(
        "ls",
        help="list cached models with sizes and last use",
        description="List the models in the cache directory, largest use first: size, when last used "
        "(from the cache index, else the manifest's time) and how often pulled.",
    )
    ls.add_argument("--json", action="store_true", help="one JSON document on standard output")
    ls.add_argument("--all", action="store_true", help="include models whose blobs are not all cached")
    _cache_options(ls)
    ls.set_defaults(func=cmd_ls)

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
    _cache_options(export)
    _quiet_option(export)
    export.set_defaults(func=cmd_export)

    imp = commands.add_parser(
        "import",
        help="add the models of a bundle to the cache",
        description="Read a bundle, verify every blob and manifest against its digest, and only then add "
        "the models to the cache. Safe while a daemon serves the cache: models appear complete or not at "
        "all. A damaged or truncated bundle adds nothing.",
    )
    imp.add_argument("bundle", metavar="BUNDLE", help="the bundle file ('-': standard input)")
    _cache_options(imp)
    _quiet_option(imp)
    imp.set_defaults(func=cmd_import)

    gc = commands.add_parser(
        "gc",
        help="run one eviction sweep now",
        description="One sweep of the cache with the configured limits (cache.retention_days, "
        "cache.max_size_gb), as the daemon runs every cache.cleanup_interval seconds.",
    )
    _cache_options(gc)
    gc.set_defaults(func=cmd_gc)

    rm = commands.add_parser(
        "rm",
        help="remove models from the cache (shared blobs stay)",
        description="Remove models; blobs another model uses stay. With --mirror URL the running mirror "
        "does it (/api/delete); without it, on the cache directory no daemon may be using.",
    )
    rm.add_argument("models", nargs="+", metavar="MODEL")
    _remote_options(rm)
    _cache_options(rm)
    rm.set_defaults(func=cmd_rm)

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
    return parser


def _cache_options(parser: argparse.ArgumentParser) -> Any:
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


def _remote_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("through a running mirror")
    group.add_argument("--mirror", metavar="URL", help="e.g. http://mirror.example:11434")
    group.add_argument(
        "--api-key", metavar="KEY", help="bearer key for the mirror (default: $OLLAMA_MIRROR_API_KEY)"
    )


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress, only errors and results")


def _config(options: argparse.Namespace) -> Config:
    overrides: dict[str, str] = {}
    for assignment in options.set:
        key, sep, value = assignment.partition("=")
        if not sep or "." not in key:
            raise CommandError(f"--set wants SECTION.KEY=VALUE, not {assignment!r}", EXIT_USAGE)
        overrides[key.strip()] = value
    if options.cache_dir:
        overrides["cache.directory"] = options.cache_dir
    if getattr(options, "upstream_url", None):
        overrides["upstream.url"] = options.upstream_url
    return load_config(options.config, os.environ, overrides)


def _names(texts: list[str]) -> list[ModelName]:
    names = []
    for text in texts:
        try:
            names.append(ModelName.parse(text))
        except InvalidName:
            raise CommandError(
                f"{text!r} is not a model name (e.g. llama3.2 or qwen2.5:7b)", EXIT_USAGE
            ) from None
    return names


def _progress(options: argparse.Namespace) -> Progress:
    return Progress(sys.stderr, quiet=getattr(options, "quiet", False))


def _outcome(done: int, failed: int) -> int:
    if not failed:
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_FAILED


# --- prefetch --------------------------------------------------------------------------------------


def cmd_prefetch(options: argparse.Namespace) -> int:
    texts = list(options.models)
    if options.from_file:
        texts += _read_list(options.from_file)
    if not texts:
        raise CommandError("name at least one model, or --from FILE", EXIT_USAGE)
    names = _names(texts)
    progress = _progress(options)
    if options.mirror:
        _check_mirror(options.mirror)
        if options.config or options.cache_dir or options.set or options.upstream_url:
            raise CommandError(
                "--mirror pulls through the mirror: leave out --config, --cache-dir, --upstream-url, --set", 2
            )
        results = _prefetch_remote(options.mirror, _api_key(options), names, progress)
    else:
        results = _prefetch_direct(_config(options), names, progress)
    failed = {name: error for name, error in results.items() if error is not None}
    done = len(results) - len(failed)
    summary = f"prefetch: {done} of {len(results)} models cached"
    if failed:
        summary += "; failed: " + "; ".join(f"{name.display()}: {error}" for name, error in failed.items())
    (progress.message if not failed else _error)(summary)
    return _outcome(done, len(failed))


def _read_list(path: str) -> list[str]:
    try:
        with contextlib.ExitStack() as stack:
            f: IO[str] = sys.stdin if path == "-" else stack.enter_context(open(path, encoding="utf-8"))
            lines = f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}", EXIT_USAGE) from None
    return [text for line in lines if (text := line.split("#", 1)[0].strip())]


_QUIET_STATUSES = ("success", "verifying sha256 digest", "writing manifest")  # the model's own line says it


class _PullView:
    """Turns the ``/api/pull`` progress lines into a bar per blob, and the lines without a blob (``pulling
    manifest``, a wait for the upstream) into notes."""

    def __init__(self, progress: Progress, name: ModelName) -> None:
        self._progress = progress
        self._name = name
        self._digest: str | None = None
        self._finished: set[str] = set()  # a blob's last line may come twice (done, then present)

    def line(self, line: dict[str, Any]) -> None:
        if "error" in line:
            self._progress.finish("failed")
            raise CommandError(str(line["error"]))
        digest = line.get("digest")
        if not isinstance(digest, str):
            status = line.get("status")
            if isinstance(status, str) and status not in (
                "success",
                "verifying sha256 digest",
                "writing manifest",
            ):
                self._progress.note(f"{self._name.display()}: {status}")
            return
        if digest in self._finished:
            return
        total = int(line.get("total") or 0)
        completed = int(line.get("completed") or 0)
        if digest != self._digest:
            self._progress.start(f"{self._name.display()} {digest.removeprefix('sha256:')[:12]}", total)
            self._digest = digest
        self._progress.update(completed)
        if completed >= total:
            self._progress.finish()
            self._digest = None
            self._finished.add(digest)


def _prefetch_remote(
    mirror: str, api_key: str | None, names: list[ModelName], progress: Progress
) -> dict[ModelName, str | None]:
    results: dict[ModelName, str | None] = {}
    for name in names:
        view = _PullView(progress, name)
        try:
            with _request(
                mirror, "POST", "/api/pull", {"model": str(name), "stream": True}, api_key
            ) as response:
                for raw in response:
                    if raw.strip():
                        view.line(json.loads(raw))
            results[name] = None
            progress.message(f"{name.display()}: cached on {mirror}")
        except MirrorUnreachable:
            progress.finish("failed")
            raise
        except CommandError as e:
            progress.finish("failed")
            results[name] = str(e)
        except ValueError:
            results[name] = "the mirror sent a line that is not JSON"
    return results


def _prefetch_direct(
    config: Config, names: list[ModelName], progress: Progress
) -> dict[ModelName, str | None]:
    """Pull straight into the cache with the daemon's own parts (Fills, verification, publishing),
    on a reactor of our own; the cache must not be in use by a daemon meanwhile."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from ..daemon.mirror import Mirror
    from ..fill.errors import PullFailed
    from ..ops.logoutput import log_observer

    lock = _lock(config, exclusive=True)
    results: dict[ModelName, str | None] = {}
    observer = log_observer(dc_replace(config.logging, level="WARNING"), sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    mirror = Mirror(config, reactor)
    outcome: list[object] = []

    async def pull_all() -> None:
        mirror.start()
        mirror.fills.startService()
        for name in names:
            refused = mirror.access.rules.check(name)  # what the mirror would not serve, it does not fetch
            if refused:
                results[name] = refused
                continue
            view = _PullView(progress, name)
            try:
                fetched = await mirror.api.puller.pull(name, view.line)
            except PullFailed as e:
                progress.finish("failed")
                results[name] = str(e)
                continue
            results[name] = None
            progress.message(f"{name.display()}: cached ({len(fetched)} blobs fetched)")

    async def shut_down() -> None:
        await mirror.fills.stopService()
        index = mirror.index
        await mirror.runner.run(index.flush, index.take_pending())
        await mirror.runner.run(index.close)
        await mirror.close()

    def go() -> None:
        d = Deferred.fromCoroutine(pull_all())
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: Deferred.fromCoroutine(shut_down())
    )
    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    try:
        reactor.run()  # type: ignore[attr-defined]
    finally:
        lock.release()
    if not outcome:
        raise KeyboardInterrupt  # stopped by a signal; what is on disk resumes next time
    if isinstance(outcome[0], Failure):
        raise CommandError(f"prefetch failed: {outcome[0].getErrorMessage()}")
    return results


# --- ls --------------------------------------------------------------------------------------------


def cmd_ls(options: argparse.Namespace) -> int:
    from ..cache.catalog import Catalog
    from ..cache.index import read_model_usage
    from ..cache.store import Store

    config = _config(options)
    store = Store(config.cache.directory)
    if not os.path.isdir(store.manifests_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no manifests/)")
    usage = read_model_usage(os.path.join(store.work_dir, "index.sqlite3"))
    entries: list[dict[str, Any]] = []
    for model in Catalog(store).models(complete_only=not options.all):
        used = usage.get(str(model.name))
        entries.append(
            {
                "name": model.name.display(),
                "id": model.digest[:12],
                "digest": model.digest,
                "size": model.size,
                "modified_at": model.modified_at,
                "cached_at": _iso(used.cached_at if used else model.modified),
                "last_used": _iso(used.last_used if used else model.modified),
                "pull_count": used.pull_count if used else 0,
                "complete": model.complete,
                "missing_blobs": len(model.missing),
            }
        )
    entries.sort(key=lambda e: str(e["last_used"]), reverse=True)
    if options.json:
        json.dump({"cache_directory": store.root, "models": entries}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    rows = [("NAME", "ID", "SIZE", "LAST USED", "PULLS")]
    for e in entries:
        name = str(e["name"]) + ("" if e["complete"] else f" (missing {e['missing_blobs']} blobs)")
        rows.append(
            (name, str(e["id"]), human_size(int(e["size"])), _ago(str(e["last_used"])), str(e["pull_count"]))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
        sys.stdout.write("\n")
    total = sum(int(e["size"]) for e in entries)
    plural = "" if len(entries) == 1 else "s"
    sys.stderr.write(
        f"{len(entries)} model{plural}, {human_size(total)} (blobs shared between models counted each time)\n"
    )
    return EXIT_OK


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def _ago(iso: str) -> str:
    seconds = max(0.0, time.time() - datetime.fromisoformat(iso).timestamp())
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            n = int(seconds // length)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


# --- export and import -----------------------------------------------------------------------------


def cmd_export(options: argparse.Namespace) -> int:
    from ..cache.bundle import BundleError, cached_model_names, export_bundle
    from ..cache.store import Store

    config = _config(options)
    store = Store(config.cache.directory)
    if not os.path.isdir(store.blobs_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no blobs/)")
    names = _names(options.models)
    if options.all:
        names += cached_model_names(store)
    if not names:
        raise CommandError("name at least one model, or --all", EXIT_USAGE)
    progress = _progress(options)
    try:
        with _output(options.output) as out:
            report = export_bundle(store, names, out, progress)
    except BundleError as e:
        raise CommandError(str(e)) from None
    progress.message(
        f"exported {len(report.models)} models ({report.blobs} blobs, {human_size(report.bytes)}) "
        f"to {'standard output' if options.output == '-' else options.output}"
    )
    return EXIT_OK


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[bytes]]:
    """Standard output, or *path* written as ``path.partial`` and renamed when complete, so that a
    file named like the bundle is always a whole bundle."""
    if path == "-":
        if sys.stdout.isatty():
            raise CommandError("refusing to write a bundle to a terminal; use -o FILE or a pipe", EXIT_USAGE)
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    partial = path + ".partial"
    try:
        f = open(partial, "wb")  # noqa: SIM115  (closed below, renamed only on success)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def cmd_import(options: argparse.Namespace) -> int:
    from ..cache.bundle import BundleError, import_bundle
    from ..cache.store import Store

    config = _config(options)
    store = Store(config.cache.directory)
    progress = _progress(options)
    lock = _lock(config, exclusive=False)
    try:
        with contextlib.ExitStack() as stack:
            if options.bundle == "-":
                src: IO[bytes] = sys.stdin.buffer
            else:
                try:
                    src = stack.enter_context(open(options.bundle, "rb"))
                except OSError as e:
                    raise CommandError(f"cannot read {options.bundle}: {e.strerror}") from None
            min_free = int(config.cache.min_free_gb * 10**9)
            report = import_bundle(store, src, progress, min_free)
    except BundleError as e:  # found before anything was published
        raise CommandError(f"{e}; nothing was imported") from None
    except OSError as e:
        raise CommandError(f"import failed: {e.strerror or e}; no model was added") from None
    finally:
        lock.release()
    replaced = f"; replaced {', '.join(report.replaced)}" if report.replaced else ""
    progress.message(
        f"imported {len(report.models)} models into {store.root}: {', '.join(report.models)} "
        f"({report.blobs_added} blobs added, {human_size(report.bytes_added)}; "
        f"{report.blobs_present} already cached{replaced})"
    )
    return EXIT_OK


# --- gc and rm -------------------------------------------------------------------------------------


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def _sweeper(config: Config) -> Any:
    from ..cache.catalog import Catalog
    from ..cache.eviction import Sweeper
    from ..cache.index import CacheIndex
    from ..cache.store import Store
    from ..events import Events
    from ..runner import InlineRunner

    store = Store(config.cache.directory)
    if not os.path.isdir(store.blobs_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no blobs/)")
    clock = _WallClock()
    index = CacheIndex(os.path.join(store.work_dir, "index.sqlite3"), clock)
    return Sweeper(store, Catalog(store), index, config.cache, InlineRunner(), clock, Events(), protected=set)


def _now(work: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that completes at once (the sweeper on an inline runner)."""
    box: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(box.append)
    assert box, "expected to complete synchronously"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    result: T = box[0]
    return result


def _lock(config: Config, exclusive: bool) -> CacheLock:
    from ..cache.store import Store

    store = Store(config.cache.directory)
    os.makedirs(store.work_dir, exist_ok=True)
    lock = CacheLock(store.work_dir)
    lock.acquire(exclusive)
    return lock


def cmd_gc(options: argparse.Namespace) -> int:
    config = _config(options)
    sweeper = _sweeper(config)
    lock = _lock(config, exclusive=True)
    try:
        report = _now(sweeper.sweep())
    finally:
        sweeper.index.close()
        lock.release()
    removed = ", ".join(sorted(ModelName.parse(n).display() for n in report.removed_models)) or "no models"
    sys.stdout.write(
        f"gc: removed {removed}; {report.removed_blobs} blobs ({human_size(report.freed_bytes)}), "
        f"{report.removed_partials} partial files; the cache holds {human_size(report.cache_bytes)} "
        f"in {report.models} models (cap {config.cache.max_size_gb:g} GB)\n"
    )
    return EXIT_OK


def cmd_rm(options: argparse.Namespace) -> int:
    names = _names(options.models)
    missing: list[str] = []
    if options.mirror:
        _check_mirror(options.mirror)
        for name in names:
            try:
                with _request(
                    options.mirror, "DELETE", "/api/delete", {"model": str(name)}, _api_key(options)
                ):
                    pass
            except CommandError as e:
                if "not found" not in str(e):
                    raise
                missing.append(name.display())
            else:
                sys.stdout.write(f"deleted {name.display()}\n")
    else:
        config = _config(options)
        sweeper = _sweeper(config)
        lock = _lock(config, exclusive=True)
        try:
            for name in names:
                removed = _now(sweeper.delete_model(name))
                if removed is None:
                    missing.append(name.display())
                else:
                    sys.stdout.write(f"deleted {name.display()} ({len(removed)} blobs no other model uses)\n")
        finally:
            sweeper.index.close()
            lock.release()
    if missing:
        _error(f"not in the cache: {', '.join(missing)}")
    return _outcome(len(names) - len(missing), len(missing))


# --- health ----------------------------------------------------------------------------------------


def cmd_health(options: argparse.Namespace) -> int:
    request = urllib.request.Request(
        options.mirror.rstrip("/") + "/mirror/health", headers=_headers(_api_key(options))
    )
    try:
        with urllib.request.urlopen(request, timeout=options.timeout) as response:
            document = json.load(response)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise CommandError(f"{options.mirror} answered {e.code} to /mirror/health") from None
        document = json.load(e)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot reach mirror {options.mirror}: {_reason(e)}") from None
    status = document.get("status", "unknown")
    bad = [
        f"{name}: {check.get('detail', check.get('status'))}"
        for name, check in document.get("checks", {}).items()
        if check.get("status") not in ("ok", "pending")
    ]
    sys.stdout.write(f"{status}" + (f" ({'; '.join(bad)})" if bad else "") + "\n")
    return EXIT_OK if status in ("ok", "degraded") else EXIT_FAILED


# --- HTTP to a running mirror ----------------------------------------------------------------------


def _api_key(options: argparse.Namespace) -> str | None:
    key: str | None = options.api_key or os.environ.get("OLLAMA_MIRROR_API_KEY") or None
    return key


def _check_mirror(mirror: str) -> None:
    if not mirror.startswith(("http://", "https://")):
        raise CommandError(
            f"--mirror wants a URL such as http://mirror.example:11434, not {mirror!r}", EXIT_USAGE
        )


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"ollama-mirror/{__version__}", "Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@contextlib.contextmanager
def _request(
    mirror: str, method: str, path: str, body: dict[str, Any], api_key: str | None
) -> Iterator[IO[bytes]]:
    """One request to the mirror; its error (``{"error": ...}``) becomes a :class:`CommandError`."""
    request = urllib.request.Request(
        mirror.rstrip("/") + path, data=json.dumps(body).encode(), headers=_headers(api_key), method=method
    )
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            message = e.reason
        if e.code == 401:
            raise MirrorUnreachable(
                f"{mirror} refused the request (401 {message}): give --api-key or set OLLAMA_MIRROR_API_KEY"
            ) from None
        raise CommandError(f"{message} ({e.code})") from None
    except (OSError, ValueError) as e:
        raise MirrorUnreachable(f"cannot reach mirror {mirror}: {_reason(e)}") from None
    with response:
        try:
            yield response
        except TimeoutError:
            raise MirrorUnreachable(f"mirror {mirror} stopped answering") from None


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        error = reason
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
