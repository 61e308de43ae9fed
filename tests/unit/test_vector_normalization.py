"""How a recorded exchange becomes a vector entry: the rules a push's replay depends on."""

from __future__ import annotations

import base64

import pytest

from tests.support.recorder import BODY_KEEP, Exchange
from tests.support.vectors import Bindings, expand, normalize

HOST = "127.0.0.1:41234"
FIRST, SECOND = "a" * 32, "b" * 32


def exchange(method: str, target: str, body: bytes = b"", content_type: str = "", **answer: str) -> Exchange:
    headers = {"content-type": content_type} if content_type else {}
    return Exchange(
        seq=1,
        method=method,
        target=target,
        request_headers=headers,
        request_body=body[:BODY_KEEP],
        request_bytes=len(body),
        status=202,
        response_headers=answer,
        complete=True,
    )


def test_upload_sessions_are_numbered_in_the_order_the_mirror_opened_them() -> None:
    bindings = Bindings(host=HOST)
    opened = [
        normalize(
            exchange(
                "POST",
                "/v2/team/m/blobs/uploads/",
                location=f"http://{HOST}/v2/team/m/blobs/uploads/{upload}",
            ),
            bindings,
        )
        for upload in (FIRST, SECOND)
    ]
    assert [o["response"]["headers"]["location"] for o in opened] == [
        "http://{host}/v2/team/m/blobs/uploads/{upload:1}",
        "http://{host}/v2/team/m/blobs/uploads/{upload:2}",
    ]
    patched = normalize(exchange("PATCH", f"/v2/team/m/blobs/uploads/{SECOND}", b"x"), bindings)
    assert patched["request"]["target"] == "/v2/team/m/blobs/uploads/{upload:2}"
    values = {name: upload for upload, name in bindings.uploads.items()}
    assert expand(patched["request"]["target"], values) == f"/v2/team/m/blobs/uploads/{SECOND}"


def test_a_push_body_is_kept_byte_for_byte_and_an_api_body_as_its_document() -> None:
    manifest = b'{"schemaVersion":2,"layers":[]}'
    pushed = normalize(
        exchange(
            "PUT", "/v2/team/m/manifests/v1", manifest, "application/vnd.docker.distribution.manifest.v2+json"
        ),
        Bindings(),
    )
    assert base64.b64decode(pushed["request"]["body"]) == manifest
    assert "json" not in pushed["request"]
    api = normalize(exchange("POST", "/api/pull", b'{"model": "tiny"}', "application/json"), Bindings())
    assert api["request"]["json"] == {"model": "tiny"} and "body" not in api["request"]


def test_a_body_the_recorder_cut_short_is_refused_rather_than_replayed_wrong() -> None:
    with pytest.raises(ValueError, match="too large for a vector"):
        normalize(exchange("PATCH", f"/v2/team/m/blobs/uploads/{FIRST}", b"x" * (BODY_KEEP + 1)), Bindings())
