"""The mirror's whole HTTP tree on a fake clock, driven through StubTreq, with a fake upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ollama_mirror.config import load_config
from ollama_mirror.daemon.mirror import Mirror
from ollama_mirror.runner import InlineRunner

from .fakeregistry import FakeRegistry

BASE = "http://mirror.test"


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        registry: FakeRegistry,
        backend_agent: Any = None,
        upstream_agent: Any = None,
        **settings: str,
    ) -> None:
        """*upstream_agent* replaces the fake registry as the upstream (a network that misbehaves)."""
        self.clock = Clock()
        self.registry = registry
        self.upstream = RequestTraversalAgent(registry)
        overrides = {
            "cache.directory": str(tmp_path / "cache"),
            "upstream.url": "http://registry.example",
            "upstream.chunk_size": "65536",
            "upstream.retry_delay": "0",
            **settings,
        }
        self.config = load_config(None, {}, overrides)
        self.mirror = Mirror(
            self.config,
            self.clock,
            agent=upstream_agent or self.upstream,
            runner=InlineRunner(),
            backend_agent=backend_agent,
        )
        self.client = StubTreq(self.mirror.resource())

    def settle(self, d: Deferred[Any], step: float = 0) -> Any:
        """Pump the fake network and clock until *d* fires; *step* advances time each round."""
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(1000):
            if box:
                break
            self.upstream.flush()
            self.client.flush()
            self.clock.advance(step)
        assert box, "request never completed"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def request(self, method: str, path: str, step: float = 0, **kwargs: Any) -> tuple[Any, bytes]:
        async def go() -> tuple[Any, bytes]:
            response = await self.client.request(method, BASE + path, **kwargs)
            body = await response.content()
            return response, body

        return self.settle(ensureDeferred(go()), step)  # type: ignore[no-any-return]
