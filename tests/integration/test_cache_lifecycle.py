"""The cache's lifecycle with the real daemon: eviction under a cap while reading, the index rebuilt,
an existing Ollama models directory served, and a disk too small for a download."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import UPSTREAM_HOST, fetch_blob, get_manifest, wait_until
from tests.support import filesystems
from tests.support.daemon import MirrorFactory
from tests.support.models import MiB, ModelFactory, PushedModel, http_request
from tests.support.registry import free_port


def pull(url: str, name: str) -> dict[str, object]:
    response = http_request(
        "POST", url + "/api/pull", body=json.dumps({"model": name, "stream": False}).encode()
    )
    return json.loads(response.body)  # type: ignore[no-any-return]


def tags(url: str) -> list[str]:
    return [m["name"] for m in json.loads(http_request("GET", url + "/api/tags").body)["models"]]


def lifecycle(**cache: object) -> dict[str, object]:
    return {"cache": {"min_free_gb": 0, **cache}, "upstream": {"chunk_size": "1MiB", "retry_delay": 0.1}}


def test_eviction_under_a_cap_spares_what_is_being_read(
    mirror_factory: MirrorFactory, model_factory: ModelFactory
) -> None:
    first = model_factory("library/evict-a", "latest", 6 * MiB, 11)
    second = model_factory("library/evict-b", "latest", 6 * MiB, 12)
    mirror = mirror_factory(config=lifecycle(max_size_gb=0.009, cleanup_interval=1))  # 9 MB: one model fits
    assert pull(mirror.url, "evict-a") == {"status": "success"}
    blob = first.model_layer
    reader = socket.create_connection(("127.0.0.1", mirror.port), timeout=30)
    path = f"/v2/library/evict-a/blobs/{blob.digest}"
    reader.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    received = reader.recv(65536)  # headers and the start: the response is in flight
    assert pull(mirror.url, "evict-b") == {"status": "success"}  # over the cap while 'a' is being read
    # 'a' is the least recently used but pinned while it is read, so the sweeps take 'b' to get under the cap
    wait_until(
        lambda: tags(mirror.url) == ["evict-a:latest"], 10, "the cap enforced around the pinned model", 0.5
    )
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(
        next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
    )
    with reader:
        while len(body) < length and (chunk := reader.recv(1 << 20)):  # the read completes, byte for byte
            body += chunk
    assert hashlib.sha256(body).hexdigest() == blob.hex
    cache = Path(mirror.cache_dir)
    size = sum(p.stat().st_size for p in (cache / "blobs").iterdir())
    assert size <= 9_000_000
    assert (cache / "blobs" / f"sha256-{blob.hex}").exists()
    assert not (cache / "blobs" / f"sha256-{second.model_layer.hex}").exists()
    assert "sweep: removed 1 models" in mirror.log_text()


def test_a_deleted_or_corrupt_index_is_rebuilt_from_the_files(
    mirror_factory: MirrorFactory, small_model: PushedModel
) -> None:
    mirror = mirror_factory(config=lifecycle())
    assert pull(mirror.url, "tiny") == {"status": "success"}
    index = Path(mirror.cache_dir) / ".mirror" / "index.sqlite3"
    wait_until(index.exists, 10, "the index written")
    mirror.stop()
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    index.write_bytes(b"garbage" * 1000)
    mirror.start()
    assert tags(mirror.url) == ["tiny:latest"]

    def indexed() -> bool:
        with contextlib.closing(sqlite3.connect(index)) as db:
            try:
                return [r[0] for r in db.execute("SELECT name FROM models")] == [
                    f"{UPSTREAM_HOST}/library/tiny:latest"
                ]
            except sqlite3.DatabaseError:
                return False

    wait_until(indexed, 10, "the index rebuilt with the cached model")
    assert "rebuilt from the files" in mirror.log_text()
    mirror.stop()
    index.unlink()
    mirror.start()
    wait_until(indexed, 10, "a deleted index rebuilt")


def test_an_existing_ollama_models_directory_is_served_offline(
    mirror_factory: MirrorFactory, small_model: PushedModel, tmp_path: Path
) -> None:
    models = tmp_path / "ollama-models"
    manifest = models / "manifests" / UPSTREAM_HOST / "library" / "tiny" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(small_model.manifest)
    (models / "blobs").mkdir()
    for blob in small_model.blobs:
        shutil.copyfile(blob.path, models / "blobs" / f"sha256-{blob.hex}")
    mirror = mirror_factory(
        cache_dir=models, upstream_url=f"http://127.0.0.1:{free_port()}", config=lifecycle()
    )
    assert tags(mirror.url) == ["tiny:latest"]
    response = get_manifest(mirror, small_model)
    assert response.status == 200 and response.body == small_model.manifest
    got = fetch_blob(mirror, small_model, small_model.model_layer)
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == small_model.model_layer.hex


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs as the cache's disk (needs root)."""
    with filesystems.small_disk(tmp_path / "disk", 6) as disk:
        yield disk


def test_a_download_the_disk_cannot_hold_fails_clearly_and_leaves_the_cache_whole(
    mirror_factory: MirrorFactory, model_factory: ModelFactory, small_model: PushedModel, small_disk: Path
) -> None:
    big = model_factory("library/too-big", "latest", 8 * MiB, 13)
    mirror = mirror_factory(cache_dir=small_disk / "cache", config=lifecycle())
    assert pull(mirror.url, "tiny") == {"status": "success"}
    response = http_request("POST", mirror.url + "/api/pull", body=b'{"model": "too-big", "stream": false}')
    assert response.status == 507  # Insufficient Storage
    assert "not enough disk space" in json.loads(response.body)["error"]
    got = fetch_blob(mirror, big, big.model_layer)
    assert got.status == 507 and "not enough disk space" in got.body.decode()
    assert os.listdir(small_disk / "cache" / ".mirror" / "partial") == []
    assert not (small_disk / "cache" / "blobs" / f"sha256-{big.model_layer.hex}").exists()
    assert tags(mirror.url) == ["tiny:latest"]  # everything else keeps working
    got = fetch_blob(mirror, small_model, small_model.model_layer)
    assert got.status == 200 and hashlib.sha256(got.body).hexdigest() == small_model.model_layer.hex
