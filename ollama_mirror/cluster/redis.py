"""The cluster's Redis, through txredisapi (Twisted-native): leases, the roster of nodes, shared counters.

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
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime

from ..config import ConfigError

RENEW_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
DELETE_IF = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
HEARTBEAT = """
redis.call('set', KEYS[2], ARGV[2], 'px', ARGV[3])
redis.call('sadd', KEYS[1], ARGV[1])
return 1
"""
ROSTER = """
local alive = {}
for _, member in ipairs(redis.call('smembers', KEYS[1])) do
  local document = redis.call('get', ARGV[1] .. member)
  if document then table.insert(alive, document) else redis.call('srem', KEYS[1], member) end
end
return alive
"""
LEAVE = """
redis.call('del', KEYS[2])
return redis.call('srem', KEYS[1], ARGV[1])
"""
CHARGE = """
local total = redis.call('incrbyfloat', KEYS[1], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2])
return tostring(total)
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


def describe_redis(url: str) -> str:
    """``redis://host:port/db``: where Redis is, for health and log lines (never the password)."""
    args = parse_redis_url(url)
    scheme = "rediss" if args["ssl_context_factory"] else "redis"
    db = f"/{args['dbid']}" if args["dbid"] is not None else ""
    return f"{scheme}://{args['host']}:{args['port']}{db}"


class RedisKeyValue:
    """:class:`~ollama_mirror.cluster.leases.KeyValue` (and the roster's and counters' operations) on a
    Redis server.  Every command fails after :data:`TIMEOUT` seconds without an answer, also while the
    pool is reconnecting (txredisapi would queue it until Redis is back)."""

    def __init__(self, url: str, clock: IReactorTime, poolsize: int = 4) -> None:
        self._clock = clock
        self._where = describe_redis(url)
        self._pool = txredisapi.lazyConnectionPool(
            poolsize=poolsize,
            reconnect=True,
            connectTimeout=TIMEOUT,
            replyTimeout=TIMEOUT,
            convertNumbers=True,
            **parse_redis_url(url),
        )

    async def set_if_absent(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(await self._timed(self._pool.set(key, value, pexpire=ttl_ms, only_if_not_exists=True)))

    async def get(self, key: str) -> str | None:
        found = await self._timed(self._pool.get(key))
        return None if found is None else str(found)

    async def renew_if(self, key: str, value: str, ttl_ms: int) -> bool:
        return bool(await self._timed(self._pool.eval(RENEW_IF, [key], [value, ttl_ms])))

    async def delete_if(self, key: str, value: str) -> bool:
        return bool(await self._timed(self._pool.eval(DELETE_IF, [key], [value])))

    # --- the roster of nodes (:mod:`.members`) ---

    async def heartbeat(self, roster: str, member: str, key: str, document: str, ttl_ms: int) -> None:
        """Store *member*'s document under *key* for *ttl_ms*, and list it in the set *roster*."""
        await self._timed(self._pool.eval(HEARTBEAT, [roster, key], [member, document, ttl_ms]))

    async def roster(self, roster: str, key_prefix: str) -> list[str]:
        """The documents of the members still alive (those whose key expired leave the set)."""
        found = await self._timed(self._pool.eval(ROSTER, [roster], [key_prefix]))
        return [str(document) for document in found or []]

    async def leave(self, roster: str, member: str, key: str) -> None:
        await self._timed(self._pool.eval(LEAVE, [roster, key], [member]))

    # --- shared counters (:mod:`.ratelimit`) ---

    async def add(self, key: str, amount: float, ttl_ms: int) -> float:
        """Add *amount* to the counter *key* (which lives *ttl_ms* after its last change): the new total."""
        return float(await self._timed(self._pool.eval(CHARGE, [key], [repr(amount), ttl_ms])))

    # --- when each tag was last used, cluster-wide (:mod:`.sweep`) ---

    async def mark_used(self, key: str, name: str, when: float) -> None:
        await self._timed(self._pool.hset(key, name, repr(when)))

    async def used(self, key: str) -> dict[str, float]:
        found = await self._timed(self._pool.hgetall(key))
        return {str(name): float(when) for name, when in (found or {}).items()}

    async def forget_used(self, key: str, name: str) -> None:
        await self._timed(self._pool.hdel(key, name))

    async def ping(self) -> str:
        """PING (the health check): what Redis answered."""
        return f"answered {await self._timed(self._pool.ping())}"

    async def _timed(self, command: Deferred[Any]) -> Any:
        command.addTimeout(TIMEOUT, self._clock)
        try:
            return await command
        except (TimeoutError, CancelledError):
            raise ConnectionError(f"{self._where} did not answer within {TIMEOUT:g} s") from None

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
