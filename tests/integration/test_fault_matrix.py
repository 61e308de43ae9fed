"""Every kind of upstream fault against every kind of upstream request, through the real daemon.

Faults (injected by the :class:`FaultProxy` between the mirror and a real registry): a body cut short, a
body that stalls, a flipped byte, the upstream refusing connections, a 503 once, a 503 every time, and a
slow trickle.  Requests: a manifest by tag, a whole blob (the mirror fetches it in chunks), and a part of
a blob (a client's ranged GET, as Ollama pulls in 16 parts: the chunk it needs is fetched first).

For each pair, what a user sees is asserted: a transient fault never reaches the client; a lasting one is
an error that names what the upstream did; a 200 is never a corrupt body; and afterwards (once the fault
is gone) the same request succeeds and the cache is a models directory Ollama can run.  A ranged answer
streams bytes before the whole blob is verified (so do registries; Ollama checks the sha256 of the whole
blob itself): a damaged one is discarded by the mirror, never cached, and asked again it is correct.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.integration.helpers import (
    UPSTREAM_SETTINGS,
    Fetched,
    MirrorStarter,
    blob_url,
    cached_blob,
    fetch,
    manifest_url,
    partial_files,
    sha256_hex,
    wait_cached,
    wait_until,
)
from tests.support.daemon import MirrorDaemon
from tests.support.faultproxy import FaultProxy
from tests.support.models import MANIFEST_V2, KiB, MiB, PushedModel

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")  # after every fault: Ollama can run the cache

SETTINGS = {**UPSTREAM_SETTINGS, "idle_timeout": 1, "timeout": 2, "retry_attempts": 2, "retry_delay": 0.05}
PART = (2 * MiB, 2 * MiB + 300 * KiB - 1)  # a client's part in the middle of the blob (chunks of 256 KiB)


@dataclass(frozen=True)
class Target:
    """One kind of request a user makes, and where the proxy's faults aim for it."""

    name: str
    path: Callable[[PushedModel], str]  # what the proxy matches in the upstream request's path
    method: str

    def request(self, mirror: MirrorDaemon, model: PushedModel) -> Fetched:
        if self.name == "manifest":
            return fetch(manifest_url(mirror, model), {"Accept": MANIFEST_V2})
        url = blob_url(mirror, model, model.model_layer)
        return fetch(url, {"Range": f"bytes={PART[0]}-{PART[1]}"} if self.name == "part" else None)

    def expected(self, model: PushedModel) -> bytes:
        if self.name == "manifest":
            return model.manifest
        data = model.model_layer.path.read_bytes()
        return data[PART[0] : PART[1] + 1] if self.name == "part" else data


TARGETS = [
    Target("manifest", lambda model: "/manifests/", "GET"),
    Target("blob", lambda model: model.model_layer.hex, "GET"),
    Target("part", lambda model: model.model_layer.hex, "GET"),
]


def correct(got: Fetched, target: Target, model: PushedModel) -> bool:
    return got.clean and got.status in (200, 206) and got.body == target.expected(model)


def assert_never_corrupt(got: Fetched, target: Target, model: PushedModel) -> None:
    """A clean success carries the right bytes; anything else is visibly not a success."""
    if got.clean and got.status in (200, 206):
        assert got.body == target.expected(model), f"{target.name}: a clean {got.status} with wrong bytes"


def assert_error_names_the_upstream(got: Fetched, words: str) -> None:
    assert got.status is not None and got.status >= 500, (got.status, got.error)
    message = json.loads(got.body)["errors"][0]["message"]
    assert words in message, message


def check_cache(mirror: MirrorDaemon, model: PushedModel) -> None:
    """Nothing but verified bytes in blobs/."""
    blob = cached_blob(mirror, model.model_layer)
    if blob.exists():
        assert sha256_hex(blob.read_bytes()) == model.model_layer.hex


@pytest.fixture
def model(medium_model: PushedModel) -> PushedModel:
    return medium_model


@pytest.fixture(params=TARGETS, ids=lambda t: t.name)
def target(request: pytest.FixtureRequest) -> Target:
    param: Target = request.param
    return param


@pytest.fixture
def mirror(
    start_mirror: MirrorStarter, proxy: FaultProxy, model: PushedModel, target: Target
) -> MirrorDaemon:
    """A fresh mirror; for blob requests, one that has seen the manifest (it knows the blob's size)."""
    daemon = start_mirror(upstream=SETTINGS)
    if target.name != "manifest":
        assert correct(fetch(manifest_url(daemon, model), {"Accept": MANIFEST_V2}), TARGETS[0], model)
    proxy.clear_records()
    return daemon


def test_a_cut_body_is_resumed(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.cut_after(100, times=1, path=target.path(model), method=target.method)
    assert correct(target.request(mirror, model), target, model)
    check_cache(mirror, model)


def test_a_stalled_body_is_given_up_and_asked_again(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.stall_after(100, 20.0, times=1, path=target.path(model), method=target.method)
    assert correct(target.request(mirror, model), target, model)
    check_cache(mirror, model)


def test_a_flipped_byte_is_never_served_as_a_clean_whole(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.corrupt(50, times=1, path=target.path(model), method=target.method)
    got = target.request(mirror, model)
    if target.name == "manifest":  # its Docker-Content-Digest tells: fetched again at once
        assert correct(got, target, model)
    elif target.name == "blob":  # held until verified: the client sees the failure
        assert_never_corrupt(got, target, model)
        assert not got.clean
    if target.name != "manifest":  # the download ends, with the damaged blob discarded
        wait_until(lambda: not partial_files(mirror, model.model_layer)[0].exists(), 15.0, "the discard")
    check_cache(mirror, model)
    assert correct(target.request(mirror, model), target, model)  # asked again: right
    if target.name != "manifest":
        wait_cached(mirror, model.model_layer)


def test_a_refusing_upstream_is_an_error_in_words_and_then_recovered_from(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.down("refuse")
    got = target.request(mirror, model)
    assert_error_names_the_upstream(got, proxy.url.removeprefix("http://"))
    check_cache(mirror, model)
    proxy.up()
    assert correct(target.request(mirror, model), target, model)


def test_one_503_never_reaches_the_client(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.fail(503, times=1, path=target.path(model), method=target.method)
    assert correct(target.request(mirror, model), target, model)
    assert proxy.requests_for(target.path(model)) >= 2  # it was met, and asked again


def test_a_503_every_time_is_a_502_saying_so_and_nothing_is_cached(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.fail(503, path=target.path(model), method=target.method)
    got = target.request(mirror, model)
    assert got.status == 502
    assert_error_names_the_upstream(got, "answered 503")
    assert not cached_blob(mirror, model.model_layer).exists()
    proxy.clear_faults()
    assert correct(target.request(mirror, model), target, model)


def test_a_slow_trickle_arrives_whole(
    mirror: MirrorDaemon, proxy: FaultProxy, model: PushedModel, target: Target
) -> None:
    proxy.throttle(1 * MiB, path=target.path(model))
    assert correct(target.request(mirror, model), target, model)
    if target.name == "blob":
        wait_cached(mirror, model.model_layer)
