"""Prometheus metrics: the text parses, counters move with a cold then a warm pull, labels stay bounded."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock

from ollama_mirror.config import load_config
from ollama_mirror.daemon.service import build_service
from ollama_mirror.runner import InlineRunner
from ollama_mirror.web.routes import ROUTES, route_of

from .fakeregistry import FakeRegistry
from .harness import Harness

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(h: Harness, accept: str | None = None) -> tuple[Any, Samples]:
    """GET /metrics, parsed with prometheus_client's own parser into {(name, labels): value}."""
    headers = {"accept": [accept]} if accept else None
    response, body = h.request("GET", "/metrics", headers=headers)
    assert response.code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return response, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def pull(h: Harness, registry: FakeRegistry) -> None:
    response, _ = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 200
    for digest in registry.digests():
        response, body = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
        assert response.code == 200 and body == registry.blobs[digest]


def test_the_text_parses_and_counters_move_with_a_cold_then_a_warm_pull(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry)
    blob_bytes = sum(len(registry.blobs[d]) for d in registry.digests())
    manifest_bytes = len(registry.manifests[("library/tiny", "latest")])
    response, before = scrape(h)
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain")
    assert value(before, "ollama_mirror_cache_misses_total", kind="blob") == 0
    assert value(before, "ollama_mirror_upstream_received_bytes_total") == 0

    pull(h, registry)
    _, cold = scrape(h)
    assert value(cold, "ollama_mirror_cache_misses_total", kind="blob") == 3
    assert value(cold, "ollama_mirror_cache_misses_total", kind="manifest") == 1
    assert value(cold, "ollama_mirror_cache_hits_total", kind="blob") == 0
    assert value(cold, "ollama_mirror_upstream_received_bytes_total") == blob_bytes
    assert value(cold, "ollama_mirror_served_bytes_total", source="fill") == blob_bytes
    assert value(cold, "ollama_mirror_served_bytes_total", source="upstream") == manifest_bytes
    assert value(cold, "ollama_mirror_served_bytes_total", source="cache") == 0
    assert value(cold, "ollama_mirror_http_requests_total", route="registry_blob", status_class="2xx") == 3
    assert value(cold, "ollama_mirror_fill_duration_seconds_count", result="ok") == 3
    assert value(cold, "ollama_mirror_active_fills") == 0

    pull(h, registry)  # warm: everything from the cache, nothing more from upstream
    _, warm = scrape(h)
    assert value(warm, "ollama_mirror_cache_hits_total", kind="blob") == 3
    assert value(warm, "ollama_mirror_cache_hits_total", kind="manifest") == 1
    assert value(warm, "ollama_mirror_cache_misses_total", kind="blob") == 3
    assert value(warm, "ollama_mirror_upstream_received_bytes_total") == blob_bytes
    assert value(warm, "ollama_mirror_served_bytes_total", source="cache") == blob_bytes + manifest_bytes
    assert value(warm, "ollama_mirror_http_requests_total", route="registry_blob", status_class="2xx") == 6
    assert value(warm, "ollama_mirror_http_requests_total", route="metrics", status_class="2xx") == 2
    assert value(warm, "ollama_mirror_http_request_duration_seconds_count", route="registry_blob") == 6


def test_cache_gauges_follow_the_cache_survey(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    _, before = scrape(h)
    assert math.isnan(value(before, "ollama_mirror_cache_size_bytes"))  # not surveyed yet
    pull(h, registry)
    h.settle(ensureDeferred(h.mirror.observability.survey.refresh_logging_errors()))  # what the timer does
    _, after = scrape(h)
    assert value(after, "ollama_mirror_cache_size_bytes") == sum(
        len(registry.blobs[d]) for d in registry.digests()
    )
    assert value(after, "ollama_mirror_cached_models") == 1
    assert value(after, "ollama_mirror_disk_free_bytes") > 0


def test_upstream_errors_by_kind_and_a_failed_fill(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"upstream.retry_attempts": "2"})
    h.request("GET", "/v2/library/tiny/manifests/latest")
    registry.fail_with = 503
    response, _ = h.request("GET", f"/v2/library/tiny/blobs/{registry.digests()[1]}")
    assert response.code == 502
    _, samples = scrape(h)
    assert value(samples, "ollama_mirror_upstream_errors_total", kind="status") == 3  # first try + 2 retries
    assert value(samples, "ollama_mirror_fill_duration_seconds_count", result="failed") == 1
    assert value(samples, "ollama_mirror_http_requests_total", route="registry_blob", status_class="5xx") == 1


