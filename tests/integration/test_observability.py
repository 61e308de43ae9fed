"""What an operator sees of the real daemon: /metrics, /mirror/stats, /mirror/health and the logs.

The daemon is the real ``twistd -n ollama-mirror``, the upstream the session's distribution registry (behind
a :class:`FaultProxy` where the test pulls), the client the Go-style puller of ``tests/support/puller.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import MirrorStarter, go_pull, wait_until
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.filesystems import read_only
from tests.support.models import PushedModel, Response, http_request
from tests.support.registry import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NO_PROXY: dict[str, Any] = {"features": {"enable_api_proxy": False}}  # no backend Ollama in these tests


def scrape(url: str) -> Samples:
    """``GET url`` (a ``/metrics``), parsed with prometheus_client's own parser."""
    response = http_request("GET", url)
    assert response.status == 200, response.body[:300]
    assert response.header("content-type").startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def get_json(mirror: MirrorDaemon, path: str) -> tuple[int, Any]:
    response: Response = http_request("GET", mirror.url + path)
    return response.status, response.json()


def health_when_probed(mirror: MirrorDaemon, *checks: str) -> tuple[int, Any]:
    """``/mirror/health`` once the background probes named have answered (they run at start-up)."""
    answer: list[tuple[int, Any]] = []

    def probed() -> bool:
        answer[:] = [get_json(mirror, "/mirror/health")]
        return all(answer[0][1]["checks"][check]["status"] != "pending" for check in checks)

    wait_until(probed, 15, f"the {', '.join(checks)} probe to answer")
    return answer[0]


# --- metrics and stats over a cold then a warm pull ----------------------------------------------------------


def test_metrics_and_stats_move_with_a_cold_then_a_warm_pull(
    start_mirror: MirrorStarter, medium_model: PushedModel, tmp_path: Path
) -> None:
    mirror = start_mirror()
    metrics_url = mirror.url + "/metrics"
    blob_bytes = sum(blob.size for blob in medium_model.blobs)
    before = scrape(metrics_url)
    assert value(before, "ollama_mirror_upstream_received_bytes_total") == 0
    assert [v for (name, _labels), v in before.items() if name == "ollama_mirror_build_info"] == [1]

    cold = go_pull(mirror, medium_model, tmp_path / "cold")
    wait_until(lambda: value(scrape(metrics_url), "ollama_mirror_active_fills") == 0, 15, "the fills to end")
    after_cold = scrape(metrics_url)
    assert value(after_cold, "ollama_mirror_upstream_received_bytes_total") == blob_bytes  # each byte once
    assert value(after_cold, "ollama_mirror_cache_misses_total", kind="manifest") == 1
    assert value(after_cold, "ollama_mirror_cache_misses_total", kind="blob") >= len(medium_model.blobs)
    assert value(after_cold, "ollama_mirror_fill_duration_seconds_count", result="ok") == len(
        medium_model.blobs
    )
    served_cold = sum(
        value(after_cold, "ollama_mirror_served_bytes_total", source=s) for s in ("cache", "fill")
    )
    assert served_cold >= cold.total_bytes  # plus what went out before the discovery GETs hung up
    blob_requests_cold = value(
        after_cold, "ollama_mirror_http_requests_total", route="registry_blob", status_class="2xx"
    )
    assert blob_requests_cold >= len(medium_model.blobs) + 16  # the discovery GETs and the parallel parts

    warm = go_pull(mirror, medium_model, tmp_path / "warm")
    after_warm = scrape(metrics_url)
    assert value(after_warm, "ollama_mirror_upstream_received_bytes_total") == blob_bytes  # nothing new
    misses = "ollama_mirror_cache_misses_total"
    assert value(after_warm, misses, kind="blob") == value(after_cold, misses, kind="blob")
    hits_gained = value(after_warm, "ollama_mirror_cache_hits_total", kind="blob") - value(
        after_cold, "ollama_mirror_cache_hits_total", kind="blob"
    )
    assert hits_gained >= len(medium_model.blobs) + 16  # and, above, not one new miss
    assert value(after_warm, "ollama_mirror_cache_hits_total", kind="manifest") >= 1
    served_from_cache = value(after_warm, "ollama_mirror_served_bytes_total", source="cache") - value(
        after_cold, "ollama_mirror_served_bytes_total", source="cache"
    )
    assert served_from_cache >= warm.total_bytes

    code, stats = get_json(mirror, "/mirror/stats")
    assert code == 200
    assert stats["cached_models"] == 1
    assert stats["models"][0]["name"] == medium_model.short_name and stats["models"][0]["size"] == blob_bytes
    assert stats["total_cache_size"] == blob_bytes
    assert stats["cache_directory"] == str(mirror.cache_dir) and stats["upstream_url"] == mirror.upstream_url
    assert stats["bytes_from_upstream"] == blob_bytes
    assert stats["bytes_saved"] >= warm.total_bytes
    assert 0 < stats["hit_ratio"] < 1 and stats["active_fills"] == []
    assert stats["uptime_seconds"] > 0
    after_stats = scrape(metrics_url)  # the stats walk refreshed the cache gauges
    assert value(after_stats, "ollama_mirror_cache_size_bytes") == blob_bytes
    assert value(after_stats, "ollama_mirror_cached_models") == 1

    log = mirror.log_text()
    model_layer = medium_model.model_layer.digest
    assert f"GET /v2/{medium_model.repo}/blobs/{model_layer} 206" in log
    access = [
        line for line in log.splitlines() if "[ollama_mirror.access#info]" in line and model_layer in line
    ]
    assert any(line.endswith("cache=fill") for line in access)
    assert any(line.endswith("cache=hit") for line in access)
    assert len(access) >= 2 * 17  # per pull: the discovery GET and at least 16 parts, one line each
    fill_lines = [line for line in log.splitlines() if "[ollama_mirror.fill#info]" in line]
    assert any(f"fill {model_layer[:19]} started:" in line for line in fill_lines)
    assert any(f"fill {model_layer[:19]} done:" in line and "/s)" in line for line in fill_lines)


