"""Test vectors: a real client's exchanges with the mirror, written so that CI can replay them.

A vector file (``tests/vectors/<scenario>.json``) holds what :class:`tests.support.recorder.RecordingProxy`
saw while the real ``ollama`` binary ran one scenario, in a normalized form that is free of secrets and of
everything that differs from run to run or from machine to machine:

- digests and sizes of the scenario's models become ``{digest:tiny/model}``, ``{size:tiny/model}``,
  ``{last:tiny/model}`` (size - 1) and ``{short:tiny/model}`` (the 12 hex digits of a progress line), so the
  replay can rebuild the models with whatever bytes this machine's ``gguf`` writes;
- the address the client asked becomes ``{host}``; a token request's ``nonce`` and ``ts``, a signed blob
  URL's ``expires`` and ``signature``, times in JSON answers and the ``Date`` header are dropped or
  replaced by their names;
- ``Authorization`` keeps only its form: ``{ollama-signature}`` (an Ollama key's signed token request)
  or ``Bearer {token}``; tokens in answers become ``{token}``;
- a push's upload sessions become ``{upload:1}``, ``{upload:2}``… in the order the mirror opened them; the
  bodies a push sends (blob parts, the manifest) are kept verbatim, base64, since their digests are the
  pushed model's own and the replay must send the very same bytes.

The replay (``tests/integration/test_vectors.py``) sends every recorded request again, through a
recorder of its own, normalizes what it sees the same way and compares the two, field by field.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from tests.support.recorder import Exchange

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"

REQUEST_HEADERS = ("accept", "content-type", "range", "content-range", "authorization", "user-agent")
RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-range",
    "location",
    "docker-content-digest",
    "docker-distribution-api-version",
    "accept-ranges",
    "www-authenticate",
    "retry-after",
    "docker-upload-uuid",
    "range",
)
_UPLOAD = re.compile(r"/blobs/uploads/([0-9a-f]{32})(?![0-9a-f])")
_VOLATILE_QUERY = {"nonce": "{nonce}", "ts": "{ts}", "expires": "{expires}", "signature": "{signature}"}
_SIGNATURE = re.compile(r"^[A-Za-z0-9+/=]{40,}:[A-Za-z0-9+/=]{40,}$")
_REPLACED = {  # JSON keys whose values differ from run to run, or are secret
    "modified_at": "{time}",
    "created_at": "{time}",
    "expires_at": "{time}",
    "token": "{token}",
    "access_token": "{token}",
    "version": "{version}",
}


@dataclass
class Bindings:
    """What the placeholders stand for in one run: the models' digests and sizes, the address asked."""

    host: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # hex -> role ("tiny/model")
    sizes: dict[str, int] = field(default_factory=dict)  # role -> size
    uploads: dict[str, str] = field(default_factory=dict)  # upload session id -> "upload:N"

    def add_model(self, prefix: str, model: Any) -> None:
        """Every blob of a :class:`tests.support.models.PushedModel`, and its manifest, as ``prefix/role``."""
        roles = {"application/vnd.ollama.image." + r: r for r in ("model", "template", "license", "params")}
        for blob in model.layers:
            self._add(f"{prefix}/{roles.get(blob.media_type, blob.media_type.rsplit('.', 1)[-1])}", blob)
        self._add(f"{prefix}/config", model.config)
        self.digests[model.manifest_hex] = f"{prefix}/manifest"
        self.sizes[f"{prefix}/manifest"] = len(model.manifest)
        self.sizes[f"{prefix}/total"] = model.total_size  # what /api/tags reports as the model's size

    def _add(self, role: str, blob: Any) -> None:
        self.digests.setdefault(blob.hex, role)  # shared blobs keep the first model's name
        self.sizes[role] = blob.size

    def note_uploads(self, headers: Mapping[str, str]) -> None:
        """Name the upload session an answer opened (its ``Location``), in the order they appear."""
        found = _UPLOAD.search(headers.get("location", ""))
        if found:
            self.uploads.setdefault(found.group(1), f"upload:{len(self.uploads) + 1}")

    def role_of_size(self, value: str, roles: Iterable[str]) -> str | None:
        for role in roles:
            if str(self.sizes.get(role)) == value:
                return role
        return None

    def text(self, value: str) -> str:
        """Digests (full, ``sha256:``-prefixed or hyphenated, and their 12-digit short form) and the host."""
        for hexdigest, role in self.digests.items():
            value = value.replace(hexdigest, f"{{digest:{role}}}")
            value = value.replace(hexdigest[:12], f"{{short:{role}}}")
        for upload_id, name in self.uploads.items():
            value = value.replace(upload_id, f"{{{name}}}")
        if self.host:
            value = value.replace(self.host, "{host}").replace(quote(self.host, safe=""), "{host}")
        return value


