"""Commands on a cache directory: ``ls``, ``gc``, ``rm`` (``rm --mirror`` through a running mirror)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ..cache.eviction import Sweeper
from ..config import Config
from ..names import ModelName
from ..units import human_size
from .common import EXIT_OK, CommandError, cache_config, error_line, lock_cache, model_names, outcome
from .remote import api_key_of, check_mirror, mirror_request

T = TypeVar("T")


def cmd_ls(options: argparse.Namespace) -> int:
    from ..cache.catalog import Catalog
    from ..cache.index import read_model_usage
    from ..cache.pins import Pins
    from ..cache.store import Store

    config = cache_config(options)
    store = Store(config.cache.directory)
    if not os.path.isdir(store.manifests_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no manifests/)")
    usage = read_model_usage(os.path.join(store.work_dir, "index.sqlite3"))
    pinned = Pins(store.work_dir).names()
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
                "cached_at": iso_time(used.cached_at if used else model.modified),
                "last_used": iso_time(used.last_used if used else model.modified),
                "pull_count": used.pull_count if used else 0,
                "pinned": str(model.name) in pinned,
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
        name = str(e["name"]) + (" (pinned)" if e["pinned"] else "")
        name += "" if e["complete"] else f" (missing {e['missing_blobs']} blobs)"
        rows.append(
            (
                name,
                str(e["id"]),
                human_size(int(e["size"])),
                time_ago(str(e["last_used"])),
                str(e["pull_count"]),
            )
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


def iso_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def time_ago(iso: str) -> str:
    seconds = max(0.0, time.time() - datetime.fromisoformat(iso).timestamp())
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            n = int(seconds // length)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def sweeper_for(config: Config) -> Sweeper:
    """The daemon's sweeper on the cache, on the wall clock (the reactor's, which need not run: a sweep
    on an inline runner only reads the time)."""
    from twisted.internet import reactor

    from ..cache.catalog import Catalog
    from ..cache.index import CacheIndex
    from ..cache.pins import Pins
    from ..cache.store import Store
    from ..events import Events
    from ..names import PrivateNamespaces
    from ..runner import InlineRunner

    store = Store(config.cache.directory)
    if not os.path.isdir(store.blobs_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no blobs/)")
    clock: IReactorTime = reactor  # type: ignore[assignment]
    index = CacheIndex(os.path.join(store.work_dir, "index.sqlite3"), clock)
    private = PrivateNamespaces(config.private.namespaces)
    return Sweeper(
        store,
        Catalog(store),
        index,
        config.cache,
        InlineRunner(),
        clock,
        Events(),
        protected=set,
        private=private,
        pins=Pins(store.work_dir),
    )


def at_once(work: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that completes at once (the sweeper on an inline runner)."""
    box: list[Any] = []
    Deferred.fromCoroutine(work).addBoth(box.append)
    assert box, "expected to complete synchronously"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    result: T = box[0]
    return result


def cmd_gc(options: argparse.Namespace) -> int:
    config = cache_config(options)
    sweeper = sweeper_for(config)
    lock = lock_cache(config, exclusive=True)
    try:
        report = at_once(sweeper.sweep())
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
    names = model_names(options.models)
    missing: list[str] = []
    if options.mirror:
        check_mirror(options.mirror)
        for name in names:
            try:
                with mirror_request(
                    options.mirror, "DELETE", "/api/delete", {"model": str(name)}, api_key_of(options)
                ):
                    pass
            except CommandError as e:
                if "not found" not in str(e):
                    raise
                missing.append(name.display())
            else:
                sys.stdout.write(f"deleted {name.display()}\n")
    else:
        config = cache_config(options)
        sweeper = sweeper_for(config)
        lock = lock_cache(config, exclusive=True)
        try:
            for name in names:
                removed = at_once(sweeper.delete_model(name))
                if removed is None:
                    missing.append(name.display())
                else:
                    sys.stdout.write(f"deleted {name.display()} ({len(removed)} blobs no other model uses)\n")
        finally:
            sweeper.index.close()
            lock.release()
    if missing:
        error_line(f"not in the cache: {', '.join(missing)}")
    return outcome(len(names) - len(missing), len(missing))


def cmd_pin(options: argparse.Namespace) -> int:
    """Pin or unpin tags (``options.unpin``).  Safe beside a running daemon: the pins file has a lock of
    its own, and the daemon reads it at each sweep."""
    from ..cache.catalog import Catalog
    from ..cache.pins import Pins
    from ..cache.store import Store

    names = model_names(options.models)
    config = cache_config(options)
    store = Store(config.cache.directory)
    if not os.path.isdir(store.manifests_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no manifests/)")
    pins, catalog = Pins(store.work_dir), Catalog(store)
    for name in names:
        if options.unpin:
            changed = pins.unpin(name)
            sys.stdout.write(
                f"unpinned {name.display()}\n" if changed else f"{name.display()} was not pinned\n"
            )
            continue
        changed = pins.pin(name)
        note = "" if catalog.find(name) is not None else " (not cached yet: kept once pulled)"
        sys.stdout.write(f"{'pinned' if changed else 'already pinned:'} {name.display()}{note}\n")
    return EXIT_OK
