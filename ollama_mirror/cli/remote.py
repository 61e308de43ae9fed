"""Commands that talk to a running mirror over HTTP (``--mirror URL``), and ``health``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, Any

from .. import __version__
from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError

HTTP_TIMEOUT = 120.0  # a pull through a mirror sends a progress line at least every second


class MirrorUnreachable(CommandError):
    """The mirror does not answer, or refuses us: no use trying the next model."""


def api_key_of(options: argparse.Namespace) -> str | None:
    key: str | None = options.api_key or os.environ.get("OLLAMA_MIRROR_API_KEY") or None
    return key


def check_mirror(mirror: str) -> None:
    if not mirror.startswith(("http://", "https://")):
        raise CommandError(
            f"--mirror wants a URL such as http://mirror.example:11434, not {mirror!r}", EXIT_USAGE
        )


def request_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"ollama-mirror/{__version__}", "Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@contextlib.contextmanager
def mirror_request(
    mirror: str, method: str, path: str, body: dict[str, Any], api_key: str | None
) -> Iterator[IO[bytes]]:
    """One request to the mirror; its error (``{"error": ...}``) becomes a :class:`CommandError`."""
    prepared = urllib.request.Request(
        mirror.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers=request_headers(api_key),
        method=method,
    )
    try:
        response = urllib.request.urlopen(prepared, timeout=HTTP_TIMEOUT)
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
        raise MirrorUnreachable(f"cannot reach mirror {mirror}: {reason_of(e)}") from None
    with response:
        try:
            yield response
        except TimeoutError:
            raise MirrorUnreachable(f"mirror {mirror} stopped answering") from None


def reason_of(error: BaseException) -> str:
    cause = getattr(error, "reason", None)
    if isinstance(cause, BaseException):
        error = cause
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def cmd_health(options: argparse.Namespace) -> int:
    prepared = urllib.request.Request(
        options.mirror.rstrip("/") + "/mirror/health", headers=request_headers(api_key_of(options))
    )
    try:
        with urllib.request.urlopen(prepared, timeout=options.timeout) as response:
            document = json.load(response)
    except urllib.error.HTTPError as e:
        if e.code != 503:
            raise CommandError(f"{options.mirror} answered {e.code} to /mirror/health") from None
        document = json.load(e)
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot reach mirror {options.mirror}: {reason_of(e)}") from None
    status = document.get("status", "unknown")
    bad = [
        f"{name}: {check.get('detail', check.get('status'))}"
        for name, check in document.get("checks", {}).items()
        if check.get("status") not in ("ok", "pending")
    ]
    sys.stdout.write(f"{status}" + (f" ({'; '.join(bad)})" if bad else "") + "\n")
    return EXIT_OK if status in ("ok", "degraded") else EXIT_FAILED
