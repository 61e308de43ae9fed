"""The prefetch list (``cache.prefetch``): models the daemon caches at start and keeps fresh.

Each round pulls every listed model through the same :class:`ModelPuller` as ``/api/pull``: the
tag is revalidated upstream (``cache.manifest_ttl``) and whatever blobs changed are fetched by the
shared Fills.  A model that fails is logged and tried again the next round; a round never stops
the loop.  Rounds run every ``cache.prefetch_interval`` seconds (0: only at start).  A model the model rules
(``security.allowed_models``, ``blocked_models``) refuse is skipped and logged.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..fill.errors import PullFailed
from ..fill.pulling import ModelPuller
from ..names import InvalidName, ModelName

log = Logger(namespace="ollama_mirror.prefetch")  # pinned: log names are public

Check = Callable[[ModelName], str | None]  # why a model may not be fetched, or None


class PrefetchRound:
    """One pass over the list; what it did is kept for the log and for tests."""

    def __init__(self, puller: ModelPuller, models: tuple[str, ...], check: Check | None = None) -> None:
        self._puller = puller
        self._models = models
        self._check = check
        self.failed: dict[str, str] = {}
        self.fetched: dict[str, int] = {}

    async def run(self) -> None:
        for text in self._models:
            try:
                await self._one(text)
            except CancelledError:
                raise  # the daemon is stopping
            except Exception as e:  # one model's trouble must not end the round, nor the loop
                self.failed[text] = str(e) or type(e).__name__
                log.failure("prefetch of {model} failed unexpectedly", model=text)
        log.info(
            "prefetch round: {ok} of {total} models cached ({fetched} blobs fetched){failures}",
            ok=len(self._models) - len(self.failed),
            total=len(self._models),
            fetched=sum(self.fetched.values()),
            failures="; failed: " + ", ".join(f"{m} ({why})" for m, why in self.failed.items())
            if self.failed
            else "",
        )

    async def _one(self, text: str) -> None:
        try:
            name = ModelName.parse(text)
        except InvalidName:
            self.failed[text] = "invalid model name"
            return
        refused = self._check(name) if self._check is not None else None
        if refused:  # the mirror would not serve it: do not fetch it either
            self.failed[text] = refused
            log.warn("prefetch of {model} skipped: {reason}", model=text, reason=refused)
            return
        try:
            fetched = await self._puller.pull(name, lambda _: None)
        except PullFailed as e:
            self.failed[text] = str(e)
            log.warn("prefetch of {model} failed: {error}; retrying next round", model=text, error=str(e))
            return
        self.fetched[text] = len(fetched)
        if fetched:
            log.info("prefetch: {model}: fetched {n} new blobs", model=text, n=len(fetched))


class PrefetchService(MultiService):
    """Runs a :class:`PrefetchRound` at start and then on a ``TimerService`` (see the module docstring)."""

    def __init__(
        self,
        puller: ModelPuller,
        models: tuple[str, ...],
        interval: float,
        clock: IReactorTime,
        check: Check | None = None,
    ) -> None:
        super().__init__()
        self._puller = puller
        self.models = models
        self._check = check  # the model rules (security.allowed_models, blocked_models)
        self._clock = clock
        self._running: Deferred[None] | None = None
        self.last_round: PrefetchRound | None = None
        self.rounds = 0
        if interval > 0:
            timer = TimerService(interval, self._round)
            timer.clock = clock
            timer.setServiceParent(self)
        self._once = interval <= 0

    def startService(self) -> None:
        super().startService()
        if self._once:  # a round at start only; the result is logged, never raised
            self._clock.callLater(0, self._round)

    def _round(self) -> Deferred[None]:
        if self._running is not None:  # the previous round is still fetching: skip this tick
            return Deferred.fromCoroutine(_nothing())
        this = PrefetchRound(self._puller, self.models, self._check)
        self.rounds += 1

        def ended(result: object) -> None:
            self._running = None
            self.last_round = this

        d = Deferred.fromCoroutine(this.run())
        d.addErrback(lambda f: None if f.check(CancelledError) else log.failure("prefetch round failed", f))
        d.addBoth(ended)
        self._running = d
        return d

    def stopService(self) -> Deferred[None]:
        """Stop the timer and the report loops of a round in progress (the downloads are the Fill
        manager's: they stop with it, keeping what is on disk)."""
        d: Deferred[None] = super().stopService()  # type: ignore[assignment]
        if self._running is not None:
            self._running.cancel()
        return d


async def _nothing() -> None:
    return None
