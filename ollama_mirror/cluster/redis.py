"""The cluster's Redis, through txredisapi (Twisted-native): the operations leases need.

txredisapi keeps a small pool of connections and reconnects by itself; each command has a reply
timeout, so a Redis that stops answering makes a command fail (the caller then goes on without the
cluster: see :mod:`.leases`) instead of hanging a download.  txredisapi uses the global reactor.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi

from ..config import ConfigError

RENEW_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
DELETE_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
TIMEOUT = 5.0  # seconds to connect, and to wait for each reply


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[user]:password@]host[:port][/db]`` (``rediss://``: TLS) → connection arguments."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(
            f"cluster.redis_url: expected redis://[:password@]host:port/db, not {parts.scheme}://..."
        )
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError("cluster.redis_url: the database after the port must be a number, e.g. /0")
    return {
        "host": parts.hostname,
        "port": parts.port or 6379,
        "dbid": int(db) if db else None,
        "password": unquote(parts.password) if parts.password else None,
        "username": unquote(parts.username) if parts.username else None,
        "ssl_context_factory": parts.scheme == "rediss",
    }


class RedisKeyValue:
    """:class:`~ollama_mirror.cluster.leases.KeyValue` on a Redis server."""

    def __init__(self, url: str, poolsize: int = 4) -> None:
        self._pool = txredisapi.lazyConnectionPool(
            poolsize=poolsize,
            reconnect=True,
            connectTimeout=TIMEOUT,
            replyTimeout=TIMEOUT,
            convertNumbers=True,
            **parse_redis_url(url),
        )

    async def set_if_absent(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(await self._pool.set(key, value, pexpire=ttl_ms, only_if_not_exists=True))

    async def get(self, key: str) -> str | None:
        found = await self._pool.get(key)
        return None if found is None else str(found)

    async def renew_if(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(await self._pool.eval(RENEW_IF, [key], [value, ttl_ms]))

    async def delete_if(self, key: str, value: str) -> bool:
        return bool(await self._pool.eval(DELETE_IF, [key], [value]))

    async def ping(self) -> None:
        await self._pool.ping()

    async def close(self) -> None:
        await self._pool.disconnect()


def check_redis(url: str, timeout: float = TIMEOUT) -> None:
    """At start, before the reactor runs (it blocks): Redis answers PING with these credentials, else a
    :class:`ConfigError` naming ``cluster.redis_url`` and the reason (no password in it)."""
    args = parse_redis_url(url)
    where = f"{args['host']}:{args['port']}"
    commands = []
    if args["password"] is not None:
        auth = [args["username"], args["password"]] if args["username"] else [args["password"]]
        commands.append(["AUTH", *auth])
    if args["dbid"] is not None:
        commands.append(["SELECT", str(args["dbid"])])
    commands.append(["PING"])
    try:
        with socket.create_connection((args["host"], args["port"]), timeout=timeout) as plain:
            tls = args["ssl_context_factory"]
            sock = (
                ssl.create_default_context().wrap_socket(plain, server_hostname=args["host"])
                if tls
                else plain
            )
            reader = sock.makefile("rb")
            for command in commands:
                sock.sendall(_resp(command))
                line = reader.readline().decode("utf-8", "replace").strip()
                if line.startswith("-"):
                    raise ConfigError(f"cluster.redis_url: {where} refused {command[0]}: {line[1:]}")
    except OSError as e:
        raise ConfigError(f"cluster.redis_url: cannot reach {where}: {e.strerror or e}") from None


def _resp(command: list[str]) -> bytes:
    parts = [f"*{len(command)}\r\n".encode()]
    for word in command:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