def test_metrics_on_a_listener_of_their_own(mirror_factory: MirrorFactory) -> None:
    port = free_port()
    mirror = mirror_factory(
        config={**NO_PROXY, "server": {"metrics_listen": [f"tcp:{port}:interface=127.0.0.1"]}}
    )
    assert http_request("GET", mirror.url + "/metrics").status == 404
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(samples, "ollama_mirror_http_requests_total", route="root", status_class="2xx") >= 1


# --- health ---------------------------------------------------------------------------------------------------


def test_health_is_ok_then_failing_when_the_cache_becomes_read_only(mirror_factory: MirrorFactory) -> None:
    mirror = mirror_factory(config=NO_PROXY)
    code, health = health_when_probed(mirror, "upstream")
    assert (code, health["status"]) == (200, "ok"), health
    with read_only(mirror.cache_dir):
        code, health = get_json(mirror, "/mirror/health")
        assert code == 503 and health["status"] == "failing"
        assert health["checks"]["cache_writable"]["status"] == "failing"
        assert "Read-only file system" in health["checks"]["cache_writable"]["detail"] or os.geteuid() != 0
        assert http_request("HEAD", mirror.url + "/").status == 200  # liveness is another question
    code, health = get_json(mirror, "/mirror/health")
    assert (code, health["status"]) == (200, "ok"), health


def test_health_is_degraded_when_the_upstream_is_down(mirror_factory: MirrorFactory) -> None:
    mirror = mirror_factory(upstream_url=f"http://127.0.0.1:{free_port()}", config=NO_PROXY)
    code, health = health_when_probed(mirror, "upstream")
    assert code == 200 and health["status"] == "degraded", health
    assert health["checks"]["upstream"]["status"] == "degraded"
    assert "unreachable" in health["checks"]["upstream"]["detail"]
    assert health["checks"]["cache_writable"]["status"] == "ok"
    assert value(scrape(mirror.url + "/metrics"), "ollama_mirror_upstream_up") == 0
    assert (
        "upstream http://127.0.0.1:" in mirror.log_text()
        and "is not answering: unreachable" in mirror.log_text()
    )


def test_health_watches_the_backend_when_the_proxy_is_on(mirror_factory: MirrorFactory) -> None:
    """A cache-only mirror (no backend ever answered) is healthy and says so; once a client asks for
    inference, the missing backend degrades it."""
    mirror = mirror_factory(config={"backend": {"url": f"http://127.0.0.1:{free_port()}"}})
    code, health = health_when_probed(mirror, "upstream", "backend")
    assert code == 200 and health["status"] == "ok", health
    assert health["checks"]["backend"]["status"] == "absent"
    assert health["checks"]["upstream"]["status"] == "ok"
    asked = http_request(
        "POST", mirror.url + "/api/chat", body=b'{"model": "tiny", "messages": [{"role": "user"}]}'
    )
    assert asked.status == 502
    code, health = health_when_probed(mirror, "upstream", "backend")
    assert code == 200 and health["status"] == "degraded", health
    assert health["checks"]["backend"]["status"] == "degraded"


# --- logs -----------------------------------------------------------------------------------------------------


def test_the_log_file_rotates_at_its_size_keeping_backup_count_files(
    mirror_factory: MirrorFactory, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    logging = {"file": str(logs / "mirror.log"), "max_file_size": 2048, "backup_count": 2, "format": "json"}
    mirror = mirror_factory(config={**NO_PROXY, "logging": logging})
    for _ in range(80):
        assert http_request("GET", mirror.url + "/api/version").status == 200
    wait_until(lambda: (logs / "mirror.log.2").exists(), 10, "the log to rotate twice")
    mirror.stop()
    assert sorted(p.name for p in logs.iterdir()) == ["mirror.log", "mirror.log.1", "mirror.log.2"]
    for rotated in ("mirror.log.1", "mirror.log.2"):
        assert 2048 <= (logs / rotated).stat().st_size < 2048 + 1024
    records = [json.loads(line) for p in logs.iterdir() for line in p.read_text().splitlines()]
    access = [r for r in records if r["logger"] == "ollama_mirror.access"]
    assert any(r["uri"] == "/api/version" for r in access) and all(r["status"] == 200 for r in access)
    assert all({"time", "level", "message", "client", "duration", "sent"} <= r.keys() for r in access)
    assert (
        not mirror.log_path.exists() or mirror.log_path.stat().st_size == 0
    )  # logging.file wins over --logfile


def test_the_level_filters_the_daemon_log(mirror_factory: MirrorFactory) -> None:
    mirror = mirror_factory(config={**NO_PROXY, "logging": {"level": "WARNING"}})
    for _ in range(3):
        http_request("GET", mirror.url + "/api/version")
    http_request(
        "GET", mirror.url + "/v2/library/nothing/manifests/latest"
    )  # an upstream 404: info, no warning
    mirror.stop()
    log = mirror.log_text()
    assert "[ollama_mirror.access#info]" not in log and "#info]" not in log
