"""A hypothesis-driven fuzz of names, ranges and JSON bodies against the real daemon.

Every answer must pass :func:`tests.integration.hostile.check` (no 5xx, JSON errors, no traceback, nothing
from outside the cache); afterwards no file has appeared outside the cache and a normal pull still works.
Bounded: a fixed number of examples per strategy, each one request on loopback.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ollama_mirror.web.routes import route_of
from tests.integration.helpers import go_pull, pull_into_cache
from tests.integration.hostile import SECRET, check, exchange, request
from tests.integration.test_hostile import HOSTILE_SETTINGS, snapshot
from tests.support.daemon import REPO_ROOT, MirrorFactory
from tests.support.models import PushedModel

FUZZ = settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

_FRAGMENTS = [
    "", "library", "tiny", "latest", "..", ".", "%2e%2e", "%2f", "%2F", "%00", "%ff", "%", "%zz", "manifests",
    "blobs", "sha256:", "sha256:" + "0" * 64, "registry.ollama.ai", "a" * 90, ":", "@", "~", "%5c", "..%2f..",
]  # fmt: skip
_FREE_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_categories=["Cs"]), max_size=24
).map(lambda s: quote(s, safe="%:@.-_~!$&'()*+,;="))
SEGMENT = st.one_of(
    st.sampled_from(_FRAGMENTS), _FREE_TEXT, st.lists(st.sampled_from(_FRAGMENTS), max_size=4).map("".join)
)
REGISTRY_PATH = st.builds(
    lambda ns, model, kind, ref: f"/v2/{ns}/{model}/{kind}/{ref}",
    SEGMENT,
    SEGMENT,
    st.sampled_from(["manifests", "blobs", "tags", "chunksums", "x"]),
    SEGMENT,
)
ANY_PATH = st.builds(
    lambda top, segments: top + "/" + "/".join(segments),
    st.sampled_from(["", "/v2", "/api", "/mirror", "/v1", "/metrics"]),
    st.lists(SEGMENT, max_size=6),
)
RANGE = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
    ),
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.one_of(st.just(""), st.integers(-5, 2**70)),
        st.one_of(st.just(""), st.integers(-5, 2**70)),
    ),
    st.lists(
        st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 70000), st.integers(0, 70000)),
        min_size=1,
        max_size=8,
    ).map(lambda parts: "bytes=" + ",".join(parts)),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
MODEL_NAME = st.one_of(
    st.sampled_from(
        ["tiny", "tiny:latest", "library/tiny", "../../etc/passwd", "/etc/passwd", "a:b:c", "/", ""]
    ),
    st.text(max_size=40),
    st.lists(SEGMENT, min_size=1, max_size=4).map("/".join),
)
BODY = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": MODEL_NAME | JSON},
        optional={"stream": JSON, "insecure": JSON, "verbose": JSON, "name": MODEL_NAME},
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


def test_fuzz_names_ranges_and_bodies(
    mirror_factory: MirrorFactory, small_model: PushedModel, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text(SECRET)
    mirror = mirror_factory(config=HOSTILE_SETTINGS)
    pull_into_cache(mirror, small_model)
    skip = (
        mirror.cache_dir / "blobs",
        mirror.cache_dir / "manifests",
        mirror.cache_dir / ".mirror",
        mirror.workdir,
    )
    # hypothesis itself creates .hypothesis/ in the working directory on its first run (a fresh clone)
    before, repo_before = snapshot(tmp_path, skip), set(os.listdir(REPO_ROOT)) - {".hypothesis"}
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    def send(
        method: str, target: str, what: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        data = request(method, target, headers, body)
        if method == "DELETE":
            data = data.replace(b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % len(body), 1)
        answer = exchange(mirror.port, data)
        proxied = route_of(urlsplit(target).path.encode()) in ("openai", "api_inference")
        check(answer, f"{method} {target} {what}"[:500], method, proxied)
        sent[what] += 1
        assert answer.status is not None
        statuses[answer.status] += 1

    @FUZZ
    @given(path=st.one_of(REGISTRY_PATH, ANY_PATH), method=st.sampled_from(["GET", "HEAD"]))
    def names(path: str, method: str) -> None:
        send(method, path or "/", "names")

    @FUZZ
    @given(value=RANGE)
    def ranges(value: str) -> None:
        blob = small_model.blobs[0]
        send("GET", f"/v2/{small_model.repo}/blobs/{blob.digest}", "ranges", {"Range": value})

    @FUZZ
    @given(route=st.sampled_from(["/api/pull", "/api/show", "/api/delete"]), body=BODY)
    def bodies(route: str, body: bytes) -> None:
        send("DELETE" if route == "/api/delete" else "POST", route, "bodies", body=body)

    names()
    ranges()
    bodies()
    assert snapshot(tmp_path, skip) == before, "a file was created outside the cache"
    assert set(os.listdir(REPO_ROOT)) - {".hypothesis"} == repo_before
    assert mirror.is_running()
    assert go_pull(mirror, small_model, tmp_path / "after").manifest_bytes == small_model.manifest
    print(f"fuzz: {sum(sent.values())} requests {dict(sent)}; statuses {dict(sorted(statuses.items()))}")
    assert min(sent.values()) >= 100  # each strategy really ran (examples are requests, one each)
