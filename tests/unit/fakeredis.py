"""A Redis of the few commands and scripts the cluster uses, in a dict, with expiry on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock


class FakeRedis:
    """SET NX PX, GET, the compare-and-act scripts of leases, the roster and the counters, with expiry
    on the clock; *down* fails every command."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.keys: dict[str, tuple[str, float]] = {}
        self.down = False
        self.sets: dict[str, set[str]] = {}
        self.hashes: dict[str, dict[str, float]] = {}

    def _live(self, key: str) -> str | None:
        self._check()
        found = self.keys.get(key)
        if found is None or found[1] <= self.clock.seconds():
            self.keys.pop(key, None)
            return None
        return found[0]

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("redis is down")

    async def set_if_absent(self, key: str, value: str, ttl_ms: int) -> bool:
        if self._live(key) is not None:
            return False
        self.keys[key] = (value, self.clock.seconds() + ttl_ms / 1000)
        return True

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def renew_if(self, key: str, value: str, ttl_ms: int) -> bool:
        if self._live(key) != value:
            return False
        self.keys[key] = (value, self.clock.seconds() + ttl_ms / 1000)
        return True

    async def delete_if(self, key: str, value: str) -> bool:
        if self._live(key) != value:
            return False
        del self.keys[key]
        return True

    def _set(self, key: str, value: str, ttl_ms: int) -> None:
        self.keys[key] = (value, self.clock.seconds() + ttl_ms / 1000)

    # --- the roster ---

    async def heartbeat(self, roster: str, member: str, key: str, document: str, ttl_ms: int) -> None:
        self._check()
        self._set(key, document, ttl_ms)
        self.sets.setdefault(roster, set()).add(member)

    async def roster(self, roster: str, key_prefix: str) -> list[str]:
        alive = []
        for member in sorted(self.sets.get(roster, set())):
            document = self._live(key_prefix + member)
            if document is None:
                self.sets[roster].discard(member)
            else:
                alive.append(document)
        return alive

    async def leave(self, roster: str, member: str, key: str) -> None:
        self._check()
        self.keys.pop(key, None)
        self.sets.get(roster, set()).discard(member)

    # --- counters ---

    async def add(self, key: str, amount: float, ttl_ms: int) -> float:
        total = float(self._live(key) or 0) + amount
        self._set(key, repr(total), ttl_ms)
        return total

    # --- notes of use (hashes) ---

    async def mark_used(self, key: str, name: str, when: float) -> None:
        self._check()
        self.hashes.setdefault(key, {})[name] = when

    async def used(self, key: str) -> dict[str, float]:
        self._check()
        return dict(self.hashes.get(key, {}))

    async def forget_used(self, key: str, name: str) -> None:
        self._check()
        self.hashes.get(key, {}).pop(name, None)
