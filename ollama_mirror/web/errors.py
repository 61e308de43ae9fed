"""JSON error bodies in the two dialects clients parse: Ollama's and the registry's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

# Headers a route may have set for the answer it meant to give; an error body must not carry them.
_ANSWER_HEADERS = (b"content-range", b"location", b"docker-content-digest", b"etag", b"x-mirror-cache")


def json_body(request: IRequest, code: int, document: Any) -> bytes:
    """Set the status, content type and length and return *document* as compact JSON."""
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(code)
    if code >= 400:
        for name in _ANSWER_HEADERS:
            request.responseHeaders.removeHeader(name)  # type: ignore[attr-defined]
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


def ollama_error(request: IRequest, code: int, message: str) -> bytes:
    """``{"error": "..."}``: what the Ollama CLI and Python client show the user."""
    return json_body(request, code, {"error": message})


def registry_error(request: IRequest, status: int, code: str, message: str, detail: Any = None) -> bytes:
    """``{"errors":[{"code":..., "message":...}]}``, the distribution spec's error body."""
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return json_body(request, status, {"errors": [error]})


def routing_answer(
    request: IRequest, failure: Failure, answer: Callable[[IRequest, int, str], bytes]
) -> bytes:
    """A routing answer werkzeug raises (the redirect of ``a//b`` to ``a/b``, say) as a JSON body."""
    e: HTTPException = failure.value  # type: ignore[assignment]
    location = e.get_response().headers.get("Location")
    if location:
        request.setHeader(b"location", location.encode("latin-1"))
    body = answer(request, e.code or 400, e.description or e.name)
    if location:
        request.setHeader(b"location", location.encode("latin-1"))  # (error bodies drop it by default)
    return body


def add_ollama_error_handlers(app: Klein, what: str) -> None:
    """Register the catch-all handlers of an Ollama-dialect Klein app: unknown route 404, wrong method
    405, and any unexpected error a logged 500 without a traceback.  Call it at the end of the class
    body, so that the app's own, more specific handlers are tried first."""
    log = Logger(namespace=f"ollama_mirror.{what}")

    @app.handle_errors(NotFound)
    def _not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        return ollama_error(request, 404, "not found")

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        return ollama_error(request, 405, "method not allowed")

    @app.handle_errors(HTTPException)
    def _routing(self: Any, request: IRequest, failure: Failure) -> bytes:
        return routing_answer(request, failure, ollama_error)

    @app.handle_errors(Exception)
    def _internal(self: Any, request: IRequest, failure: Failure) -> bytes:
        log.failure(
            "{what} route failed on {method} {path}",
            failure,
            what=what,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1")[:300],
        )
        return ollama_error(request, 500, "internal error")
