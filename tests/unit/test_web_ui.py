"""The operators' web page without a browser: sessions and CSRF, the routes through the whole HTTP tree
(StubTreq, fake clock), the static files' caching, the live stream and the traffic history."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from ollama_mirror.ops.history import TrafficHistory
from ollama_mirror.ops.stats import TrafficTally
from ollama_mirror.web.ui.live import EventStream, FillFeed
from ollama_mirror.web.ui.session import Sessions

from .fakeregistry import FakeRegistry
from .harness import BASE, Harness

SECRET = b"s" * 32
KEY = "operator-key"
PULL = b'{"model":"tiny","stream":false}'


# --- sessions --------------------------------------------------------------------------------------


def test_a_session_needs_a_configured_key_and_ends_when_it_expires_or_its_key_is_removed() -> None:
    clock = Clock()
    sessions = Sessions(SECRET, [b"k1", b"k2"], clock, lifetime=3600)
    assert sessions.sign_in("wrong") is None and sessions.sign_in("") is None
    cookie = sessions.sign_in("k2")
    assert cookie is not None and "k2" not in cookie  # the key itself never travels in the cookie
    session = sessions.check(cookie)
    assert session is not None
    assert Sessions(SECRET, [b"k2"], clock).check(cookie) is not None  # another process, same secret
    assert Sessions(SECRET, [b"k1"], clock).check(cookie) is None  # its key was removed
    assert Sessions(b"t" * 32, [b"k2"], clock).check(cookie) is None  # another secret
    expires, nonce, key_id, mac = cookie.split(".")
    assert sessions.check(f"{int(expires) + 86400}.{nonce}.{key_id}.{mac}") is None  # lengthened
    assert sessions.check(cookie + "x") is None and sessions.check("a.b") is None
    clock.advance(3599)
    assert sessions.check(cookie) is not None
    clock.advance(1)
    assert sessions.check(cookie) is None


def test_the_csrf_token_belongs_to_one_session_and_open_sessions_end_once_keys_are_set() -> None:
    clock = Clock()
    sessions = Sessions(SECRET, [b"k"], clock)
    first = sessions.check(sessions.sign_in("k"))
    second = sessions.check(sessions.sign_in("k"))
    assert first is not None and second is not None
    token = sessions.csrf_token(first)
    assert sessions.check_csrf(first, token)
    assert not sessions.check_csrf(second, token)  # a token from another session
    assert not sessions.check_csrf(first, None) and not sessions.check_csrf(first, token[:-1])
    with pytest.raises(ValueError):
        sessions.open_session()
    open_mirror = Sessions(SECRET, [], clock)
    anonymous = open_mirror.open_session()
    assert open_mirror.check(anonymous) is not None
    assert sessions.check(anonymous) is None  # keys were configured since: sign in again


def test_the_cookie_is_httponly_samesite_strict_and_limited_to_the_page() -> None:
    header = Sessions(SECRET, [b"k"], Clock()).cookie("v", secure=True).decode()
    assert header.startswith("ollama_mirror_ui=v;")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/mirror/ui", "Secure", "Max-Age=43200"):
        assert flag in header.split("; ")


# --- the routes, through the whole tree ------------------------------------------------------------


class Browser:
    """A client of its own (its own cookie jar, as a browser has) on the harness's HTTP tree."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.client = StubTreq(h.mirror.resource())
        self.cookie = ""  # the last session cookie set
        self.origin = "http://mirror.test"

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, bytes]:
        headers = kwargs.pop("headers", {})
        if method == "POST":
            headers.setdefault("Origin", [self.origin])

        async def go() -> tuple[Any, bytes]:
            response = await self.client.request(method, BASE + path, headers=headers, **kwargs)
            return response, await response.content()

        box: list[Any] = []
        ensureDeferred(go()).addBoth(box.append)
        for _ in range(1000):
            if box:
                break
            self.client.flush()
            self.h.upstream.flush()
            self.h.clock.advance(0)
        assert box and not isinstance(box[0], Failure), box
        response, body = box[0]
        for value in response.headers.getRawHeaders("set-cookie") or []:
            self.cookie = value.split(";")[0].split("=", 1)[1]
        return response, body

    def csrf(self) -> str:
        page = self.request("GET", "/mirror/ui")[1].decode()
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert found, page
        return found.group(1)

    def act(self, action: str, model: str, token: str | None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": ["application/json"]}
        if token is not None:
            headers["X-CSRF-Token"] = [token]
        response, body = self.request(
            "POST", f"/mirror/ui/models/{action}", headers=headers, data=json.dumps({"model": model}).encode()
        )
        return response.code, json.loads(body)


def signed_in(h: Harness) -> Browser:
    browser = Browser(h)
    response, _ = browser.request(
        "POST",
        "/mirror/ui/login",
        data=f"key={KEY}".encode(),
        headers={"Content-Type": ["application/x-www-form-urlencoded"]},
        allow_redirects=False,
    )
    assert response.code == 303 and browser.cookie
    return browser


def test_without_a_session_the_page_only_asks_for_the_key_and_shows_nothing_of_the_cache(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"security.api_key": KEY})
    bearer = {"Authorization": [f"Bearer {KEY}"]}
    assert h.request("POST", "/api/pull", data=PULL, headers=bearer)[0].code == 200
    stranger = Browser(h)
    response, body = stranger.request("GET", "/mirror/ui")
    page = body.decode()
    assert response.code == 200 and 'name="key"' in page and 'type="password"' in page
    for secret in ("tiny", "registry.example", str(tmp_path), "csrf-token"):
        assert secret not in page
    assert not stranger.cookie  # no session without a key
    for path in ("/mirror/ui/state", "/mirror/ui/events"):
        response, body = stranger.request("GET", path)
        assert response.code == 401 and b"tiny" not in body
    assert stranger.act("delete", "tiny", "forged")[0] == 401
    response, body = stranger.request(
        "POST",
        "/mirror/ui/login",
        data=b"key=wrong",
        headers={"Content-Type": ["application/x-www-form-urlencoded"]},
    )
    assert response.code == 401 and b"not one of this mirror" in body and not stranger.cookie
    assert h.request("GET", "/mirror/stats")[0].code == 401  # the rest of /mirror still wants the Bearer key


