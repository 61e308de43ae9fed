"""A full disk, through the HTTP tree on a fake clock: what clients are told, what the operator sees,
and that the same pull completes once space is back."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from .fakeregistry import FakeRegistry
from .harness import Harness
from .test_metrics import scrape, value

CHUNK = 65536  # the harness's upstream.chunk_size


class FillingDisk:
    """``os.pwrite`` that finds the disk full once *room* bytes of blob data were written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.room = room
        self.real = os.pwrite
        self.full = True
        monkeypatch.setattr(os, "pwrite", self)

    def __call__(self, fd: int, data: bytes, offset: int) -> int:
        if self.full and offset + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(fd, data, offset)


def disk_full_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if str(e.get("log_format", "")).startswith("cache disk full")]


def test_a_blob_meeting_a_full_disk_is_a_507_and_completes_once_space_is_back(
    tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    settings = {"upstream.connections_per_blob": "1"}  # (chunks in order: the first fits, then no more)
    h = Harness(
        tmp_path, registry, **settings, **{"features.enable_api_proxy": "false", "cache.min_free_gb": "0"}
    )
    weights = registry.digests()[1]
    disk = FillingDisk(monkeypatch, room=CHUNK)  # the first chunk fits, the rest does not
    for _ in range(2):
        response, body = h.request("GET", f"/v2/library/tiny/blobs/{weights}", step=0.1)
        assert response.code == 507
        error = json.loads(body)["errors"][0]
        assert error["message"].startswith("the mirror's disk is full: no space left to store blob")
        assert str(tmp_path) not in error["message"]

    assert len(disk_full_lines(events)) == 1  # once, however many requests meet it
    line = disk_full_lines(events)[0]
    assert line["path"].endswith(".part") and line["free"]  # where, and how much is free there
    response, body = h.request("GET", "/mirror/health")
    code, health = response.code, json.loads(body)
    space = health["checks"]["disk_space"]
    assert code == 200 and health["status"] == "degraded"  # what is cached is still served
    assert space["status"] == "degraded" and "disk is full" in space["detail"]
    assert value(scrape(h)[1], "ollama_mirror_disk_full_total") == 2

    disk.full = False  # an operator freed space
    registry.seen.clear()
    response, body = h.request("GET", f"/v2/library/tiny/blobs/{weights}", step=0.1)
    assert response.code == 200 and hashlib.sha256(body).hexdigest() == weights.removeprefix("sha256:")
    blob_requests = [s for s in registry.seen if weights in s.path and s.method == "GET"]
    assert blob_requests and all(s.range and not s.range.startswith("bytes=0-") for s in blob_requests)
    # (what was stored before the disk filled up was not fetched again)
    health = json.loads(h.request("GET", "/mirror/health")[1])
    assert health["checks"]["disk_space"]["status"] == "ok"


def test_a_pull_meeting_a_full_disk_says_so(
    tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_api_proxy": "false", "cache.min_free_gb": "0"})
    disk = FillingDisk(monkeypatch, room=0)
    response, body = h.request("POST", "/api/pull", step=0.1, data=b'{"model": "tiny"}')
    assert response.code == 200  # the stream had begun: its last line says what happened
    last = json.loads(body.splitlines()[-1])
    assert last["error"].startswith("the mirror's disk is full")

    response, body = h.request("POST", "/api/pull", step=0.1, data=b'{"model": "tiny", "stream": false}')
    assert response.code == 507 and json.loads(body)["error"].startswith("the mirror's disk is full")

    disk.full = False
    response, body = h.request("POST", "/api/pull", step=0.1, data=b'{"model": "tiny", "stream": false}')
    assert response.code == 200 and json.loads(body) == {"status": "success"}


def test_a_manifest_that_cannot_be_kept_is_still_served(
    tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_api_proxy": "false"})

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h.mirror.store, "write_manifest", full)
    response, body = h.request("GET", "/v2/library/tiny/manifests/latest")
    assert response.code == 200 and body == registry.manifests[("library/tiny", "latest")]
    assert value(scrape(h)[1], "ollama_mirror_disk_full_total") == 1