def _target(target: str, bindings: Bindings) -> str:
    """A request target or a ``Location``: an absolute one keeps its scheme (the host becomes ``{host}``)."""
    parts = urlsplit(target)
    query = [(k, _VOLATILE_QUERY.get(k, v)) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    rebuilt = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, safe="{}:"), ""))
    return bindings.text(rebuilt)


def _blob_role(target: str, bindings: Bindings) -> str | None:
    found = re.search(r"/blobs/sha256:([0-9a-f]{64})", target)
    return bindings.digests.get(found.group(1)) if found else None


def _authorization(value: str) -> str:
    if value.lower().startswith("bearer "):
        return "Bearer {token}"
    if _SIGNATURE.match(value.strip()):
        return "{ollama-signature}"
    return "{credential}"


def _sized(value: str, roles: list[str], bindings: Bindings, last: bool = False) -> str:
    for role in roles:
        size = bindings.sizes.get(role)
        if size is not None and value == str(size - 1 if last else size):
            return f"{{{'last' if last else 'size'}:{role}}}"
    return value


def _range(value: str, roles: list[str], bindings: Bindings) -> str:
    found = re.fullmatch(r"(?i)(bytes[= ])(\d+)-(\d*)(?:/(\d+))?", value.strip())
    if not found:
        return value
    unit, first, last, total = found.groups()
    text = f"{unit}{first}-{_sized(last, roles, bindings, last=True) if last else ''}"
    if total is not None:
        text += "/" + _sized(total, roles, bindings)
    return text


