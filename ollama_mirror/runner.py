"""Running blocking work (fsync, hashing, directory walks) off the reactor thread.

Components take a :class:`Runner` instead of calling ``deferToThread`` so that tests can run
the same code inline, deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

# The reactor, where a part uses several of its interfaces at once (IReactorTime with IReactorTCP,
# IReactorThreads or IReactorProcess): zope interfaces do not intersect for mypy, so such a parameter
# is typed with this name, and one that needs a single interface names that interface.
Reactor = Any


class Runner(Protocol):
    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]: ...


class ThreadRunner:
    """Runs calls in a thread pool of its own (started and stopped with the service)."""

    def __init__(self, reactor: Reactor, threads: int = 4) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="ollama-mirror-io")

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, f, *args)


class InlineRunner:
    """Runs calls at once on the calling thread (tests, and tools without a reactor)."""

    def run(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        try:
            return succeed(f(*args))
        except Exception as e:
            return fail(e)
