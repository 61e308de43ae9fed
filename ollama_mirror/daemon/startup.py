"""What the daemon's start-up shares between the mirror and the ``server.workers`` supervisor: the error
that stops it and the line that says what it serves (a small module, so the supervisor stays small)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from .. import __version__
from ..config import Config, inactive_settings

if TYPE_CHECKING:
    from ..security.tls import ServerTLS

log = Logger(namespace="ollama_mirror.service")  # where these lines have always come from


class StartupError(Exception):
    """The daemon cannot start (for instance, its port is taken); the message says why."""


def log_start(config: Config, tls: ServerTLS | None = None) -> None:
    log.info(
        "ollama-mirror {version} serving {cache} from {upstream} on {endpoints}",
        version=__version__,
        cache=os.path.abspath(config.cache.directory),
        upstream=", ".join(
            u.url if u.host == config.upstream.host else f"{u.host}={u.url}" for u in config.upstreams()
        ),
        endpoints=", ".join(config.listen_endpoints()),
    )
    if tls is not None:
        log.info(
            "serving TLS as {subject} (valid until {not_after})", subject=tls.subject, not_after=tls.not_after
        )
    for key in inactive_settings(config):
        log.warn("{key} is set, but this version of ollama-mirror does not act on it yet", key=key)
