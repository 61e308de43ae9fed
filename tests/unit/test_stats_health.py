"""/mirror/stats and /mirror/health through StubTreq, on a fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from ollama_mirror.cache.store import Store
from ollama_mirror.config import load_config
from ollama_mirror.daemon.service import build_service
from ollama_mirror.ops import health as health_module
from ollama_mirror.ops.health import HealthCheck, ReachabilityProbe
from ollama_mirror.ops.stats import SharedRun
from ollama_mirror.runner import InlineRunner
from tests.support.filesystems import read_only

from .fakeregistry import FakeRegistry
from .harness import Harness


def pull(h: Harness, registry: FakeRegistry) -> None:
    h.request("GET", "/v2/library/tiny/manifests/latest")
    for digest in registry.digests():
        response, _ = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
        assert response.code == 200


def get_json(h: Harness, path: str) -> tuple[int, Any]:
    response, body = h.request("GET", path)
    assert response.headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    return response.code, json.loads(body)


@implementer(IAgent)
class DownAgent:
    """An HTTP client whose every connection is refused."""

    def __init__(self) -> None:
        self.requests = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        self.requests += 1
        return fail(ConnectionRefusedError("Connection refused"))


class Answers(Resource):
    """A backend that answers every request with *code*."""

    isLeaf = True

    def __init__(self, code: int = 200) -> None:
        super().__init__()
        self.code = code
        self.requests = 0

    def render(self, request: Request) -> bytes:
        self.requests += 1
        request.setResponseCode(self.code)
        return b'{"version":"0.6.0"}'


def probe_now(h: Harness) -> None:
    """Run the background probes once, as their TimerServices would."""
    observability = h.mirror.observability
    h.settle(observability.upstream_probe.check())
    if observability.backend_probe is not None:
        h.settle(observability.backend_probe.check())


# --- stats ---------------------------------------------------------------------------------------------------


def test_stats_has_the_seed_fields_and_what_the_mirror_saves(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    blob_bytes = sum(len(registry.blobs[d]) for d in registry.digests())
    code, empty = get_json(h, "/mirror/stats")
    assert code == 200
    assert empty["cached_models"] == 0 and empty["models"] == [] and empty["total_cache_size"] == 0
    assert empty["cache_directory"] == str(tmp_path / "cache")
    assert empty["upstream_url"] == "http://registry.example"
    assert empty["hit_ratio"] is None

    pull(h, registry)  # cold
    _, cold = get_json(h, "/mirror/stats")
    assert cold["cached_models"] == 1
    assert cold["total_cache_size"] == blob_bytes
    [model] = cold["models"]
    assert model["name"] == "tiny:latest" and model["size"] == blob_bytes and model["cached_at"]
    assert cold["hit_ratio"] == 0
    assert cold["bytes_served"]["fill"] == blob_bytes and cold["bytes_served"]["cache"] == 0
    assert cold["bytes_from_upstream"] == blob_bytes
    assert cold["bytes_saved"] == 0  # every byte had to come from upstream once

    pull(h, registry)  # warm
    _, warm = get_json(h, "/mirror/stats")
    assert warm["cache_hits"] == {"blob": 3, "manifest": 1}
    assert warm["cache_misses"] == {"blob": 3, "manifest": 1}
    assert warm["hit_ratio"] == 0.5
    assert warm["bytes_served"]["cache"] >= blob_bytes
    assert warm["bytes_from_upstream"] == blob_bytes
    assert warm["bytes_saved"] == warm["bytes_served"]["cache"]
    assert warm["active_fills"] == []


@dataclass
class FakeFill:
    digest: str
    repository: str
    size: int
    started_at: float | None
    received_bytes: int
    resumed_bytes: int = 0
    ended: bool = False

    def completed_bytes(self) -> int:
        return self.resumed_bytes + self.received_bytes


def test_stats_lists_running_fills_with_progress_and_rate(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    h.clock.advance(1000)
    running = FakeFill("sha256:" + "a" * 64, "library/big", 1000_000, 1000.0, 400_000, resumed_bytes=100_000)
    queued = FakeFill("sha256:" + "b" * 64, "library/big", 5000, None, 0)
    h.mirror.fills.fills.update({"a" * 64: running, "b" * 64: queued})  # type: ignore[dict-item]
    h.clock.advance(10)
    _, stats = get_json(h, "/mirror/stats")
    by_state = {fill["state"]: fill for fill in stats["active_fills"]}
    assert by_state["running"]["digest"] == running.digest
    assert by_state["running"]["completed"] == 500_000 and by_state["running"]["progress"] == 0.5
    assert by_state["running"]["rate_bytes_per_second"] == 40_000  # received over 10 s
    assert by_state["running"]["eta_seconds"] == 12
    assert by_state["running"]["elapsed_seconds"] == 10
    assert by_state["queued"]["started_at"] is None and by_state["queued"]["eta_seconds"] is None


def test_uptime_counts_on_the_mirror_clock(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    h.clock.advance(42)
    _, stats = get_json(h, "/mirror/stats")
    assert stats["uptime_seconds"] == 42


# --- health --------------------------------------------------------------------------------------------------


def test_health_is_ok_when_all_is_well(tmp_path: Path, registry: FakeRegistry) -> None:
    backend = Answers(200)
    h = Harness(tmp_path, registry, backend_agent=RequestTraversalAgent(backend))
    code, before = get_json(h, "/mirror/health")
    assert code == 200 and before["status"] == "ok"
    assert before["checks"]["upstream"]["status"] == "pending"  # not probed yet: no probe per request
    assert registry.seen == [] and backend.requests == 0
    probe_now(h)
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "ok"
    assert set(health["checks"]) == {"cache_writable", "disk_space", "upstream", "backend"}
    assert all(check["status"] == "ok" for check in health["checks"].values())
    assert len(registry.seen) == 1 and backend.requests == 1  # the two requests above probed nothing


def test_health_is_degraded_when_the_upstream_is_down(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_api_proxy": "false"})
    registry.fail_with = 503
    probe_now(h)
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "degraded"
    assert health["checks"]["upstream"]["status"] == "degraded"
    assert "503" in health["checks"]["upstream"]["detail"]
    assert "backend" not in health["checks"]  # the proxy is off: the backend does not matter

    refused = ReachabilityProbe("upstream", "http://registry.example/v2/", DownAgent(), h.clock)
    h.settle(refused.check())
    assert refused.state.status == "degraded" and "refused" in refused.state.detail


def test_the_upstream_probe_says_when_the_upstream_leads_back_to_this_mirror(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    """Transparent mode without ``upstream.address``: the upstream's name resolves to the mirror, so
    a probe would get the mirror's own answer and call the upstream up."""
    h = Harness(tmp_path, registry)
    h.settle(h.mirror.observability.upstream_probe.check())
    assert [s.via for s in registry.seen if s.path == "/v2/"] == [h.mirror.marker]  # the probe is marked
    h.upstream = RequestTraversalAgent(h.mirror.resource())  # the "upstream" is this mirror
    looped = ReachabilityProbe(
        "upstream", "http://registry.example/v2/", h.upstream, h.clock, via=h.mirror.marker
    )
    h.settle(looped.check())
    assert looped.state.status == "degraded"
    assert looped.state.detail.startswith("request loop: this address leads back to this mirror")


