"""Replaying a recorded vector (:mod:`tests.support.vectors`) against a running mirror.

Each recorded request is sent again, in order, through a :class:`RecordingProxy` of the replay's own in
front of the mirror, with its placeholders filled from this run (the models' digests and sizes, the
address asked). What cannot be replayed byte for byte is rebuilt as the real client builds it: a token
request is made from the challenge the mirror just sent and signed with one of the replay's Ollama keys,
``Bearer`` carries the token the mirror just issued, and a signed blob URL is the one the mirror just
handed out, and an upload session's ``{upload:N}`` the session the mirror just opened. A push's bodies are
sent as recorded. A request the client hung up on (a blob's discovery GET) is hung up on after the headers.
The replay's own exchanges are then normalized like the recording, for a field-by-field comparison.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from tests.support.ollamakey import OllamaKey, parse_challenge, token_url
from tests.support.recorder import RecordingProxy
from tests.support.vectors import Bindings, expand, normalize, placeholder_values

TIMEOUT = 120.0


class Replayer:
    """Sends a vector's phases to ``recorder`` (in front of the mirror) and returns what it saw."""

    def __init__(self, recorder: RecordingProxy, bindings: Bindings, keys: Mapping[str, OllamaKey]) -> None:
        self.recorder = recorder
        self.bindings = bindings
        self.values = placeholder_values(bindings)
        self.keys = keys  # "authorized" / "unknown" -> the key that signs that phase's token requests
        self._challenge: dict[str, str] | None = None
        self._token = ""
        self._locations: dict[str, str] = {}  # blob path -> the signed Location the mirror handed out

    def phase(self, recorded: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Replay one phase; its exchanges, normalized."""
        key = self.keys.get(recorded.get("key") or "")
        for exchange in recorded["exchanges"]:
            self._send(exchange["request"], exchange["response"], key)
        return [normalize(e, self.bindings) for e in self.recorder.take()]

    def _send(self, request: Mapping[str, Any], response: Mapping[str, Any], key: OllamaKey | None) -> None:
        target = expand(request["target"], self.values)
        headers = {name: expand(value, self.values) for name, value in request["headers"].items()}
        if target.startswith("/v2/token") and self._challenge is not None:
            url = token_url(self._challenge)
            parts = urlsplit(url)
            target = f"{parts.path}?{parts.query}"
            if key is not None:
                headers["authorization"] = key.token_request_authorization(url)
        elif "{signature}" in target:
            target = self._locations.get(target.split("?", 1)[0], target)
        if headers.get("authorization") == "Bearer {token}":
            headers["authorization"] = f"Bearer {self._token}"
        body = None
        if "json" in request:
            body = json.dumps(_expand_json(request["json"], self.values)).encode()
        elif "body" in request:
            body = base64.b64decode(request["body"])
        connection = http.client.HTTPConnection("127.0.0.1", self.recorder.port, timeout=TIMEOUT)
        try:
            connection.request(request["method"], target, body=body, headers=headers)
            answer = connection.getresponse()
            challenge = answer.getheader("www-authenticate")
            if challenge:
                self._challenge = parse_challenge(challenge)
            location = answer.getheader("location")
            if location and "signature=" in location:
                self._locations[location.split("?", 1)[0]] = location
            self.bindings.note_uploads({"location": location or ""})
            self.values.update({name: upload_id for upload_id, name in self.bindings.uploads.items()})
            if not response["body"].get("complete", True):
                return  # the client hangs up here, as the real one did
            data = answer.read()
            if target.startswith("/v2/token") and answer.status == 200:
                self._token = json.loads(data)["token"]
        finally:
            connection.close()


def _expand_json(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_json(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_json(v, values) for v in value]
    if isinstance(value, str):
        return expand(value, values)
    return value


def differences(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]]) -> list[str]:
    """What differs between a recorded phase and its replay, one line each (empty: the same)."""
    if len(recorded) != len(replayed):
        return [f"{len(recorded)} exchanges recorded, {len(replayed)} replayed"]
    found = []
    for number, (want, got) in enumerate(zip(recorded, replayed, strict=True), 1):
        what = f"#{number} {want['request']['method']} {want['request']['target']}"
        if want["request"]["target"] != got["request"]["target"]:
            found.append(f"{what}: replayed as {got['request']['target']}")
        # whether a client that hangs up at once read some of the body is a matter of timing
        parts = (
            ("status", "headers", "body") if want["response"]["body"]["complete"] else ("status", "headers")
        )
        for part in parts:
            if want["response"][part] != got["response"][part]:
                found.append(f"{what}: {part} {want['response'][part]!r} != {got['response'][part]!r}")
    return found
