"""The routes of ``/mirror/ui`` (mounted there by the ``/mirror`` app, so paths here start after it).

- ``GET /``: the page; with API keys and no session, only the sign-in form (no model name, path or URL);
- ``POST /login`` (a form with the key), ``POST /logout``;
- ``GET /state``: the page's JSON document; ``GET /events``: the live downloads (Server-Sent Events);
- ``POST /models/delete|pin|unpin|pull|refresh``: the actions, JSON ``{"model": NAME}``, each with the
  session's CSRF token in ``X-CSRF-Token``;
- ``GET /static/<name>.<hash>.<ext>``: the CSS and JavaScript.

A request with a right ``Authorization: Bearer <key>`` (a script, not a browser) is signed in and needs no
CSRF token: browsers never add that header by themselves.  The access guard in front lets ``/mirror/ui``
through without a key for this reason; everything here checks the session itself.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from string import Template
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request

from ...names import InvalidName, ModelName
from ..errors import add_ollama_error_handlers, json_body, ollama_error
from .assets import Assets, read_template
from .live import EventStream
from .session import COOKIE_NAME, Session, Sessions
from .state import PageState

_FORM_LIMIT = 4096
_SECURITY_HEADERS = (
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # (no-referrer would make browsers send "Origin: null")
    (b"x-frame-options", b"DENY"),
)


class Gate(Protocol):
    """The access guard's verdicts the page needs (:class:`ollama_mirror.security.access.AccessControl`)."""

    def trusted(self, request: IRequest) -> bool:
        """The request carries a right ``Authorization: Bearer`` key (or no key is configured)."""

    def failed_sign_in(self, request: IRequest) -> float | None:
        """Count a wrong key against the client's rate limit: seconds to wait when over it, else ``None``."""


