"""The mirror's S3 client (:mod:`ollama_mirror.cluster.s3`) against two real S3 implementations (SeaweedFS
and moto's server mode, each test on both), on the reactor pytest-twisted runs: signed requests, ranged
reads, documents, one-PUT and multipart uploads, and errors in words.  Every wait is bounded."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted  # type: ignore[import-untyped, unused-ignore]
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from ollama_mirror.cluster.s3 import S3Client, Storage
from ollama_mirror.config import load_config
from ollama_mirror.runner import ThreadRunner
from ollama_mirror.upstream.bodies import collect_limited
from ollama_mirror.upstream.errors import UpstreamError
from ollama_mirror.upstream.retry import RetryPolicy
from tests.integration.helpers import on_every_s3_store
from tests.support.models import MiB
from tests.support.s3server import S3Store

ensure = pytest_twisted.ensureDeferred  # (the decorator of every test here)
pytestmark = on_every_s3_store


@pytest.fixture
def runner() -> Iterator[ThreadRunner]:
    threads = ThreadRunner(reactor)  # type: ignore[arg-type]
    threads.start()
    yield threads
    threads.stop()


def client(s3_store: S3Store, runner: ThreadRunner, secret: str | None = None) -> S3Client:
    config = load_config(
        None,
        {},
        {
            "cluster.storage_url": f"s3://{s3_store.bucket}/s3-test-{uuid.uuid4().hex[:8]}",
            "cluster.s3_endpoint": s3_store.endpoint,
            "cluster.s3_access_key_id": s3_store.access_key_id,
            "cluster.s3_secret_access_key": secret or s3_store.secret_access_key,
        },
    ).cluster
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    retry = RetryPolicy(reactor, 1, 0.05)  # type: ignore[arg-type]
    return S3Client(Storage.from_config(config), config, agent, reactor, runner, retry)  # type: ignore[arg-type]


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_documents_go_in_and_come_out_and_a_missing_one_is_none(
    s3_store: S3Store, runner: ThreadRunner
) -> None:
    s3 = client(s3_store, runner)
    key = s3.storage.key("manifests/registry.ollama.ai/library/tiny/latest")
    assert await s3.get_document(key) is None and await s3.size(key) is None
    await s3.put_document(key, b'{"schemaVersion":2}')
    assert await s3.get_document(key) == b'{"schemaVersion":2}'
    assert await s3.size(key) == 19
    await s3.delete(key)
    assert await s3.size(key) is None


@pytest.mark.parametrize("size", [3 * MiB + 7, 12 * MiB + 5])  # one PUT; three parts of 5 MiB
@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_a_file_is_uploaded_whole_and_read_back_by_range(
    s3_store: S3Store, runner: ThreadRunner, tmp_path: Path, size: int
) -> None:
    s3 = client(s3_store, runner)
    path = tmp_path / "blob"
    data = os.urandom(size)
    path.write_bytes(data)
    key = s3.storage.key("blobs/sha256-" + hashlib.sha256(data).hexdigest())
    await s3.upload_file(key, str(path), size, part_size=5 * MiB)
    assert await s3.size(key) == size
    middle = 5 * MiB if size > 5 * MiB else size // 2  # (across a part boundary, when there are parts)
    start, end = middle - 10, middle + 20
    response = await s3.open_range(key, start, end)
    assert response.code == 206
    assert await collect_limited(response, MiB) == data[start : end + 1]
    tail = await s3.open_range(key, size - 5, None)
    assert await collect_limited(tail, MiB) == data[-5:]


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_a_wrong_secret_is_an_error_naming_the_store_and_what_it_said(
    s3_store: S3Store, runner: ThreadRunner
) -> None:
    s3 = client(s3_store, runner, secret="not-the-secret")
    with pytest.raises(UpstreamError) as raised:
        await s3.get_document(s3.storage.key("anything"))
    message = raised.value.message
    assert raised.value.status == 403 and f"s3://{s3_store.bucket}/" in message
    assert "SignatureDoesNotMatch" in message or "AccessDenied" in message
    assert "not-the-secret" not in message and s3_store.access_key_id not in message


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_a_multipart_upload_the_store_refuses_is_an_error_and_leaves_nothing_behind(
    s3_store: S3Store, runner: ThreadRunner, tmp_path: Path
) -> None:
    s3 = client(s3_store, runner)
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * MiB))
    key = s3.storage.key("blobs/sha256-small-parts")
    with pytest.raises(UpstreamError) as raised:  # parts of 1 MiB: S3 wants 5 MiB but for the last
        await s3.upload_file(key, str(path), 3 * MiB, part_size=MiB)
    assert raised.value.status == 400 and "EntityTooSmall" in raised.value.message
    assert await s3.size(key) is None
    prefix = urllib.parse.quote(key, safe="")
    uploads = s3_store.request("GET", f"/{s3_store.bucket}?uploads=&prefix={prefix}")
    assert uploads.status == 200 and b"<UploadId>" not in uploads.body  # (aborted, not left to bill)


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_a_range_past_the_end_is_an_error_with_the_store_s_code(
    s3_store: S3Store, runner: ThreadRunner
) -> None:
    s3 = client(s3_store, runner)
    key = s3.storage.key("blobs/sha256-five")
    await s3.put_document(key, b"hello")
    with pytest.raises(UpstreamError) as raised:
        await s3.open_range(key, 5, None)
    assert raised.value.status == 416 and "InvalidRange" in raised.value.message
    await s3.delete(key)
    await s3.delete(key)  # (a missing key is no error)


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_objects_and_unfinished_uploads_are_listed_and_an_upload_is_aborted(
    s3_store: S3Store, runner: ThreadRunner
) -> None:
    s3 = client(s3_store, runner)
    names = [f"blobs/sha256-{i:064x}" for i in range(3)]
    for name in names:
        await s3.put_document(s3.storage.key(name), b"x" * 5)
    await s3.put_document(s3.storage.key("manifests/h/ns/m/t"), b"{}")
    listed = await s3.list_objects(s3.storage.key("blobs/"))
    assert [entry.key for entry in listed] == [s3.storage.key(name) for name in names]
    assert all(entry.size == 5 and entry.modified > 0 for entry in listed)
    upload_key = s3.storage.key("blobs/sha256-" + "f" * 64)
    upload_id = await s3._create_upload(upload_key)  # (as a node that died mid-upload leaves it)
    uploads = await s3.list_uploads(s3.storage.key(""))
    assert [(u.key, u.upload_id) for u in uploads] == [(upload_key, upload_id)]
    assert uploads[0].initiated > 0
    await s3.abort_upload(upload_key, upload_id)
    assert await s3.list_uploads(s3.storage.key("")) == []
