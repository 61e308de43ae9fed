"""Who downloads a blob for the whole cluster: one lease per blob, in a shared key-value store (Redis).

A node that is about to fetch a blob from the upstream first claims the blob's lease; if another node
holds it, this node reads the blob from that node instead (:mod:`.peers`), while its download runs.
The holder renews the lease every third of ``cluster.lease_seconds``; a holder that dies stops renewing,
its lease expires, and a node waiting on it claims it and goes on from what it already has.  The holder
keeps the lease until the blob is in the shared storage, so that no node fetches it again meanwhile.

The store behind is a :class:`KeyValue` (Redis in a cluster; a dict on a fake clock in the unit tests).
A store that fails makes :meth:`Leases.claim` raise: the caller then fetches on its own (two transfers
instead of one, never a failed pull).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="ollama_mirror.cluster")


class KeyValue(Protocol):
    """The few atomic operations leases need (each a single Redis command or script)."""

    def set_if_absent(self, key: str, value: str, ttl_ms: int) -> Awaitable[bool]:
        """SET key value NX PX ttl: whether it was set."""

    def get(self, key: str) -> Awaitable[str | None]: ...

    def renew_if(self, key: str, value: str, ttl_ms: int) -> Awaitable[bool]:
        """Extend the key's life if it still holds *value* (ours)."""

    def delete_if(self, key: str, value: str) -> Awaitable[bool]:
        """Delete the key if it still holds *value* (never someone else's lease)."""


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: this node holds the lease, or *holder* (another node's URL) does."""

    holder: str
    ours: bool


class Leases:
    def __init__(
        self, store: KeyValue, clock: IReactorTime, node: str, lease_seconds: float, namespace: str
    ) -> None:
        """*node* is this node's URL (what a lease holds, and where other nodes read from it);
        *namespace* keeps the keys of clusters sharing one Redis apart."""
        self._store = store
        self._clock = clock
        self.node = node
        self.lease_seconds = lease_seconds
        self._namespace = namespace
        self._renewals: dict[str, LoopingCall] = {}

    def key(self, hexdigest: str) -> str:
        return f"{self._namespace}:fill:{hexdigest}"

    @property
    def _ttl_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    def holds(self, hexdigest: str) -> bool:
        """This node holds the blob's lease (and renews it)."""
        return hexdigest in self._renewals

    async def claim(self, hexdigest: str) -> Claim:
        """Take the blob's lease, or learn who holds it (raises when the store fails)."""
        if self.holds(hexdigest):
            return Claim(self.node, True)
        key = self.key(hexdigest)
        for _ in range(3):  # (a lease may expire between the two commands: look again)
            if await self._store.set_if_absent(key, self.node, self._ttl_ms):
                self._renew_from_now(hexdigest)
                return Claim(self.node, True)
            holder = await self._store.get(key)
            if holder == self.node:  # ours from before a restart: keep it alive
                self._renew_from_now(hexdigest)
                return Claim(self.node, True)
            if holder is not None:
                return Claim(holder, False)
        raise LeaseError(f"the lease of sha256:{hexdigest} keeps changing hands")

    async def wait_for_takeover(
        self, hexdigest: str, holder: str, check: Callable[[], Awaitable[bool]]
    ) -> Claim:
        """The holder *holder* does not answer: look until its lease expires (then claim it), or another
        node holds it, or *check* says the holder answers again; at most twice the lease time."""
        deadline = self._clock.seconds() + 2 * self.lease_seconds
        while self._clock.seconds() < deadline:
            claim = await self.claim(hexdigest)
            if claim.ours or claim.holder != holder or await check():
                return claim
            await _sleep(self._clock, min(1.0, self.lease_seconds / 4))
        return await self.claim(hexdigest)

    def release(self, hexdigest: str) -> Deferred[None]:
        """Stop renewing the lease and give it up (if it is still ours)."""
        renewal = self._renewals.pop(hexdigest, None)
        if renewal is None:
            return Deferred.fromCoroutine(_nothing())
        if renewal.running:
            renewal.stop()
        return Deferred.fromCoroutine(self._give_up(hexdigest))

    async def _give_up(self, hexdigest: str) -> None:
        try:
            await self._store.delete_if(self.key(hexdigest), self.node)
        except Exception as e:  # it expires by itself
            log.warn(
                "could not release the lease of sha256:{hexdigest}: {error}", hexdigest=hexdigest, error=e
            )

    def release_all(self) -> Deferred[None]:
        """At shutdown: give up every lease, so that other nodes take over at once."""
        released = DeferredList([self.release(hexdigest) for hexdigest in list(self._renewals)])
        return released.addCallback(lambda _: None)

    # --- renewing ------------------------------------------------------------------------------

    def _renew_from_now(self, hexdigest: str) -> None:
        renewal = LoopingCall(self._renew, hexdigest)
        renewal.clock = self._clock
        self._renewals[hexdigest] = renewal
        renewal.start(self.lease_seconds / 3, now=False).addErrback(self._renewal_failed, hexdigest)

    def _renew(self, hexdigest: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._renew_once(hexdigest))

    async def _renew_once(self, hexdigest: str) -> None:
        try:
            kept = await self._store.renew_if(self.key(hexdigest), self.node, self._ttl_ms)
        except Exception as e:
            log.warn(
                "could not renew the lease of sha256:{hexdigest} ({error}); trying again",
                hexdigest=hexdigest,
                error=e,
            )
            return
        if not kept:  # expired and taken by another node (we were cut off too long): theirs now
            log.warn("lost the lease of sha256:{hexdigest} to another node", hexdigest=hexdigest)
            renewal = self._renewals.pop(hexdigest, None)
            if renewal is not None and renewal.running:
                renewal.stop()

    def _renewal_failed(self, failure: Failure, hexdigest: str) -> None:
        self._renewals.pop(hexdigest, None)
        log.failure("renewing the lease of sha256:{hexdigest} failed", failure, hexdigest=hexdigest)


class LeaseError(Exception):
    """The lease could not be had (the store answers, but the lease keeps changing hands)."""


async def _sleep(clock: IReactorTime, seconds: float) -> None:
    await deferLater(clock, seconds)


async def _nothing() -> None:
    return None
