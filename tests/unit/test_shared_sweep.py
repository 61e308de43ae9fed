"""The sweep of the shared copy, on a fake clock, over a store and a Redis in dicts: retention by the
cluster's last use, blobs no tag lists, abandoned uploads, one sweeper per interval."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from ollama_mirror.cluster.s3 import Listed, Storage, Upload
from ollama_mirror.cluster.sweep import DAY, SharedSweep
from ollama_mirror.names import ModelName
from tests.unit.fakeredis import FakeRedis

HOUR = 3600.0


class FakeS3:
    """Objects (key -> (bytes, when written)) and multipart uploads, under the storage's prefix."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.storage = Storage("http://s3", "bucket", "cluster", "us-east-1")
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.uploads: list[Upload] = []

    def put(self, name: str, data: bytes) -> None:
        self.objects[self.storage.key(name)] = (data, self.clock.seconds())

    async def list_objects(self, prefix: str) -> list[Listed]:
        return [Listed(k, len(d), w) for k, (d, w) in sorted(self.objects.items()) if k.startswith(prefix)]

    async def get_document(self, key: str) -> bytes | None:
        found = self.objects.get(key)
        return None if found is None else found[0]

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    async def list_uploads(self, prefix: str) -> list[Upload]:
        return [upload for upload in self.uploads if upload.key.startswith(prefix)]

    async def abort_upload(self, key: str, upload_id: str) -> None:
        self.uploads = [u for u in self.uploads if u.upload_id != upload_id]


def result(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "did not complete"
    return box[0]


def manifest(*hexes: str) -> bytes:
    layers = [
        {"digest": f"sha256:{h}", "size": 10, "mediaType": "application/vnd.ollama.image.model"}
        for h in hexes
    ]
    return json.dumps({"schemaVersion": 2, "config": layers[0], "layers": layers[1:]}).encode()


def setup(clock: Clock) -> tuple[FakeS3, FakeRedis, SharedSweep, SharedSweep]:
    s3, redis = FakeS3(clock), FakeRedis(clock)
    a, b = (
        SharedSweep(s3, redis, clock, f"http://{n}:11434", "test", retention_days=30, interval=HOUR)  # type: ignore[arg-type]
        for n in "ab"
    )
    return s3, redis, a, b


def test_a_tag_unused_for_the_retention_goes_with_the_blobs_only_it_listed() -> None:
    clock = Clock()
    clock.advance(1000 * DAY)
    s3, _, a, b = setup(clock)
    s3.put("blobs/sha256-" + "1" * 64, b"x" * 10)  # shared by both tags
    s3.put("blobs/sha256-" + "2" * 64, b"y" * 10)  # only the old tag's
    s3.put("manifests/registry.ollama.ai/library/old/latest", manifest("1" * 64, "2" * 64))
    s3.put("manifests/registry.ollama.ai/library/used/latest", manifest("1" * 64))
    clock.advance(31 * DAY)
    b.model_used(ModelName.parse("used"), True)  # another node served this one lately
    report = result(ensureDeferred(a.sweep()))
    assert (report.tags, report.blobs, report.freed_bytes) == (1, 1, 10)
    assert set(s3.objects) == {
        "cluster/blobs/sha256-" + "1" * 64,
        "cluster/manifests/registry.ollama.ai/library/used/latest",
    }


def test_a_young_blob_no_tag_lists_yet_is_kept_for_its_manifest() -> None:
    clock = Clock()
    s3, _, a, _ = setup(clock)
    s3.put("blobs/sha256-" + "3" * 64, b"z")
    clock.advance(HOUR / 2)
    assert result(ensureDeferred(a.sweep())).blobs == 0
    clock.advance(HOUR)
    assert result(ensureDeferred(a.sweep())).blobs == 1
    assert not s3.objects


def test_one_sweeper_per_interval_for_the_whole_cluster() -> None:
    clock = Clock()
    _, _, a, b = setup(clock)
    assert result(ensureDeferred(a.sweep())) is not None
    assert result(ensureDeferred(b.sweep())) is None  # a holds the sweeper's lease
    clock.advance(HOUR)
    assert result(ensureDeferred(b.sweep())) is not None


def test_uploads_abandoned_for_a_day_are_aborted() -> None:
    clock = Clock()
    clock.advance(10 * DAY)
    s3, _, a, _ = setup(clock)
    s3.uploads = [
        Upload("cluster/blobs/sha256-" + "4" * 64, "old", clock.seconds() - 2 * DAY),
        Upload("cluster/blobs/sha256-" + "5" * 64, "running", clock.seconds() - HOUR),
    ]
    assert result(ensureDeferred(a.sweep())).uploads == 1
    assert [u.upload_id for u in s3.uploads] == ["running"]