class WebUi:
    """The page's routes (see the module docstring)."""

    app = Klein()

    def __init__(self, state: PageState, sessions: Sessions, gate: Gate, clock: IReactorTime) -> None:
        self._state = state
        self._sessions = sessions
        self._gate = gate
        self._clock = clock
        self.assets = Assets()
        self._page = Template(read_template("page.html"))
        self._signin = Template(read_template("signin.html"))

    def resource(self) -> IResource:
        return self.app.resource()  # type: ignore[no-any-return]

    # --- sessions ------------------------------------------------------------------------------

    def _session(self, request: IRequest) -> Session | None:
        return self._sessions.check(request.getCookie(COOKIE_NAME))  # type: ignore[attr-defined]

    def _bearer(self, request: IRequest) -> bool:
        return request.getHeader(b"authorization") is not None and self._gate.trusted(request)

    def _signed_in(self, request: IRequest) -> bool:
        return self._bearer(request) or self._session(request) is not None

    def _may_act(self, request: IRequest) -> str | None:
        """Why a POST may not act (no session, a foreign origin, no or a wrong CSRF token), or ``None``."""
        if self._bearer(request):
            return None
        session = self._session(request)
        if session is None:
            return "sign in first"
        if not _same_origin(request):
            return "the request came from another site"
        if not self._sessions.check_csrf(session, request.getHeader(b"x-csrf-token")):
            return "missing or wrong CSRF token: reload the page"
        return None

    # --- the page ------------------------------------------------------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def page(self, request: Request) -> bytes:
        session = self._session(request)
        if session is None and not self._sessions.needs_key:
            value = self._sessions.open_session()  # (the actions still need it and its CSRF token)
            request.setHeader(b"set-cookie", self._sessions.cookie(value, request.isSecure()))
            session = self._sessions.check(value)
        if session is None:
            return self._sign_in_page(request, 200, "")
        body = self._page.substitute(
            css=self.assets.url("app.css"),
            js=self.assets.url("app.js"),
            icon=self.assets.url("icon.svg"),
            csrf=self._sessions.csrf_token(session),
            signout="" if session.key_id == "open" else _SIGN_OUT,
        )
        return _html(request, 200, body)

    def _sign_in_page(self, request: Request, status: int, message: str) -> bytes:
        body = self._signin.substitute(
            css=self.assets.url("app.css"),
            icon=self.assets.url("icon.svg"),
            message=f'<p class="error" role="alert">{html.escape(message)}</p>' if message else "",
        )
        return _html(request, status, body)

    @app.route("/login", methods=["POST"])
    def login(self, request: Request) -> bytes:
        if not self._sessions.needs_key:
            return _see_other(request, b"/mirror/ui")
        if not _same_origin(request):
            return self._sign_in_page(request, 403, "The sign-in came from another site.")
        form = _form(request)
        cookie = self._sessions.sign_in(form.get("key", ""))
        if cookie is None:
            wait = self._gate.failed_sign_in(request)
            if wait is not None:
                request.setHeader(b"retry-after", str(max(1, int(wait + 0.999))).encode())
                return self._sign_in_page(request, 429, "Too many wrong keys: wait a little and try again.")
            return self._sign_in_page(request, 401, "That key is not one of this mirror's API keys.")
        request.setHeader(b"set-cookie", self._sessions.cookie(cookie, request.isSecure()))
        return _see_other(request, b"/mirror/ui")

    @app.route("/logout", methods=["POST"])
    def logout(self, request: Request) -> bytes:
        refused = self._may_act(request)
        if refused is not None:
            return ollama_error(request, 403, refused)
        request.setHeader(b"set-cookie", self._sessions.cleared_cookie(request.isSecure()))
        return _see_other(request, b"/mirror/ui")

    @app.route("/static/<string:name>", methods=["GET", "HEAD"])
    def static(self, request: Request, name: str) -> bytes:
        return self.assets.render(request, name)

    # --- what the page reads -------------------------------------------------------------------

    @app.route("/state", methods=["GET"])
    async def state(self, request: Request) -> bytes:
        if not self._signed_in(request):
            return ollama_error(request, 401, "sign in first")
        request.setHeader(b"cache-control", b"no-store")
        return json_body(request, 200, await self._state.document())

    @app.route("/events", methods=["GET"])
    def events(self, request: Request) -> IResource | bytes:
        if not self._signed_in(request):
            return ollama_error(request, 401, "sign in first")
        return EventStream(self._state.parts.feed, self._clock)

    # --- actions -------------------------------------------------------------------------------

    @app.route("/models/<string:action>", methods=["POST"])
    async def act(self, request: Request, action: str) -> bytes:
        refused = self._may_act(request)
        if refused is not None:
            return ollama_error(request, 401 if refused == "sign in first" else 403, refused)
        if action not in _ACTIONS:
            return ollama_error(request, 404, f"no such action: {action}")
        name = _model_of(request)
        if name is None:
            return ollama_error(request, 400, 'the body must be JSON {"model": "name:tag"}')
        answer: bytes = await _ACTIONS[action](self, request, name)
        return answer

    async def _delete(self, request: Request, name: ModelName) -> bytes:
        if not await self._state.delete(name):
            return ollama_error(request, 404, f"model '{name.display()}' not found")
        return json_body(request, 200, {"deleted": name.display()})

    async def _pin(self, request: Request, name: ModelName) -> bytes:
        await self._state.pin(name, True)
        return json_body(request, 200, {"pinned": name.display()})

    async def _unpin(self, request: Request, name: ModelName) -> bytes:
        await self._state.pin(name, False)
        return json_body(request, 200, {"unpinned": name.display()})

    async def _pull(self, request: Request, name: ModelName, refresh: bool = False) -> bytes:
        refused = self._state.pull(name, refresh)
        if refused is not None:
            return ollama_error(request, 403, refused)
        return json_body(request, 202, {"pulling": name.display()})

    async def _refresh(self, request: Request, name: ModelName) -> bytes:
        return await self._pull(request, name, refresh=True)

    add_ollama_error_handlers(app, "ui")


_ACTIONS: dict[str, Callable[[WebUi, Request, ModelName], Awaitable[bytes]]] = {
    "delete": WebUi._delete,
    "pin": WebUi._pin,
    "unpin": WebUi._unpin,
    "pull": WebUi._pull,
    "refresh": WebUi._refresh,
}

_SIGN_OUT = (
    '<form method="post" action="/mirror/ui/logout" id="signout-form">'
    '<button type="submit" id="signout">Sign out</button></form>'
)


def _html(request: Request, status: int, body: str) -> bytes:
    data = body.encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    for name, value in _SECURITY_HEADERS:
        request.setHeader(name, value)
    request.setHeader(b"content-length", str(len(data)).encode())
    return data if request.method != b"HEAD" else b""


def _see_other(request: Request, location: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", location)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"0")
    return b""


def _same_origin(request: IRequest) -> bool:
    """No ``Origin`` (an older browser or a script), or one naming this host: else another site sent it."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host: bytes = request.getHeader(b"host") or b""
    return bool(urlsplit(origin.decode("latin-1")).netloc.lower() == host.decode("latin-1").lower())


def _form(request: Request) -> dict[str, str]:
    content = request.content
    raw = content.read(_FORM_LIMIT) if content is not None else b""
    fields = parse_qs(raw.decode("utf-8", "replace"), max_num_fields=10)
    return {key: values[0] for key, values in fields.items() if values}


def _model_of(request: Request) -> ModelName | None:
    content = request.content
    raw = content.read(_FORM_LIMIT) if content is not None else b""
    try:
        document = json.loads(raw or b"{}")
        return ModelName.parse(str(document["model"]).strip())
    except (ValueError, KeyError, TypeError, InvalidName):
        return None
