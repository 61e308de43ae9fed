"""The mirror's S3 client (:mod:`ollama_mirror.cluster.s3`) against a real S3 store (SeaweedFS), on the
reactor pytest-twisted runs: signed requests, ranged reads, documents, one-PUT and multipart uploads, and
errors in words.  Every wait is bounded."""

from __future__ import annotations

import hashlib
import os
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
from tests.support.models import MiB
from tests.support.s3server import S3Server

ensure = pytest_twisted.ensureDeferred  # (the decorator of every test here)


@pytest.fixture
def runner() -> Iterator[ThreadRunner]:
    threads = ThreadRunner(reactor)  # type: ignore[arg-type]
    threads.start()
    yield threads
    threads.stop()


def client(s3_server: S3Server, runner: ThreadRunner, secret: str | None = None) -> S3Client:
    config = load_config(
        None,
        {},
        {
            "cluster.storage_url": f"s3://{s3_server.bucket}/s3-test-{uuid.uuid4().hex[:8]}",
            "cluster.s3_endpoint": s3_server.endpoint,
            "cluster.s3_access_key_id": s3_server.access_key_id,
            "cluster.s3_secret_access_key": secret or s3_server.secret_access_key,
        },
    ).cluster
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    retry = RetryPolicy(reactor, 1, 0.05)  # type: ignore[arg-type]
    return S3Client(Storage.from_config(config), config, agent, reactor, runner, retry)  # type: ignore[arg-type]


@ensure  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_documents_go_in_and_come_out_and_a_missing_one_is_none(
    s3_server: S3Server, runner: ThreadRunner
) -> None:
    s3 = client(s3_server, runner)
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
    s3_server: S3Server, runner: ThreadRunner, tmp_path: Path, size: int
) -> None:
    s3 = client(s3_server, runner)
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
    s3_server: S3Server, runner: ThreadRunner
) -> None:
    s3 = client(s3_server, runner, secret="not-the-secret")
    with pytest.raises(UpstreamError) as raised:
        await s3.get_document(s3.storage.key("anything"))
    message = raised.value.message
    assert raised.value.status == 403 and f"s3://{s3_server.bucket}/" in message
    assert "SignatureDoesNotMatch" in message or "AccessDenied" in message
    assert "not-the-secret" not in message and s3_server.access_key_id not in message
