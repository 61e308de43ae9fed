"""One retry policy for every upstream request: on its own, and through the HTTP tree on a fake clock."""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from ollama_mirror.upstream.errors import UpstreamError
from ollama_mirror.upstream.retry import RETRY_AFTER_CAP, RetryPolicy, parse_retry_after

from .fakeregistry import FakeRegistry
from .harness import Harness


def failure_of(d: Deferred[str]) -> BaseException:
    """The exception a fired Deferred failed with (and the failure handled)."""
    failures: list[BaseException] = []
    d.addErrback(lambda f: failures.append(f.value))
    assert failures, "the Deferred had not failed"
    return failures[0]


ACCEPT = {"Accept": ["application/vnd.docker.distribution.manifest.v2+json"]}


def test_the_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    low, high = (
        RetryPolicy(Clock(), 5, 1.0, jitter=lambda: 0.0),
        RetryPolicy(Clock(), 5, 1.0, jitter=lambda: 0.999),
    )
    assert [low.wait_before(n) for n in (1, 2, 3)] == [0.5, 1.0, 2.0]  # half of 1, 2, 4 at the least
    assert [round(high.wait_before(n), 2) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]  # all of it at the most
    assert high.wait_before(20) <= 30.0  # it stops growing
    assert low.wait_before(1, retry_after=7) == 7  # Retry-After asked for more: it wins
    assert low.wait_before(1, retry_after=3600) == RETRY_AFTER_CAP  # within reason


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert parse_retry_after(b"12") == 12
    assert parse_retry_after(formatdate(1_000_030, usegmt=True).encode(), now=1_000_000) == pytest.approx(30)
    assert parse_retry_after(b"soon") is None and parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("status", "retried"),
    [
        (429, True),
        (502, True),
        (503, True),
        (504, True),
        (408, True),
        (500, True),
        (501, False),
        (404, False),
        (403, False),
        (400, False),
    ],
)
def test_which_answers_are_worth_another_try(status: int, retried: bool) -> None:
    assert UpstreamError("x", status).transient is retried
    assert UpstreamError("no answer").transient and not UpstreamError("loop", 508, kind="loop").transient


def test_the_policy_tries_again_only_what_can_heal() -> None:
    clock = Clock()
    policy = RetryPolicy(clock, 3, 1.0, jitter=lambda: 0.0)
    calls: list[str] = []

    async def failing(error: UpstreamError) -> str:
        calls.append(error.message)
        raise error

    too_large = UpstreamError("more than 4 MiB", kind="protocol", lasting=True)
    lasting = ensureDeferred(policy.run("manifest", lambda: failing(too_large)))
    assert len(calls) == 1 and lasting.called  # no answer, but a retry would only fetch it again
    assert str(failure_of(lasting)) == "more than 4 MiB"

    calls.clear()
    cut = ensureDeferred(policy.run("manifest", lambda: failing(UpstreamError("cut"))))
    clock.pump([1.0] * 10)
    assert len(calls) == 4  # the first try and the three retries
    assert str(failure_of(cut)) == "cut (after 4 attempts)"


@pytest.mark.parametrize(
    ("what", "path", "sent"),
    [
        ("manifest GET", "/manifests/", ("GET", "/v2/library/tiny/manifests/latest")),
        ("blob HEAD for its size", "/blobs/", ("HEAD", "/v2/library/tiny/blobs/{digest}")),
        ("blob GET", "/blobs/", ("GET", "/v2/library/tiny/blobs/{digest}")),
        ("token", "auth.example", ("GET", "/v2/library/tiny/manifests/latest")),
    ],
)
def test_one_transient_answer_never_reaches_the_client(
    tmp_path: Path, registry: FakeRegistry, what: str, path: str, sent: tuple[str, str]
) -> None:
    settings = {"upstream.retry_delay": "1"}
    if path == "auth.example":  # a registry whose token service wants the mirror's credentials
        registry.auth = "bearer"
        settings |= {"upstream.username": "user", "upstream.password": "secret"}
    registry.faults.append([503, None, 1, path])
    h = Harness(tmp_path, registry, **settings)
    method, target = sent
    digest = registry.digests()[1]
    response, _ = h.request(method, target.format(digest=digest), step=0.25, headers=ACCEPT)
    assert response.code == 200, what
    assert registry.faults[0][2] == 0  # the fault was met, and got past


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    ("status", "retry_after"), [(502, None), (503, None), (504, None), (429, 1), (408, None)]
)
def test_each_passing_answer_on_a_cold_manifest_is_retried(
    tmp_path: Path, registry: FakeRegistry, method: str, status: int, retry_after: int | None
) -> None:
    registry.faults.append([status, retry_after, 1, "/manifests/"])
    h = Harness(tmp_path, registry, **{"upstream.retry_delay": "0.1"})
    response, _ = h.request(method, "/v2/library/tiny/manifests/latest", step=0.25, headers=ACCEPT)
    assert response.code == 200
    assert registry.faults[0][2] == 0


def test_429_waits_what_retry_after_asks(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.faults.append([429, 5, 1, "/manifests/"])
    h = Harness(tmp_path, registry, **{"upstream.retry_delay": "0.1"})
    started = h.clock.seconds()
    response, _ = h.request("GET", "/v2/library/tiny/manifests/latest", step=0.5, headers=ACCEPT)
    assert response.code == 200 and h.clock.seconds() - started >= 5


def test_a_spent_budget_says_what_the_upstream_answered(tmp_path: Path, registry: FakeRegistry) -> None:
    registry.faults.append([503, None, 99, "/manifests/"])
    h = Harness(tmp_path, registry, **{"upstream.retry_attempts": "2", "upstream.retry_delay": "0"})
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest", step=0.1, headers=ACCEPT)
    assert response.code == 502
    message = json.loads(body)["errors"][0]["message"]
    assert "answered 503" in message and "(after 3 attempts)" in message
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 3


def test_a_404_is_final_at_once(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"upstream.retry_delay": "1"})
    response, _ = h.request("GET", "/v2/library/nothing/manifests/latest", headers=ACCEPT)
    assert response.code == 404
    assert len([s for s in registry.seen if "nothing" in s.path]) == 1


def test_the_wall_clock_date_form_is_read_against_now() -> None:
    assert parse_retry_after(formatdate(time.time() + 60, usegmt=True).encode()) == pytest.approx(60, abs=2)


def test_a_manifest_body_that_stalls_is_given_up_and_asked_again(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.stall_manifests = 1
    h = Harness(tmp_path, registry, **{"upstream.timeout": "2", "upstream.retry_delay": "0.1"})
    started = h.clock.seconds()
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest", step=0.5, headers=ACCEPT)
    assert response.code == 200 and body == registry.manifests[("library/tiny", "latest")]
    assert 2 <= h.clock.seconds() - started < 10  # not held for as long as the upstream stalls
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 2


def test_a_manifest_damaged_on_its_way_is_asked_again_never_served(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    registry.damage_manifests = 1
    h = Harness(tmp_path, registry, **{"upstream.retry_delay": "0.1"})
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest", step=0.5, headers=ACCEPT)
    assert response.code == 200 and body == registry.manifests[("library/tiny", "latest")]
    assert len([s for s in registry.seen if "/manifests/" in s.path]) == 2

    registry.add_model("library/other", "latest", [b"other weights"])
    registry.damage_manifests = 99  # damaged every time: an error that says so
    response, body = h.request("GET", "/v2/library/other/manifests/latest", step=0.5, headers=ACCEPT)
    assert response.code == 502
    assert "does not match its Docker-Content-Digest" in json.loads(body)["errors"][0]["message"]
