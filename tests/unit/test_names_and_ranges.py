"""Names, digests and ranges: validated before anything becomes a path or a read."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ollama_mirror.names import InvalidName, ModelName, parse_digest
from ollama_mirror.web.ranges import InvalidRange, UnsatisfiableRange, parse_range


@pytest.mark.parametrize(
    ("text", "parts", "display"),
    [
        ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
        ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
        ("me/model:q4_K_M", ("registry.ollama.ai", "me", "model", "q4_K_M"), "me/model:q4_K_M"),
        ("hf.co/user/repo:Q8_0", ("hf.co", "user", "repo", "Q8_0"), "hf.co/user/repo:Q8_0"),
        (
            "mirror:11434/library/tiny",
            ("mirror:11434", "library", "tiny", "latest"),
            "mirror:11434/library/tiny:latest",
        ),
    ],
)
def test_names_parse_like_ollama(text: str, parts: tuple[str, ...], display: str) -> None:
    name = ModelName.parse(text)
    assert (name.host, name.namespace, name.model, name.tag) == parts
    assert name.display() == display


@pytest.mark.parametrize(
    "text",
    [
        "",
        "../etc/passwd",
        "a/../../b",
        "lib.rary/m",
        "/abs",
        "a/b/c/d",
        "m:",
        "m:../x",
        "-m",
        "m\x00",
        "h/ns/.m",
        "x" * 81,
        "m:" + "t" * 81,
    ],
)
def test_bad_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidName):
        ModelName.parse(text)


def test_digests() -> None:
    assert parse_digest("sha256:" + "a" * 64) == "a" * 64
    for bad in [
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha512:" + "a" * 64,
        "sha256:../" + "a" * 61,
        "a" * 64,
    ]:
        with pytest.raises(InvalidName):
            parse_digest(bad)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-0", (0, 0)),
        ("bytes=10-", (10, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-200", (90, 99)),
        ("bytes=0-1,5-6", None),
        ("Bytes=0-3", (0, 3)),  # RFC 9110: the unit is case-insensitive
        ("BYTES=-5", (95, 99)),
        ("bytes = 2-4", (2, 4)),
        ("bytes=2-4 ", (2, 4)),
        ("bytes=0-1, 5-6", None),
        ("items=0-3", None),  # an unknown unit is ignored
        ("bytes=0-99999999999999999999", (0, 99)),
        ("bytes=007-008", (7, 8)),
    ],
)
def test_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "Bytes=-00"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, 100)


@pytest.mark.parametrize(
    "header",
    ["bytes=5-1", "bytes=-", "bytes=a-b", "bytes=1-2,x", "bytes=1--2", "bytes=", "bytes=0-3,", "bytes=1-2-3"],
)
def test_malformed_ranges(header: str) -> None:
    with pytest.raises(InvalidRange):
        parse_range(header, 100)


@given(
    first=st.integers(0, 300),
    last=st.integers(0, 300),
    size=st.integers(0, 200),
    unit=st.sampled_from(["bytes", "Bytes", "BYTES"]),
)
def test_a_range_is_what_rfc_9110_says(first: int, last: int, size: int, unit: str) -> None:
    header = f"{unit}={first}-{last}"
    if last < first:
        with pytest.raises(InvalidRange):
            parse_range(header, size)
    elif first >= size:
        with pytest.raises(UnsatisfiableRange):
            parse_range(header, size)
    else:
        assert parse_range(header, size) == (first, min(last, size - 1))


def test_manifest_blobs_refuses_manifests_with_unsafe_digests_or_sizes() -> None:
    import json

    from ollama_mirror.cache.store import manifest_blobs

    good = {"digest": "sha256:" + "a" * 64, "size": 3}

    def manifest(*layers: object) -> bytes:
        return json.dumps({"config": good, "layers": list(layers)}).encode()

    assert manifest_blobs(manifest(good)) == [("sha256:" + "a" * 64, 3)] * 2
    for bad in (
        {"digest": "sha256:../../etc/passwd", "size": 1},
        {"digest": "sha256:" + "a" * 65, "size": 1},
        {"digest": 5, "size": 1},
        {"digest": "sha256:" + "b" * 64, "size": -1},
        {"digest": "sha256:" + "b" * 64, "size": "12"},
        {"digest": "sha256:" + "b" * 64},
    ):
        assert manifest_blobs(manifest(good, bad)) == []
    assert manifest_blobs(b"not json") == [] and manifest_blobs(b"[]") == []
