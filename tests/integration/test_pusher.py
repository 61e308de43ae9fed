"""The Go-style test pusher (``tests/support/pusher.py``) against a real registry and a scripted one.

Against the CNCF distribution registry (``registry`` fixture): a model pushed in many small parts comes back
byte for byte through the Go-style puller; a layer named as coming from another model is mounted (POST 201,
no PATCH); a second push only HEADs; a zero-byte blob is committed without a PATCH.

The distribution registry cannot do Ollama's token flow (its token realm would have to be on its own
host:port, where nothing answers) nor 307 part redirects, so those run against ``_ScriptedRegistry``: a
small in-test registry that checks every request the way a strict server would (signature of the token
request, ``Content-Range`` continuity, the composite etag, the digest).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from cryptography.exceptions import InvalidSignature

from tests.support.models import BuiltModel, KiB, build_model
from tests.support.ollamakey import EMPTY_BODY_HASH, OllamaKey
from tests.support.puller import pull
from tests.support.pusher import (
    DEFAULT_USER_AGENT,
    EMPTY_ETAG,
    MANIFEST_CONTENT_TYPE,
    PushError,
    PushResult,
    go_manifest,
    push,
    upload_etag,
)
from tests.support.registry import RegistryProcess

PART_MIN = 8 * KiB
PART_MAX = 16 * KiB


def _repo(prefix: str) -> str:
    return f"pusher-{secrets.token_hex(4)}/{prefix}"


def _md5_parts(path: Path, spans: list[tuple[int, int]]) -> list[bytes]:
    data = path.read_bytes()
    return [hashlib.md5(data[offset : offset + size]).digest() for offset, size in spans]


def _steps(result: PushResult, digest: str) -> list[str]:
    return [r.step for r in result.requests_for(digest=digest)]


def _pull_back(registry: RegistryProcess, repo: str, tag: str, dest: Path, result: PushResult) -> None:
    """Pull ``repo:tag`` with the Go-style puller and check the manifest bytes and every blob's digest.

    ``newer_discovery``: the distribution registry answers the discovery GET with 200 and no Location.
    """
    pulled = pull(registry.url, repo, tag, dest, newer_discovery=True)
    assert pulled.manifest_bytes == result.manifest_bytes
    assert pulled.manifest_digest == result.manifest_digest
    manifest = json.loads(result.manifest_bytes)
    wanted = {layer["digest"] for layer in manifest["layers"]} | {manifest["config"]["digest"]}
    assert {digest for digest, _size, _path in pulled.blobs} == wanted
    for digest, size, path in pulled.blobs:
        data = path.read_bytes()
        assert len(data) == size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


# --- against the distribution registry ------------------------------------------------------------


def test_a_model_pushed_in_many_parts_comes_back_byte_for_byte(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    model = build_model(tmp_path / "models", size=300 * KiB, seed=11)
    repo = _repo("parts")
    result = push(registry.url, repo, "v1", model, part_size_min=PART_MIN, part_size_max=PART_MAX)

    # Layers first, then the config (PushModel); everything uploaded; the manifest is Go's re-marshalling,
    # which for a manifest written like `ollama create` is the same bytes.
    assert [b.digest for b in result.blobs] == [*(b.digest for b in model.layers), model.config.digest]
    assert result.uploaded == [b.digest for b in result.blobs]
    assert result.manifest_bytes == model.manifest
    assert result.manifest_status == 201
    assert result.manifest_headers["docker-content-digest"] == model.digest

    gguf = model.model_layer
    pushed = result.blob(gguf.digest)
    # 300 KiB / 16 is above the maximum: parts of PART_MAX, and more than 16 of them (no cap on the count).
    assert [p.size for p in pushed.parts[:-1]] == [PART_MAX] * (len(pushed.parts) - 1)
    assert len(pushed.parts) == -(-gguf.size // PART_MAX) > 16

    for blob in model.blobs:
        pushed = result.blob(blob.digest)
        assert _steps(result, blob.digest) == ["head", "post", *["patch"] * len(pushed.parts), "commit"]
        head, post, *patches, commit = result.requests_for(digest=blob.digest)
        assert (head.method, head.status, post.method, post.status) == ("HEAD", 404, "POST", 202)
        assert post.url == f"{registry.url}/v2/{repo}/blobs/uploads/"
        assert post.header("Content-Length") == "0"
        # Part sizes as Go computes them: clamp(size // 16, min, max), contiguous, covering the blob.
        expected_size = max(PART_MIN, min(blob.size // 16, PART_MAX))
        offset = 0
        url = pushed.location
        assert url is not None
        for part, patch in zip(pushed.parts, patches, strict=True):
            assert (part.offset, part.size) == (offset, min(expected_size, blob.size - offset))
            assert patch.method == "PATCH" and patch.status == 202
            assert patch.url == url  # each part goes to the Location of the previous answer
            assert patch.header("Content-Type") == "application/octet-stream"
            assert patch.header("Content-Length") == str(part.size)
            assert patch.header("X-Redirect-Uploads") == "1"
            assert patch.header("Content-Range") == f"{part.offset}-{part.offset + part.size - 1}"
            assert patch.header("User-Agent") == DEFAULT_USER_AGENT
            assert patch.header("Authorization") is None
            assert patch.bytes_sent == part.size
            offset += part.size
            url = patch.response_headers["location"]
        assert offset == blob.size
        # The commit: the last Location, keys re-sorted (_state, digest, etag), the composite md5 etag.
        etag = upload_etag(_md5_parts(blob.path, [(p.offset, p.size) for p in pushed.parts]))
        assert pushed.etag == etag
        assert commit.method == "PUT" and commit.status == 201
        assert commit.url.split("?")[0] == url.split("?")[0]
        query = urlsplit(commit.url).query
        assert [k for k, _v in parse_qsl(query)] == ["_state", "digest", "etag"]
        assert f"digest={quote(blob.digest, safe='')}&etag={etag}" in query
        assert commit.header("Content-Length") == "0"
        assert commit.header("Content-Type") == "application/octet-stream"

    [manifest_put] = result.requests_for(step="manifest")
    assert manifest_put.method == "PUT"
    assert manifest_put.url == f"{registry.url}/v2/{repo}/manifests/v1"
    assert manifest_put.header("Content-Type") == MANIFEST_CONTENT_TYPE
    assert manifest_put.status == 201

    _pull_back(registry, repo, "v1", tmp_path / "pulled", result)


def test_a_layer_from_another_model_is_mounted(registry: RegistryProcess, tmp_path: Path) -> None:
    model = build_model(tmp_path / "models", seed=12)
    source = _repo("source")
    push(registry.url, source, "latest", model, part_size_min=PART_MIN, part_size_max=PART_MAX)

    target = _repo("derived")
    gguf = model.model_layer
    # Ollama records the short name of the model a layer came from; the POST names only ns/model.
    result = push(
        registry.url,
        target,
        "latest",
        model,
        from_names={gguf.digest: f"{source}:latest"},
        part_size_min=PART_MIN,
        part_size_max=PART_MAX,
    )
    assert result.mounted == [gguf.digest]
    assert _steps(result, gguf.digest) == ["head", "post"]
    post = result.requests_for(step="post", digest=gguf.digest)[0]
    assert post.status == 201
    # url.Values.Encode: keys sorted, "/" and ":" percent-encoded.
    assert post.url == (
        f"{registry.url}/v2/{target}/blobs/uploads/"
        f"?from={quote(source, safe='')}&mount={quote(gguf.digest, safe='')}"
    )
    # The others are not marked as coming from anywhere: an ordinary upload.
    assert sorted(result.uploaded) == sorted(b.digest for b in model.blobs if b.digest != gguf.digest)
    # The pushed manifest carries "from" (json.Marshal of Ollama's Layer), so its digest is not the model's.
    layer = json.loads(result.manifest_bytes)["layers"][0]
    assert layer == {**gguf.descriptor(), "from": f"{source}:latest"}
    assert result.manifest_bytes == go_manifest(model.manifest, {gguf.digest: f"{source}:latest"})
    assert result.manifest_digest != model.digest
    assert result.manifest_headers["docker-content-digest"] == result.manifest_digest

    _pull_back(registry, target, "latest", tmp_path / "pulled", result)


def test_a_second_push_only_asks_head(registry: RegistryProcess, tmp_path: Path) -> None:
    model = build_model(tmp_path / "models", seed=13)
    repo = _repo("again")
    first = push(registry.url, repo, "latest", model, part_size_min=PART_MIN, part_size_max=PART_MAX)
    assert len(first.uploaded) == len(model.blobs)

    second = push(registry.url, repo, "latest", model, part_size_min=PART_MIN, part_size_max=PART_MAX)
    assert second.skipped == [b.digest for b in second.blobs]
    assert [(r.method, r.status) for r in second.requests] == [("HEAD", 200)] * len(model.blobs) + [
        ("PUT", 201)
    ]
    assert second.manifest_digest == first.manifest_digest == model.digest


def test_a_zero_byte_blob_is_committed_without_a_patch(registry: RegistryProcess, tmp_path: Path) -> None:
    model = build_model(tmp_path / "models", seed=14, system="")
    empty = next(b for b in model.layers if b.size == 0)
    repo = _repo("empty")
    result = push(registry.url, repo, "latest", model)

    assert _steps(result, empty.digest) == ["head", "post", "commit"]
    pushed = result.blob(empty.digest)
    assert pushed.parts == [] and pushed.etag == EMPTY_ETAG
    commit = result.requests_for(step="commit", digest=empty.digest)[0]
    assert commit.url.split("?")[0] == (pushed.location or "").split("?")[0]
    assert commit.status == 201
    _pull_back(registry, repo, "latest", tmp_path / "pulled", result)


# --- against a scripted registry: the token flow, 307 parts, Go's failures ------------------------


@dataclass
class _Seen:
    method: str
    path: str
    headers: dict[str, str]
    length: int


@dataclass
class _Session:
    data: bytearray = field(default_factory=bytearray)
    parts: dict[int, bytes] = field(default_factory=dict)  # offset → bytes (PATCHed or PUT after a 307)
    state: int = 0


class _ScriptedRegistry:
    """Just enough of a registry for a push, strict about what it accepts.

    ``require_token``: every ``/v2/`` request needs ``Authorization: Bearer <token>``, else ``401`` with an
    Ollama-style challenge whose realm is ``/token`` on this server and whose scope is
    ``repository:<repo>:push,pull``; ``/token`` checks the Ollama signature against ``key``.
    ``reject_tokens``: keeps answering ``401`` whatever token. ``redirect_parts``: each PATCH is answered
    ``307`` to ``http://localhost:<port>/storage/...``, the next session URL in ``Docker-Upload-Location``.
    ``relative_locations``: session URLs are given as paths. ``fail_patch``: PATCHes answer that status.
    ``new_token_at_first_patch``: the token changes when the first PATCH arrives (it expired).
    ``two_lengths_on_head``: HEADs answer 200 with two different ``Content-Length`` headers.
    """

    def __init__(
        self,
        *,
        key: OllamaKey | None = None,
        require_token: bool = False,
        reject_tokens: bool = False,
        redirect_parts: bool = False,
        relative_locations: bool = False,
        fail_patch: int | None = None,
        new_token_at_first_patch: bool = False,
        two_lengths_on_head: bool = False,
    ) -> None:
        self.two_lengths_on_head = two_lengths_on_head
        self.key = key
        self.new_token_at_first_patch = new_token_at_first_patch
        self.require_token = require_token
        self.reject_tokens = reject_tokens
        self.redirect_parts = redirect_parts
        self.relative_locations = relative_locations
        self.fail_patch = fail_patch
        self.token = "token-" + secrets.token_hex(8)
        self.seen: list[_Seen] = []
        self.signatures_ok: list[bool] = []
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.sessions: dict[str, _Session] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def session_url(self, repo: str, sid: str, state: int) -> str:
        path = f"/v2/{repo}/blobs/uploads/{sid}?_state={sid}%3D{state}"
        return path if self.relative_locations else self.url + path

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **(headers or {})}  # a HEAD gives the blob's
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.seen.append(_Seen(self.command, self.path, dict(self.headers.items()), len(body)))
                    fake.route(self, body)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = handle_any

        return Handler

    def route(self, h: Any, body: bytes) -> None:
        split = urlsplit(h.path)
        path, query = split.path, dict(parse_qsl(split.query))
        if path == "/token":
            self.signatures_ok.append(self._signature_ok(h))
            h.reply(200, json.dumps({"token": self.token}).encode())
            return
        if path.startswith("/storage/"):  # the "object storage" a 307 sends a part to
            _, _, sid, offset = path.split("/")
            assert h.headers.get("Authorization") is None
            self.sessions[sid].parts[int(offset)] = body
            h.reply(201)
            return
        match = re.match(r"^/v2/(.+)/(blobs/uploads|blobs|manifests)/(.*)$", path)
        assert match is not None, path
        repo, kind, rest = match.groups()
        if self.new_token_at_first_patch and h.command == "PATCH":
            self.new_token_at_first_patch = False
            self.token = "token-" + secrets.token_hex(8)  # the first token expired
        if self.require_token and (
            self.reject_tokens or h.headers.get("Authorization") != f"Bearer {self.token}"
        ):
            challenge = (
                f'Bearer realm="{self.url}/token",service="scripted",scope="repository:{repo}:push,pull"'
            )
            h.reply(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
            return
        if kind == "blobs" and h.command == "HEAD" and self.two_lengths_on_head:
            h.send_response(200)
            h.send_header("Content-Length", "5")
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif kind == "blobs" and h.command == "HEAD":
            if rest in self.blobs:
                h.reply(200, headers={"Content-Length": str(len(self.blobs[rest]))})
            else:
                h.reply(404)
        elif kind == "blobs/uploads" and h.command == "POST":
            if query.get("mount") in self.blobs:
                h.reply(201)
                return
            sid = secrets.token_hex(6)
            self.sessions[sid] = _Session()
            h.reply(202, headers={"Location": self.session_url(repo, sid, 0)})
        elif kind == "blobs/uploads" and h.command == "PATCH":
            session = self.sessions[rest]
            if self.fail_patch is not None:
                h.reply(self.fail_patch, b'{"errors":[{"code":"BLOB_UPLOAD_INVALID"}]}')
                return
            first, last = (int(x) for x in h.headers["Content-Range"].split("-"))
            assert last - first + 1 == int(h.headers["Content-Length"])
            session.state += 1
            next_url = self.session_url(repo, rest, session.state)
            if self.redirect_parts:
                target = f"http://localhost:{self.port}/storage/{rest}/{first}"
                h.reply(307, headers={"Location": target, "Docker-Upload-Location": next_url})
                return
            assert first == len(session.data)
            session.data += body
            session.parts[first] = body
            h.reply(202, headers={"Location": next_url, "Range": f"0-{len(session.data) - 1}"})
        elif kind == "blobs/uploads" and h.command == "PUT":
            session = self.sessions.pop(rest)
            data = b"".join(session.parts[k] for k in sorted(session.parts))
            etag = upload_etag([hashlib.md5(session.parts[k]).digest() for k in sorted(session.parts)])
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if query.get("digest") != digest or query.get("etag") != etag:
                h.reply(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
                return
            self.blobs[digest] = data
            h.reply(201, headers={"Docker-Content-Digest": digest})
        elif kind == "manifests" and h.command == "PUT":
            self.manifests[f"{repo}:{rest}"] = body
            h.reply(201, headers={"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()})
        else:
            h.reply(405)

    def _signature_ok(self, h: Any) -> bool:
        if self.key is None:
            return False
        public_b64, _, signature = str(h.headers.get("Authorization", "")).partition(":")
        data = f"GET,{self.url}{h.path},{EMPTY_BODY_HASH}".encode()
        try:
            self.key.private.public_key().verify(base64.b64decode(signature), data)
        except (InvalidSignature, ValueError):
            return False
        return public_b64 == self.key.public_b64


@pytest.fixture
def scripted() -> Iterator[list[_ScriptedRegistry]]:
    servers: list[_ScriptedRegistry] = []
    yield servers
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> BuiltModel:
    return build_model(tmp_path_factory.mktemp("pusher-models"), size=40 * KiB, seed=21)


def test_a_401_gets_a_signed_token_that_is_kept(scripted: list[_ScriptedRegistry], small: BuiltModel) -> None:
    key = OllamaKey()
    fake = _ScriptedRegistry(key=key, require_token=True)
    scripted.append(fake)
    result = push(fake.url, "ns/model", "v1", small, key=key, part_size_min=PART_MIN, part_size_max=PART_MAX)

    assert result.token_requests == 1 and fake.signatures_ok == [True]
    first_head, token, second_head = result.requests[:3]
    assert (first_head.method, first_head.status, first_head.header("Authorization")) == ("HEAD", 401, None)
    assert token.step == "token" and token.status == 200
    query = dict(parse_qsl(urlsplit(token.url).query))
    # The scope is the challenge's, verbatim; keys sorted as url.Values.Encode sorts them.
    assert query["scope"] == "repository:ns/model:push,pull" and query["service"] == "scripted"
    assert [k for k, _v in parse_qsl(urlsplit(token.url).query)] == ["nonce", "scope", "service", "ts"]
    assert token.header("User-Agent") == DEFAULT_USER_AGENT
    assert (second_head.url, second_head.status) == (first_head.url, 404)
    # The token is kept for every later registry request of the push.
    assert all(r.header("Authorization") == f"Bearer {fake.token}" for r in result.requests[2:])
    assert fake.manifests["ns/model:v1"] == small.manifest
    assert set(fake.blobs) == {b.digest for b in small.blobs}


def test_a_401_on_a_part_gets_a_new_token_and_the_part_is_sent_again(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    key = OllamaKey()
    fake = _ScriptedRegistry(key=key, require_token=True, new_token_at_first_patch=True)
    scripted.append(fake)
    result = push(fake.url, "ns/model", "v1", small, key=key, part_size_min=PART_MIN, part_size_max=PART_MAX)

    assert result.token_requests == 2 and fake.signatures_ok == [True, True]
    gguf = small.model_layer
    logged = result.requests_for(digest=gguf.digest)
    assert [r.step for r in logged[:4]] == ["head", "token", "head", "post"]  # the first token, at the HEAD
    first, token, again = logged[4:7]
    # uploadPart has no 401 retry of its own: the part fails, a token is fetched, and Run's retry loop
    # sends the same part to the same URL again (after its 1 s sleep in Go).
    assert (first.method, first.status, token.step, again.method, again.status) == (
        "PATCH",
        401,
        "token",
        "PATCH",
        202,
    )
    assert again.url == first.url and again.header("Content-Range") == first.header("Content-Range")
    assert again.header("Authorization") == f"Bearer {fake.token}"
    assert result.blob(gguf.digest).parts[0].statuses == [401, 202]
    assert fake.blobs[gguf.digest] == gguf.path.read_bytes()


def test_a_second_401_fails_after_a_second_token(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    key = OllamaKey()
    fake = _ScriptedRegistry(key=key, require_token=True, reject_tokens=True)
    scripted.append(fake)
    with pytest.raises(PushError, match=r"^unauthorized: access denied$"):
        push(fake.url, "ns/model", "v1", small, key=key)
    assert [s.method for s in fake.seen] == ["HEAD", "GET", "HEAD", "GET"]


def test_307_parts_go_to_the_redirect_target_without_the_token(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    key = OllamaKey()
    fake = _ScriptedRegistry(key=key, require_token=True, redirect_parts=True)
    scripted.append(fake)
    result = push(fake.url, "ns/model", "v1", small, key=key, part_size_min=PART_MIN, part_size_max=PART_MAX)

    gguf = small.model_layer
    pushed = result.blob(gguf.digest)
    assert len(pushed.parts) > 1
    patches = result.requests_for(step="patch", digest=gguf.digest)
    puts = result.requests_for(step="redirect-put", digest=gguf.digest)
    assert [p.status for p in patches] == [307] * len(pushed.parts)
    assert len(puts) == len(pushed.parts)
    assert all(p.url.startswith(f"http://localhost:{fake.port}/storage/") for p in puts)
    for put in puts:
        assert put.status == 201
        assert put.header("Authorization") is None and put.header("Content-Range") is None
        assert put.header("X-Redirect-Uploads") is None
        assert put.header("Content-Type") == "application/octet-stream"
        assert put.header("User-Agent") == DEFAULT_USER_AGENT
    # Each next PATCH went to the 307's Docker-Upload-Location, the commit to the last one.
    next_urls = [p.response_headers["docker-upload-location"] for p in patches]
    assert [p.url for p in patches[1:]] == next_urls[:-1]
    commit = result.requests_for(step="commit", digest=gguf.digest)[0]
    assert commit.url.startswith(next_urls[-1].split("?")[0]) and commit.status == 201
    assert fake.blobs[gguf.digest] == gguf.path.read_bytes()


def test_a_relative_location_fails_as_in_go(scripted: list[_ScriptedRegistry], small: BuiltModel) -> None:
    fake = _ScriptedRegistry(relative_locations=True)
    scripted.append(fake)
    with pytest.raises(PushError) as caught:
        push(fake.url, "ns/model", "v1", small, retry_backoff=0)
    message = str(caught.value)
    assert re.fullmatch(
        r'max retries exceeded: Patch "http:///v2/ns/model/blobs/uploads/[0-9a-f]+\?_state=[0-9a-f]+%3D0": '
        r"http: no Host in request URL",
        message,
    ), message
    assert not any(s.method == "PATCH" for s in fake.seen)


def test_a_failing_part_is_retried_then_reported_like_the_cli(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    fake = _ScriptedRegistry(fail_patch=400)
    scripted.append(fake)
    with pytest.raises(PushError) as caught:
        push(fake.url, "ns/model", "v1", small, retry_backoff=0)
    assert str(caught.value) == (
        'max retries exceeded: http status 400 Bad Request: {"errors":[{"code":"BLOB_UPLOAD_INVALID"}]}'
    )
    assert caught.value.status == 400
    assert [s.method for s in fake.seen].count("PATCH") == 6


def test_a_push_without_a_key_cannot_answer_a_401(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    fake = _ScriptedRegistry(require_token=True)
    scripted.append(fake)
    with pytest.raises(PushError, match="unauthorized"):
        push(fake.url, "ns/model", "v1", small)
    assert [s.method for s in fake.seen] == ["HEAD"]


def test_two_content_lengths_break_the_connection_as_in_go(
    scripted: list[_ScriptedRegistry], small: BuiltModel
) -> None:
    fake = _ScriptedRegistry(two_lengths_on_head=True)
    scripted.append(fake)
    with pytest.raises(PushError) as caught:
        push(fake.url, "ns/model", "v1", small)
    first = small.layers[0].digest
    assert str(caught.value) == (
        f'Head "{fake.url}/v2/ns/model/blobs/{first}": net/http: HTTP/1.x transport connection broken: '
        'http: message cannot contain multiple Content-Length headers; got ["5" "0"]'
    )