def test_signed_in_the_operator_sees_models_and_acts_only_with_the_csrf_token_from_this_site(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"security.api_key": KEY})
    bearer = {"Authorization": [f"Bearer {KEY}"]}
    assert h.request("POST", "/api/pull", data=PULL, headers=bearer)[0].code == 200
    browser = signed_in(h)
    response, body = browser.request("GET", "/mirror/ui")
    assert response.code == 200 and b'id="models"' in body
    assert "frame-ancestors 'none'" in response.headers.getRawHeaders("content-security-policy")[0]
    state = json.loads(browser.request("GET", "/mirror/ui/state")[1])
    row = {m["name"]: m for m in state["models"]}["tiny:latest"]
    assert row["size"] > 200_000 and row["pinned"] is False and row["private"] is False
    assert state["upstreams"] == [{"host": "registry.ollama.ai", "url": "http://registry.example"}]
    assert state["cache"]["used"] >= 200_000 and state["cache"]["cap"] == 100 * 10**9

    token = browser.csrf()
    assert browser.act("pin", row["id"], None)[0] == 403  # no token
    assert browser.act("pin", row["id"], token + "x")[0] == 403
    browser.origin = "http://evil.example"
    assert browser.act("pin", row["id"], token)[0] == 403  # the right token, sent by another site
    browser.origin = "http://mirror.test"
    assert browser.act("pin", row["id"], token) == (200, {"pinned": "tiny:latest"})
    assert h.mirror.pins.names() == {row["id"]}
    state = json.loads(browser.request("GET", "/mirror/ui/state")[1])
    assert state["models"][0]["pinned"] is True
    code, answer = browser.act("delete", "tiny", token)
    assert (code, answer) == (200, {"deleted": "tiny:latest"})
    tags = json.loads(h.request("GET", "/api/tags", headers=bearer)[1])
    assert tags == {"models": []}
    assert h.mirror.pins.names() == frozenset()  # deleted on purpose: unpinned too
    assert browser.act("delete", "tiny", token)[0] == 404
    assert browser.act("explode", "tiny", token)[0] == 404
    assert browser.act("pin", "not a name!", token)[0] == 400
    # a script with the Bearer key needs no cookie nor token (browsers never send that header by themselves)
    script = Browser(h)
    assert script.request("GET", "/mirror/ui/state", headers=bearer)[0].code == 200
    assert script.request("GET", "/mirror/ui/state", headers={"Authorization": ["Bearer no"]})[0].code == 401
    response, _ = browser.request(
        "POST", "/mirror/ui/logout", headers={"X-CSRF-Token": [token]}, allow_redirects=False
    )
    assert response.code == 303 and browser.cookie == ""
    assert browser.request("GET", "/mirror/ui/state")[0].code == 401


def test_a_prefetch_from_the_page_caches_the_model_and_a_blocked_one_is_refused(
    tmp_path: Path, registry: FakeRegistry
) -> None:
    h = Harness(tmp_path, registry, **{"security.blocked_models": "other"})
    browser = Browser(h)
    token = browser.csrf()  # (no API key: the page opens a session by itself)
    assert browser.cookie
    assert browser.act("pull", "tiny", token) == (202, {"pulling": "tiny:latest"})
    for _ in range(50):
        h.clock.advance(0.1)
        h.upstream.flush()
    state = json.loads(browser.request("GET", "/mirror/ui/state")[1])
    assert [m["name"] for m in state["models"]] == ["tiny:latest"]
    code, answer = browser.act("pull", "other", token)
    assert code == 403 and "blocked_models" in answer["error"]
    code, _ = browser.act("refresh", "tiny", token)
    assert code == 202