@pytest.mark.parametrize("connected", [False, True])
def test_a_probe_that_gets_no_answer_times_out(tmp_path: Path, connected: bool) -> None:
    """Silent before connecting (the request is cancelled) or after (an Agent whose request went out
    fails with ResponseNeverReceived): either way the health text says so in words."""

    @implementer(IAgent)
    class Silent:
        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            if not connected:
                return Deferred()
            return Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))

    clock = Clock()
    probe = ReachabilityProbe("upstream", "http://registry.example/v2/", Silent(), clock, timeout=10)
    done = probe.check()
    clock.advance(10)
    assert done.called
    assert probe.state.status == "degraded" and probe.state.detail == "no answer within 10 s"


def test_a_broken_answer_is_described_in_words(tmp_path: Path) -> None:
    @implementer(IAgent)
    class Broken:
        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            return fail(
                ResponseNeverReceived([Failure(ConnectionLost("Connection to the other side was lost"))])
            )

    probe = ReachabilityProbe("upstream", "http://registry.example/v2/", Broken(), Clock())
    probe.check()
    assert probe.state.detail.startswith("unreachable: Connection to the other side was lost")
    assert "Failure" not in probe.state.detail and "<" not in probe.state.detail


def test_a_missing_backend_degrades_health_only_once_the_proxy_is_in_use(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    """A cache-only mirror (no backend Ollama ever ran) is healthy, and says the backend is absent; once
    a client asks for inference, a backend that does not answer degrades the mirror."""
    h = Harness(tmp_path, registry, backend_agent=DownAgent())
    probe_now(h)
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "ok"
    backend = health["checks"]["backend"]
    assert backend["status"] == "absent" and backend["detail"].startswith("no backend Ollama: unreachable")
    h.request("POST", "/api/generate", data=b'{"model": "tiny", "keep_alive": 0}')  # an unload: not a use
    assert get_json(h, "/mirror/health")[1]["status"] == "ok"
    assert h.request("POST", "/api/generate", data=b'{"model": "tiny", "prompt": "hi"}')[0].code == 502
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "degraded"
    assert health["checks"]["backend"]["status"] == "degraded"
    assert health["checks"]["upstream"]["status"] == "ok"


def test_a_backend_that_answered_once_degrades_health_when_it_stops(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    backend = Answers(200)
    h = Harness(tmp_path, registry, backend_agent=RequestTraversalAgent(backend))
    probe_now(h)
    assert get_json(h, "/mirror/health")[1]["checks"]["backend"]["status"] == "ok"
    backend.code = 500
    probe_now(h)
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "degraded"
    assert health["checks"]["backend"]["detail"] == "answered 500"


def test_health_is_failing_when_the_cache_directory_becomes_read_only(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_api_proxy": "false"})
    probe_now(h)
    assert get_json(h, "/mirror/health")[1]["status"] == "ok"
    with read_only(tmp_path / "cache"):
        code, health = get_json(h, "/mirror/health")
        assert code == 503 and health["status"] == "failing"
        assert health["checks"]["cache_writable"]["status"] == "failing"
        assert "cannot write" in health["checks"]["cache_writable"]["detail"]
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "ok"


def test_health_is_degraded_below_min_free_space(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"cache.min_free_gb": "1e9", "features.enable_api_proxy": "false"})
    probe_now(h)
    code, health = get_json(h, "/mirror/health")
    assert code == 200 and health["status"] == "degraded"
    space = health["checks"]["disk_space"]
    assert space["status"] == "degraded" and space["free_bytes"] < space["min_free_bytes"]


def test_a_hung_disk_check_runs_once_and_answers_failing_in_bounded_time(tmp_path: Path) -> None:
    class HungRunner:
        calls = 0

        def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            HungRunner.calls += 1
            return Deferred()  # a disk that never answers

    clock = Clock()
    store = Store(str(tmp_path / "cache"))
    probe = ReachabilityProbe("upstream", "http://registry.example/v2/", DownAgent(), clock)
    health = HealthCheck(store, HungRunner(), clock, min_free_bytes=0, upstream=probe)
    first, second = ensureDeferred(health.report()), ensureDeferred(health.report())
    assert HungRunner.calls == 1  # the second probe shares the first one's check
    clock.advance(5)
    reports = [first.result, second.result]
    assert [r.http_status for r in reports] == [503, 503]
    assert "took longer than 5 s" in reports[0].checks["cache_writable"]["detail"]


def test_shared_run_errors_reach_every_waiter_and_a_cancel_only_its_own() -> None:
    result: Deferred[int] = Deferred()

    class Runner:
        calls = 0

        def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
            Runner.calls += 1
            return result

    shared: SharedRun[int] = SharedRun(Runner(), lambda: 1)
    a, b, c = shared(), shared(), shared()
    b.cancel()
    result.errback(Failure(OSError("disk on fire")))
    assert Runner.calls == 1
    for waiter in (a, c):
        failure: list[Failure] = []
        waiter.addErrback(failure.append)
        assert failure and failure[0].check(OSError)
    b.addErrback(lambda _: None)


def test_probes_run_in_the_background_and_survive_errors(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    agent = DownAgent()
    config = load_config(
        None, {}, {"cache.directory": str(tmp_path / "cache"), "features.enable_api_proxy": "false"}
    )
    service = build_service(config, reactor, agent=agent, runner=InlineRunner())
    service.privilegedStartService()
    service.startService()
    try:
        assert agent.requests == 1  # at start
        reactor.advance(30)
        assert agent.requests == 2  # and on its timer, failures or not
        reactor.advance(30)
        assert agent.requests == 3
        assert service.mirror.observability.upstream_probe.state.status == "degraded"
    finally:
        service.stopService()


def test_the_root_stays_a_cheap_liveness_answer(
    tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    inspected: list[Store] = []
    monkeypatch.setattr(health_module, "inspect_cache", inspected.append)
    h = Harness(tmp_path, registry)
    response, body = h.request("GET", "/")
    assert response.code == 200 and body == b"Ollama is running"
    assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    assert inspected == [] and registry.seen == []  # no disk check, no probe


def test_stopping_gives_up_a_probe_in_flight_and_leaves_no_timers(tmp_path: Path) -> None:
    @implementer(IAgent)
    class Silent:
        def __init__(self) -> None:
            self.pending: list[Deferred[Any]] = []

        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            self.pending.append(Deferred())
            return self.pending[-1]

    reactor = MemoryReactorClock()
    agent = Silent()
    config = load_config(
        None, {}, {"cache.directory": str(tmp_path / "cache"), "features.enable_api_proxy": "false"}
    )
    service = build_service(config, reactor, agent=agent, runner=InlineRunner())
    service.privilegedStartService()
    service.startService()
    assert len(agent.pending) == 1 and not agent.pending[0].called
    stopped = service.stopService()
    reactor.advance(1)
    assert stopped.called and agent.pending[0].called  # cancelled, not waited for
    assert reactor.getDelayedCalls() == []
    assert service.mirror.observability.upstream_probe.state.status == "pending"  # a cancel is no verdict
