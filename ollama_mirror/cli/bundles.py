"""``ollama-mirror export`` and ``import``: models carried between caches as one tar bundle."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import IO

from ..units import human_size
from .common import EXIT_OK, EXIT_USAGE, CommandError, cache_config, lock_cache, model_names, progress_for


def cmd_export(options: argparse.Namespace) -> int:
    from ..cache.bundle import BundleError, cached_model_names, export_bundle
    from ..cache.store import Store

    config = cache_config(options)
    store = Store(config.cache.directory)
    if not os.path.isdir(store.blobs_dir):
        raise CommandError(f"{store.root} is not a cache directory (it has no blobs/)")
    names = model_names(options.models)
    if options.all:
        names += cached_model_names(store)
    if not names:
        raise CommandError("name at least one model, or --all", EXIT_USAGE)
    progress = progress_for(options)
    try:
        with bundle_output(options.output) as out:
            report = export_bundle(store, names, out, progress)
    except BundleError as e:
        raise CommandError(str(e)) from None
    progress.message(
        f"exported {len(report.models)} models ({report.blobs} blobs, {human_size(report.bytes)}) "
        f"to {'standard output' if options.output == '-' else options.output}"
    )
    return EXIT_OK


@contextlib.contextmanager
def bundle_output(path: str) -> Iterator[IO[bytes]]:
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

    config = cache_config(options)
    store = Store(config.cache.directory)
    progress = progress_for(options)
    lock = lock_cache(config, exclusive=False)
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