def test_a_digest_mismatch_is_counted(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    digest = registry.digests()[1]
    registry.blobs[digest] = b"X" * len(registry.blobs[digest])  # the upstream sends the wrong bytes
    h.request("GET", "/v2/library/tiny/manifests/latest")
    response, _ = h.request("GET", f"/v2/library/tiny/blobs/{digest}")
    assert response.code == 502  # on the fake network the whole download fails before any header
    _, samples = scrape(h)
    assert value(samples, "ollama_mirror_digest_mismatches_total") == 1
    assert value(samples, "ollama_mirror_fill_duration_seconds_count", result="failed") == 1


def test_labels_stay_bounded_whatever_the_paths(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    for n in range(20):
        h.request("GET", f"/v2/library/tiny/blobs/sha256:{n:064x}")
        h.request("GET", f"/random/{n}/path")
        h.request("GET", f"/api/nothing{n}")
        h.request("GET", f"/mirror/x{n}")
    _, samples = scrape(h)
    label_values = {v for (_name, labels) in samples for _k, v in labels}
    assert not any("sha256" in v or "/" in v for v in label_values)
    routes = {dict(labels)["route"] for (_name, labels) in samples if "route" in dict(labels)}
    assert routes <= set(ROUTES)
    counted = {
        dict(labels)["route"] for (name, labels) in samples if name == "ollama_mirror_http_requests_total"
    }
    assert counted == {"registry_blob", "other", "api_other", "mirror_other"}


def test_events_with_unknown_kinds_are_filed_under_other(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    h.mirror.events.upstream_error("something-new")
    h.mirror.events.evicted(2, 5, 1000, "size")
    h.mirror.events.evicted(1, 1, 10, "whatever")
    _, samples = scrape(h)
    assert value(samples, "ollama_mirror_upstream_errors_total", kind="other") == 1
    assert value(samples, "ollama_mirror_evicted_models_total", reason="size") == 2
    assert value(samples, "ollama_mirror_evicted_blobs_total", reason="size") == 5
    assert value(samples, "ollama_mirror_evicted_bytes_total", reason="size") == 1000
    assert value(samples, "ollama_mirror_evicted_bytes_total", reason="other") == 10


def test_openmetrics_when_the_scraper_asks_for_it(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    response, body = h.request(
        "GET", "/metrics", headers={"accept": ["application/openmetrics-text; version=1.0.0"]}
    )
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_two_mirrors_in_one_process_have_their_own_registries(tmp_path: Path, registry: FakeRegistry) -> None:
    first = Harness(tmp_path / "one", registry)
    second = Harness(tmp_path / "two", registry)  # would raise "Duplicated timeseries" on a shared registry
    pull(first, registry)
    _, samples = scrape(second)
    assert value(samples, "ollama_mirror_cache_misses_total", kind="blob") == 0
    default_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("ollama_mirror") for name in default_names)


def test_metrics_off_means_no_route(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_metrics": "false"})
    response, body = h.request("GET", "/metrics")
    assert response.code == 404 and json.loads(body) == {"error": "not found"}


def test_metrics_on_a_listener_of_their_own(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"server.metrics_listen": "tcp:9464:interface=127.0.0.1"})
    response, _ = h.request("GET", "/metrics")
    assert response.code == 404  # not on the main listener

    reactor = MemoryReactorClock()
    config = load_config(
        None,
        {},
        {
            "cache.directory": str(tmp_path / "svc"),
            "server.listen": "tcp:11434:interface=127.0.0.1",
            "server.metrics_listen": "tcp:9464:interface=127.0.0.1",
        },
    )
    service = build_service(config, reactor, runner=InlineRunner())
    service.privilegedStartService()
    service.startService()
    try:
        listeners = {port: factory for port, factory, _backlog, _interface in reactor.tcpServers}
        assert set(listeners) == {11434, 9464}
        metrics_client = StubTreq(listeners[9464].resource)
        response = h.settle(metrics_client.get("http://metrics.test/metrics"))
        body = h.settle(response.content())
        assert b"ollama_mirror_build_info" in body
    finally:
        service.stopService()


@pytest.mark.parametrize(
    ("path", "route"),
    [
        (b"/", "root"),
        (b"/v2/", "registry_version"),
        (b"/v2/library/tiny/manifests/latest", "registry_manifest"),
        (b"/v2/library/tiny/blobs/sha256:" + b"0" * 64, "registry_blob"),
        (b"/v2/library/tiny/tags/list", "registry_other"),
        (b"/api/pull", "api_pull"),
        (b"/api/tags", "api_tags"),
        (b"/api/chat", "api_inference"),
        (b"/api/blobs/sha256:abc", "api_inference"),
        (b"/api/pull/extra", "api_other"),
        (b"/v1/chat/completions", "openai"),
        (b"/mirror/stats", "mirror_stats"),
        (b"/mirror/health", "mirror_health"),
        (b"/mirror/cache", "mirror_other"),
        (b"/metrics", "metrics"),
        (b"/favicon.ico", "other"),
    ],
)
def test_routes_come_from_a_small_fixed_set(path: bytes, route: str) -> None:
    assert route_of(path) == route


def test_the_dashboard_and_the_scrape_config_name_real_metrics(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "etc" / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"ollama_mirror_[a-z_]+", target["expr"])
    }
    assert len(used) > 15
    h = Harness(tmp_path, registry)
    pull(h, registry)
    _, samples = scrape(h)
    exported = {name for name, _labels in samples}
    assert used <= exported, used - exported
    scrape_config = (root / "etc" / "prometheus.yml").read_text()
    assert "metrics_path: /metrics" in scrape_config and "localhost:11434" in scrape_config


def test_every_route_is_in_the_declared_set() -> None:
    paths = [b"/", b"/v2/", b"/v2/a/b/blobs/x", b"/v2/a/b/manifests/x", b"/v2/x", b"/api/pull", b"/api/tags"]
    paths += [
        b"/api/show",
        b"/api/delete",
        b"/api/version",
        b"/api/chat",
        b"/api/x",
        b"/v1/x",
        b"/mirror/stats",
    ]
    paths += [b"/mirror/health", b"/mirror/ui", b"/mirror/ui/state", b"/mirror/x", b"/metrics", b"/x"]
    assert {route_of(path) for path in paths} == set(ROUTES)
    assert route_of(b"/mirror/ui/models/delete") == "mirror_ui"  # (the page and all below it: one label)