def test_the_page_is_off_when_disabled(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry, **{"features.enable_web_ui": "false"})
    response, body = h.request("GET", "/mirror/ui")
    assert response.code == 404 and "features.enable_web_ui" in json.loads(body)["error"]


def test_static_files_carry_their_hash_and_may_be_kept_a_year(tmp_path: Path, registry: FakeRegistry) -> None:
    h = Harness(tmp_path, registry)
    page = Browser(h).request("GET", "/mirror/ui")[1].decode()
    urls = re.findall(r'(?:href|src)="(/mirror/ui/static/[^"]+)"', page)
    assert {u.rsplit(".", 1)[-1] for u in urls} == {"css", "js", "svg"}
    assert not re.search(r'(?:href|src)="(?:https?:)?//', page)  # nothing from anywhere else
    for url in urls:
        response, body = h.request("GET", url)
        assert response.code == 200 and body
        assert response.headers.getRawHeaders("cache-control") == ["public, max-age=31536000, immutable"]
        etag = response.headers.getRawHeaders("etag")[0]
        again, _ = h.request("GET", url, headers={"If-None-Match": [etag]})
        assert again.code == 304
    stale = re.sub(r"\.[0-9a-f]{12}\.", ".000000000000.", urls[0])
    assert h.request("GET", stale)[0].code == 404


# --- the live stream -------------------------------------------------------------------------------


class FakeFill:
    digest = "sha256:" + "ab" * 32
    hexdigest = "ab" * 32
    size = 1000
    repository = "library/tiny"
    resumed_bytes = 0
    allocated_bytes = 1000
    following = False
    followed = False
    origin = "upstream"
    stopping = False

    def __init__(self, clock: Clock) -> None:
        self.started_at: float | None = clock.seconds()
        self.received_bytes = 0
        self.ended = False

    def completed_bytes(self) -> int:
        return self.received_bytes


def events_in(request: DummyRequest) -> list[tuple[str, Any]]:
    text = b"".join(request.written).decode()
    found = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":")
        if "event" in lines:
            found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_the_stream_sends_progress_while_a_fill_runs_heartbeats_when_idle_and_stops_when_the_client_goes() -> (
    None
):
    clock = Clock()
    fills: list[FakeFill] = []
    feed = FillFeed(clock, lambda: fills, lambda hexdigest: 3)
    request = DummyRequest([b""])
    assert EventStream(feed, clock).render_GET(request) == NOT_DONE_YET
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert events_in(request) == [("fills", {"fills": [], "errors": []})]

    fill = FakeFill(clock)
    fills.append(fill)
    feed.fill_started(fill)  # sent at once, not at the next tick
    assert events_in(request)[-1][1]["fills"][0]["completed"] == 0
    seen = []
    for _ in range(3):
        fill.received_bytes += 250
        clock.advance(1)
        seen.append(events_in(request)[-1][1]["fills"][0])
    assert [s["completed"] for s in seen] == [250, 500, 750]
    assert seen[-1]["clients"] == 3 and seen[-1]["rate_bytes_per_second"] == 250

    fill.ended = True
    feed.fill_ended(fill, "upstream answered 502")
    kinds = [name for name, _ in events_in(request)]
    assert kinds[-2:] == ["fills", "changed"]
    last_fills = [data for name, data in events_in(request) if name == "fills"][-1]
    assert last_fills["fills"] == [] and "502" in last_fills["errors"][0]["message"]

    written = len(request.written)
    clock.advance(14)
    assert len(request.written) == written  # nothing new to say yet
    clock.advance(1)
    assert request.written[-1] == b": keep-alive\n\n"

    request.processingFailed(Failure(ConnectionDone()))  # the browser closed the page
    written = len(request.written)
    fills.append(FakeFill(clock))
    feed.fill_started(fills[-1])
    clock.advance(60)
    assert len(request.written) == written
    assert not clock.getDelayedCalls()  # its timer is gone too


def test_the_history_turns_running_totals_into_what_happened_in_each_interval() -> None:
    clock = Clock()
    tally = TrafficTally()
    history = TrafficHistory(tally, clock, interval=10, length=3)
    timer = history.service()
    timer.startService()  # samples at once: the baseline
    tally.served["cache"] += 800
    tally.upstream_received += 200
    tally.served["fill"] += 200
    tally.hits["blob"] += 3
    tally.misses["blob"] += 1
    clock.advance(10)
    clock.advance(10)
    points = history.document()
    assert [(p["served"], p["upstream"], p["hit_ratio"]) for p in points] == [(1000, 200, 0.75), (0, 0, None)]
    tally.served["cache"] += 50
    clock.advance(4)
    assert history.document(live=True)[-1]["served"] == 50  # the interval running now, so far
    for _ in range(5):
        clock.advance(10)
    assert len(history.document()) == 3  # a ring: the oldest go
    timer.stopService()