def _json(value: Any, bindings: Bindings) -> Any:
    if isinstance(value, dict):
        return {
            k: _REPLACED.get(k) or (_modelfile(v) if k == "modelfile" else _json(v, bindings))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_json(v, bindings) for v in value]
    if isinstance(value, str):
        return bindings.text(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 1024:
        role = bindings.role_of_size(str(value), bindings.sizes)
        return f"{{size:{role}}}" if role else value
    return value


def _modelfile(text: Any) -> Any:
    """A Modelfile names its blobs by their path on the server: keep the blob's name, not the path."""
    return re.sub(r"(?m)^FROM \S*/blobs/", "FROM {blobs}/", text) if isinstance(text, str) else text


def _body(exchange: Exchange, bindings: Bindings) -> dict[str, Any]:
    """What the client read: its size and, for JSON, the document (for NDJSON, its distinct statuses
    in order and its last line, since progress lines come at the speed of the transfer)."""
    content_type = exchange.response_headers.get("content-type", "")
    roles = [r for r in [_blob_role(exchange.target, bindings)] if r] + list(bindings.sizes)
    out: dict[str, Any] = {"complete": exchange.complete}
    streamed = content_type.startswith("application/x-ndjson")  # its length depends on timing
    if exchange.complete and exchange.method != "HEAD" and not streamed:
        out["bytes"] = _sized(str(exchange.body_bytes), roles, bindings)
    text = exchange.response_body.decode("utf-8", "replace")
    if streamed and exchange.complete:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        statuses: list[str] = []
        for line in lines:
            status = line.get("status")
            if status and (not statuses or statuses[-1] != bindings.text(status)):
                statuses.append(bindings.text(status))
        out["statuses"] = statuses
        if lines:
            last = {k: v for k, v in lines[-1].items() if k not in ("total", "completed")}
            if exchange.target.startswith(("/api/generate", "/api/chat")):
                last = {k: last[k] for k in ("done", "error") if k in last}  # the rest is the model's
            out["last"] = _json(last, bindings)
    elif content_type.startswith("application/json") and exchange.complete and text.strip():
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if document is not None and not exchange.target.startswith(("/api/generate", "/api/chat")):
            out["json"] = _json(document, bindings)
            out.pop("bytes", None)  # the document is compared, not its length (paths, times)
    return out


def normalize(exchange: Exchange, bindings: Bindings) -> dict[str, Any]:
    """One exchange as a vector entry."""
    roles = [r for r in [_blob_role(exchange.target, bindings)] if r] + list(bindings.sizes)
    bindings.note_uploads(exchange.response_headers)
    request: dict[str, Any] = {"method": exchange.method, "target": _target(exchange.target, bindings)}
    headers: dict[str, str] = {}
    for name in REQUEST_HEADERS:
        value = exchange.request_headers.get(name)
        if value is None:
            continue
        if name == "authorization":
            value = _authorization(value)
        elif name == "range":
            value = _range(value, roles, bindings)
        headers[name] = bindings.text(value)
    request["headers"] = headers
    if exchange.request_headers.get("content-type", "").startswith("application/json"):
        body = exchange.request_json()
        if body is not None:
            request["json"] = _json(body, bindings)
    elif exchange.request_bytes:
        if exchange.request_bytes > len(exchange.request_body):
            raise ValueError(f"{exchange.method} {exchange.target}: a body too large for a vector")
        request["body"] = base64.b64encode(exchange.request_body).decode("ascii")
    response: dict[str, Any] = {"status": exchange.status}
    answer: dict[str, str] = {}
    for name in RESPONSE_HEADERS:
        value = exchange.response_headers.get(name)
        if value is None:
            continue
        if name == "content-length":
            value = _sized(value, roles, bindings)
        elif name == "content-range":
            value = _range(value, roles, bindings)
        elif name == "location":
            value = _target(value, bindings)
        answer[name] = bindings.text(value)
    body = _body(exchange, bindings)
    if "json" in body and "content-length" in answer:
        answer["content-length"] = "{json}"  # the document is compared instead
    response["headers"] = answer
    response["body"] = body
    return {"request": request, "response": response}


@dataclass
class Vector:
    """One scenario: how to set it up, and its phases (one client command each), in order.

    A phase is ``{"phase": title, "key": None | "authorized" | "unknown", "exchanges": [...]}``: ``key``
    says which Ollama key signed its token requests (the replay signs with a key of its own that the
    mirror authorizes, or with one it does not).
    """

    scenario: str
    description: str
    client: dict[str, str]
    setup: dict[str, Any]
    phases: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Vector:
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in ("scenario", "description", "client", "setup", "phases")})

    def dump(self, directory: Path = VECTORS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.scenario}.json"
        data = {
            "scenario": self.scenario,
            "description": self.description,
            "client": self.client,
            "setup": self.setup,
            "phases": self.phases,
        }
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path


def expand(text: str, values: Mapping[str, str]) -> str:
    """The placeholders of *text* replaced from *values* (``{"digest:tiny/model": "…"}``); unknown ones stay."""
    return re.sub(r"\{([a-z-]+(?::[^{}]+)?)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def placeholder_values(bindings: Bindings) -> dict[str, str]:
    """The inverse of :meth:`Bindings.text` and the size rules, for building requests from a vector."""
    values = {"host": bindings.host}
    for hexdigest, role in bindings.digests.items():
        values[f"digest:{role}"] = hexdigest
        values[f"short:{role}"] = hexdigest[:12]
    for role, size in bindings.sizes.items():
        values[f"size:{role}"] = str(size)
        values[f"last:{role}"] = str(size - 1)
    return values
