"""``ollama-mirror prefetch``: models cached ahead of use, through a running mirror or straight into a
cache directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace as dc_replace
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..config import Config
from ..names import ModelName
from .common import (
    EXIT_USAGE,
    CommandError,
    cache_config,
    error_line,
    lock_cache,
    model_names,
    outcome,
    progress_for,
)
from .progress import Progress
from .remote import MirrorUnreachable, api_key_of, check_mirror, mirror_request


def cmd_prefetch(options: argparse.Namespace) -> int:
    texts = list(options.models)
    if options.from_file:
        texts += read_list(options.from_file)
    if not texts:
        raise CommandError("name at least one model, or --from FILE", EXIT_USAGE)
    names = model_names(texts)
    progress = progress_for(options)
    if options.mirror:
        check_mirror(options.mirror)
        if options.config or options.cache_dir or options.set or options.upstream_url:
            raise CommandError(
                "--mirror pulls through the mirror: leave out --config, --cache-dir, --upstream-url, --set", 2
            )
        results = prefetch_remote(options.mirror, api_key_of(options), names, progress)
    else:
        results = prefetch_direct(cache_config(options), names, progress)
    failed = {name: error for name, error in results.items() if error is not None}
    done = len(results) - len(failed)
    summary = f"prefetch: {done} of {len(results)} models cached"
    if failed:
        summary += "; failed: " + "; ".join(f"{name.display()}: {error}" for name, error in failed.items())
    (progress.message if not failed else error_line)(summary)
    return outcome(done, len(failed))


def read_list(path: str) -> list[str]:
    try:
        with contextlib.ExitStack() as stack:
            f: IO[str] = sys.stdin if path == "-" else stack.enter_context(open(path, encoding="utf-8"))
            lines = f.read().splitlines()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}", EXIT_USAGE) from None
    return [text for line in lines if (text := line.split("#", 1)[0].strip())]


QUIET_STATUSES = ("success", "verifying sha256 digest", "writing manifest")  # the model's own line says it


class PullView:
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
            if isinstance(status, str) and status not in QUIET_STATUSES:
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


def prefetch_remote(
    mirror: str, api_key: str | None, names: list[ModelName], progress: Progress
) -> dict[ModelName, str | None]:
    results: dict[ModelName, str | None] = {}
    for name in names:
        view = PullView(progress, name)
        try:
            with mirror_request(
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


def prefetch_direct(
    config: Config, names: list[ModelName], progress: Progress
) -> dict[ModelName, str | None]:
    """Pull straight into the cache with the daemon's own parts (:class:`CacheFiller`: Fills,
    verification, publishing), on a reactor of our own; the cache must not be in use by a daemon."""
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from ..daemon.filler import CacheFiller
    from ..fill.errors import PullFailed
    from ..ops.logoutput import log_observer

    lock = lock_cache(config, exclusive=True)
    results: dict[ModelName, str | None] = {}
    observer = log_observer(dc_replace(config.logging, level="WARNING"), sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    filler = CacheFiller(config, reactor)
    ended: list[object] = []

    async def pull_all() -> None:
        filler.start()
        for name in names:
            refused = filler.refused(name)  # what the mirror would not serve, it does not fetch
            if refused:
                results[name] = refused
                continue
            view = PullView(progress, name)
            try:
                fetched = await filler.pull(name, view.line)
            except PullFailed as e:
                progress.finish("failed")
                results[name] = str(e)
                continue
            results[name] = None
            progress.message(f"{name.display()}: cached ({len(fetched)} blobs fetched)")

    def go() -> None:
        d = Deferred.fromCoroutine(pull_all())
        d.addBoth(ended.append)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "before", "shutdown", lambda: Deferred.fromCoroutine(filler.close())
    )
    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    try:
        reactor.run()  # type: ignore[attr-defined]
    finally:
        lock.release()
    if not ended:
        raise KeyboardInterrupt  # stopped by a signal; what is on disk resumes next time
    if isinstance(ended[0], Failure):
        raise CommandError(f"prefetch failed: {ended[0].getErrorMessage()}")
    return results
