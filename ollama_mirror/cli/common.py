"""What every command shares: exit statuses, one-line errors, the configuration, model names, the
cache's lock."""

from __future__ import annotations

import argparse
import os
import sys

from ..cache.lock import CacheLock
from ..config import Config, load_config
from ..names import InvalidName, ModelName
from .progress import Progress

EXIT_OK = 0


EXIT_FAILED = 1


EXIT_USAGE = 2


EXIT_PARTIAL = 3


EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """Ends the command with one line on stderr and *code* as exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def error_line(message: str) -> None:
    sys.stderr.write(f"ollama-mirror: error: {message}\n")
    sys.stderr.flush()


def cache_config(options: argparse.Namespace) -> Config:
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


def model_names(texts: list[str]) -> list[ModelName]:
    names = []
    for text in texts:
        try:
            names.append(ModelName.parse(text))
        except InvalidName:
            raise CommandError(
                f"{text!r} is not a model name (e.g. llama3.2 or qwen2.5:7b)", EXIT_USAGE
            ) from None
    return names


def progress_for(options: argparse.Namespace) -> Progress:
    return Progress(sys.stderr, quiet=getattr(options, "quiet", False))


def outcome(done: int, failed: int) -> int:
    if not failed:
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_FAILED


def lock_cache(config: Config, exclusive: bool) -> CacheLock:
    from ..cache.store import Store

    store = Store(config.cache.directory)
    os.makedirs(store.work_dir, exist_ok=True)
    lock = CacheLock(store.work_dir)
    lock.acquire(exclusive)
    return lock
