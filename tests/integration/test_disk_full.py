"""The real daemon with its cache on a small tmpfs that fills up mid-download, then gets space back.

A ballast file fills the disk while a blob trickles in.  What must hold: the download stops cleanly and
keeps what it had; the operator gets one log line with the path and the free space, a metric and a health
check that say so; a new download is answered 507 with words a user can act on; nothing unverified is
ever published; and once the ballast goes, the same pull completes, fetching little more than the rest.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    UPSTREAM_SETTINGS,
    assert_valid_models_dir,
    blob_records_bytes,
    blob_url,
    cached_blob,
    fetch_blob,
    get_manifest,
    partial_files,
    sha256_file,
    wait_cached,
    wait_until,
)
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.filesystems import fill_up, small_disk
from tests.support.models import MiB, ModelFactory, http_request

pytestmark = pytest.mark.usefixtures("models_dir_stays_valid")  # after every fault: Ollama can run the cache

DISK_MIB = 96
BLOB_MIB = 40


def get_json(mirror: MirrorDaemon, path: str) -> tuple[int, Any]:
    response = http_request("GET", mirror.url + path)
    return response.status, json.loads(response.body)


def metric(mirror: MirrorDaemon, name: str) -> float:
    for line in http_request("GET", mirror.url + "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_a_disk_that_fills_up_mid_fill_is_survived_and_the_pull_completes_once_space_is_back(
    tmp_path: Path, mirror_factory: MirrorFactory, proxy: FaultProxy, model_factory: ModelFactory
) -> None:
    model = model_factory("library/diskfull", "latest", BLOB_MIB * MiB, 11)
    other = model_factory("library/diskfull-other", "latest", 4 * MiB, 12)
    blob = model.model_layer
    with small_disk(tmp_path / "disk", DISK_MIB) as disk:
        settings = {**UPSTREAM_SETTINGS, "chunk_size": "4MiB"}
        mirror = mirror_factory(
            upstream_url=proxy.url,
            cache_dir=disk / "cache",
            config={"upstream": settings, "cache": {"min_free_gb": 0}},
        )
        part, record = partial_files(mirror, blob)
        assert get_manifest(mirror, model).status == 200
        assert get_manifest(mirror, other).status == 200
        proxy.throttle(1 * MiB, path=blob.hex)  # 4 connections: ~4 MiB/s, ten seconds for the blob

        client = threading.Thread(target=fetch_blob, args=(mirror, model, blob))
        client.start()
        wait_until(lambda: record.exists() and part.exists(), 15.0, "the download under way", interval=0.02)
        wait_until(lambda: b'"filled": {"' in record.read_bytes(), 15.0, "progress recorded", interval=0.02)
        ballast = fill_up(disk)  # the disk is full: the next record of progress cannot be written
        wait_until(lambda: "cache disk full" in mirror.log_text(), 15.0, "the disk-full log line")
        client.join(timeout=30)

        assert part.exists() and record.exists()  # kept, for the same pull later
        assert not cached_blob(mirror, blob).exists()  # nothing unverified published
        assert_valid_models_dir(mirror.cache_dir)
        log = mirror.log_text()
        assert log.count("cache disk full") == 1 and str(record.parent) in log and " free)" in log
        code, health = get_json(mirror, "/mirror/health")
        assert code == 200 and health["checks"]["disk_space"]["status"] == "degraded"
        assert "disk is full" in health["checks"]["disk_space"]["detail"]
        assert metric(mirror, "ollama_mirror_disk_full_total") >= 1

        refused = http_request("GET", blob_url(mirror, other, other.model_layer))  # a new download
        assert refused.status == 507
        message = json.loads(refused.body)["errors"][0]["message"]
        assert "not enough disk space" in message and str(disk) not in message

        ballast.unlink()  # an operator frees space
        proxy.throttle(None)
        got = fetch_blob(mirror, model, blob)
        assert got.status == 200 and got.clean
        wait_cached(mirror, blob)
        assert sha256_file(cached_blob(mirror, blob)) == blob.hex
        ratio = blob_records_bytes(proxy, blob) / blob.size
        print(f"\nupstream bytes after the disk filled up and space came back: {ratio:.3f}x the blob")
        assert ratio <= 1.1, f"{ratio:.2f}x the blob fetched: what was on disk was fetched again"
        code, health = get_json(mirror, "/mirror/health")
        assert health["checks"]["disk_space"]["status"] == "ok"
        assert "cache disk: space is back" in mirror.log_text()
        mirror.stop()
