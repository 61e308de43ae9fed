"""Configuration: one schema, four layers.

The section dataclasses below *are* the schema: each field carries its default, its
``OLLAMA_MIRROR_*`` variable and its documentation, so the loader, the validation messages and
the README's reference table cannot drift apart.  Layers apply in order: built-in defaults,
the JSON file, the environment, then command-line overrides.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .names import InvalidName, ModelName, is_host

ENV_PREFIX = "OLLAMA_MIRROR_"


class ConfigError(Exception):
    """A setting that cannot be used; the message names the key, the value and where it came from."""


def setting(
    default: Any, env: str, doc: str, kind: str, minimum: float | None = 0, planned: bool = False
) -> Any:
    """Declare one configuration key (a dataclass field with its metadata).

    ``planned`` marks a key this version accepts but does not act on yet: setting it logs a
    warning at start-up, so that nobody believes a protection is on when it is not.
    """
    metadata = {"env": ENV_PREFIX + env, "doc": doc, "kind": kind, "min": minimum, "planned": planned}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerConfig:
    host: str = setting("0.0.0.0", "HOST", "Address to listen on.", "str")
    port: int = setting(11434, "PORT", "TCP port to listen on.", "port")
    workers: int = setting(
        1,
        "WORKERS",
        "Worker processes sharing the listening sockets (`tcp:` and `unix:` endpoints); each blob is "
        "still downloaded once.",
        "int",
        1,
    )
    listen: tuple[str, ...] = setting(
        (),
        "LISTEN",
        "Twisted endpoint strings to listen on (e.g. `tcp:11434`, `ssl:443:privateKey=k.pem`, "
        "`unix:/run/m.sock`); when set, `host` and `port` are not used.",
        "list",
    )
    metrics_listen: tuple[str, ...] = setting(
        (),
        "METRICS_LISTEN",
        "Twisted endpoint strings of a listener of its own that serves only `/metrics` (e.g. "
        "`tcp:9464:interface=127.0.0.1`); when set, the main listener does not serve `/metrics`.",
        "list",
    )
    tls_certificate: str = setting(
        "",
        "TLS_CERTIFICATE",
        "PEM certificate (leaf first; a chain may follow) for `ssl:` listeners in `server.listen` that "
        "name no `privateKey`; reloaded on SIGHUP.",
        "str",
    )
    tls_key: str = setting("", "TLS_KEY", "PEM private key of `server.tls_certificate`.", "str")
    tls_chain: str = setting(
        "",
        "TLS_CHAIN",
        "PEM intermediate certificates sent after `server.tls_certificate` (optional).",
        "str",
    )
    virtual_hosts: tuple[tuple[str, str], ...] = setting(
        (),
        "VIRTUAL_HOSTS",
        'JSON object mapping a request `Host` to a model host, e.g. `{"hf.mirror.example": "hf.co"}`: '
        "`/v2` requests for that name go to that upstream (the environment variable holds the JSON text).",
        "hostmap",
    )
    max_body_size: int = setting(
        64 * 2**20,
        "MAX_BODY_SIZE",
        "Largest request body accepted (413 beyond it); uploads forwarded to the backend count too.",
        "size",
        1024,
    )
    max_header_size: int = setting(
        16384, "MAX_HEADER_SIZE", "Largest request line plus headers accepted (431 beyond it).", "size", 1024
    )
    max_headers: int = setting(100, "MAX_HEADERS", "Most request headers accepted (431 beyond it).", "int", 1)
    idle_timeout: float = setting(
        75,
        "IDLE_TIMEOUT",
        "Seconds a connection may be silent between requests, or while sending one, before it is closed.",
        "float",
        0.001,
    )
    request_timeout: float = setting(
        60,
        "REQUEST_TIMEOUT",
        "Seconds a client has to send a whole request (line, headers and body) once it has started "
        "(408 beyond it: slow clients cannot hold connections).",
        "float",
        0.001,
    )


@dataclass(frozen=True)
class CacheConfig:
    directory: str = setting("./cache", "CACHE_DIR", "The cache: an Ollama models directory.", "str")
    retention_days: float = setting(
        30, "CACHE_RETENTION_DAYS", "Models unused this long are evicted.", "float"
    )
    max_size_gb: float = setting(
        100, "CACHE_MAX_SIZE_GB", "Cap on the cache size, in GB (10^9 bytes).", "float"
    )
    cleanup_interval: float = setting(
        3600, "CACHE_CLEANUP_INTERVAL", "Seconds between eviction sweeps.", "float", 1
    )
    min_free_gb: float = setting(
        1, "CACHE_MIN_FREE_GB", "Free disk space a new download must leave, in GB.", "float"
    )
    manifest_ttl: float = setting(
        300,
        "CACHE_MANIFEST_TTL",
        "Seconds a cached tag is served before it is revalidated upstream.",
        "float",
    )
    prefetch: tuple[str, ...] = setting(
        (),
        "CACHE_PREFETCH",
        "Models the daemon caches at start and keeps fresh (e.g. `llama3.2,qwen2.5:7b`); failures are "
        "logged and retried the next round.",
        "models",
    )
    prefetch_interval: float = setting(
        3600,
        "CACHE_PREFETCH_INTERVAL",
        "Seconds between prefetch rounds (each checks every tag upstream and fetches what changed); "
        "0: only at start.",
        "float",
    )


@dataclass(frozen=True)
class UpstreamHost:
    """One upstream registry and how to reach it (the default one comes from the ``upstream.*`` keys)."""

    host: str  # the model host it serves: `hf.co` in `hf.co/user/repo:tag`
    url: str
    username: str = ""
    password: str = ""
    token: str = ""
    ca_bundle: str = ""
    insecure: bool = False
    address: str = ""  # "host:port" to connect to instead of the URL's host
    timeout: float | None = None  # None: `upstream.timeout`


_UPSTREAM_HOST_FIELDS = {
    "url": "url",
    "username": "str",
    "password": "str",
    "token": "str",
    "ca_bundle": "str",
    "insecure": "bool",
    "address": "address",
    "timeout": "float",
}


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = setting(
        "https://registry.ollama.ai", "UPSTREAM_URL", "The registry models are pulled from.", "url"
    )
    host: str = setting(
        "registry.ollama.ai",
        "UPSTREAM_HOST",
        "The model host this upstream serves: names without a host (`llama3.2`) and the cache's "
        "`manifests/<host>/` directory use it, whatever the URL.",
        "host",
    )
    timeout: float = setting(
        300, "UPSTREAM_TIMEOUT", "Seconds to wait for an upstream's response headers.", "float", 0.001
    )
    max_concurrent_downloads: int = setting(
        3, "MAX_CONCURRENT_DOWNLOADS", "Blobs fetched from upstream at the same time.", "int", 1
    )
    retry_attempts: int = setting(3, "RETRY_ATTEMPTS", "Retries of a failed upstream request.", "int")
    retry_delay: float = setting(
        1, "RETRY_DELAY", "Seconds before the first retry; doubles on each further one.", "float"
    )
    connections_per_blob: int = setting(
        4, "UPSTREAM_CONNECTIONS_PER_BLOB", "Parallel ranged connections one blob download uses.", "int", 1
    )
    max_connections_per_blob: int = setting(
        16,
        "UPSTREAM_MAX_CONNECTIONS_PER_BLOB",
        "Connections one blob download may grow to while clients wait on that many different parts of "
        "it (an Ollama client pulls 16 parts in parallel); never fewer than `connections_per_blob`.",
        "int",
        1,
    )
    chunk_size: int = setting(
        16 * 2**20,
        "UPSTREAM_CHUNK_SIZE",
        "Size of one ranged upstream request (and of a resume unit).",
        "size",
        65536,
    )
    idle_timeout: float = setting(
        60,
        "UPSTREAM_IDLE_TIMEOUT",
        "Seconds a response body may send nothing before it is dropped.",
        "float",
        0.001,
    )
    username: str = setting("", "UPSTREAM_USERNAME", "User name for upstream Basic auth (optional).", "str")
    password: str = setting("", "UPSTREAM_PASSWORD", "Password for upstream Basic auth (optional).", "str")
    token: str = setting(
        "", "UPSTREAM_TOKEN", "Bearer token sent to the upstream on every request (optional).", "str"
    )
    ca_bundle: str = setting(
        "",
        "UPSTREAM_CA_BUNDLE",
        "PEM file of the CAs trusted for this upstream's TLS (instead of the system's); empty: system CAs.",
        "str",
    )
    insecure: bool = setting(
        False,
        "UPSTREAM_INSECURE",
        "Skip TLS verification of this upstream (logged as a warning at start); never in production.",
        "bool",
    )
    address: str = setting(
        "",
        "UPSTREAM_ADDRESS",
        "`host:port` to connect to instead of resolving the URL's host; the TLS name and `Host` stay "
        "the URL's (transparent mode, where that name resolves to the mirror itself).",
        "address",
    )
    hosts: tuple[UpstreamHost, ...] = setting(
        (),
        "UPSTREAM_HOSTS",
        "More upstreams: a JSON object mapping a model host to `{url, username, password, token, "
        "ca_bundle, insecure, address, timeout}` (only `url` is required), e.g. "
        '`{"hf.co": {"url": "https://hf.co"}}`; the environment variable holds the JSON text.',
        "upstreams",
    )


@dataclass(frozen=True)
class BackendConfig:
    url: str = setting(
        "http://127.0.0.1:11435",
        "BACKEND_URL",
        "The Ollama server that inference routes are forwarded to (start it with "
        "`OLLAMA_MODELS=<cache.directory>` so it runs the cached models).",
        "url",
    )
    timeout: float = setting(
        600, "BACKEND_TIMEOUT", "Seconds to wait for the backend's response headers.", "float", 0.001
    )


@dataclass(frozen=True)
class SecurityConfig:
    api_key: str = setting(
        "",
        "API_KEY",
        "Key required as `Authorization: Bearer <key>` on `/api`, `/v1` and `/mirror` routes (not "
        "`/mirror/health`); empty: none.",
        "str",
    )
    api_keys: tuple[str, ...] = setting(
        (), "API_KEYS", "More accepted keys, one per client or team (same rules as `api_key`).", "list"
    )
    protect_metrics: bool = setting(False, "PROTECT_METRICS", "Require an API key on `/metrics` too.", "bool")
    registry_access: str = setting(
        "open",
        "REGISTRY_ACCESS",
        "Who may use the `/v2` registry: `open` (anyone), `networks` (clients in `registry_networks`) "
        "or `keys` (Ollama servers whose key is in `registry_authorized_keys`, and clients in "
        "`registry_networks`).",
        "access",
    )
    registry_networks: tuple[str, ...] = setting(
        (),
        "REGISTRY_NETWORKS",
        "Client networks (CIDRs such as `10.0.0.0/8`, or addresses) allowed on `/v2` without a key.",
        "networks",
    )
    registry_authorized_keys: str = setting(
        "",
        "REGISTRY_AUTHORIZED_KEYS",
        "File of Ollama public keys (`ssh-ed25519 AAAA... comment` lines, as in a client's "
        "`~/.ollama/id_ed25519.pub`) allowed on `/v2` with `registry_access` = `keys`; re-read when it "
        "changes.",
        "str",
    )
    registry_token_lifetime: float = setting(
        300, "REGISTRY_TOKEN_LIFETIME", "Seconds a registry token issued at `/v2/token` is valid.", "float", 1
    )
    registry_url_lifetime: float = setting(
        3600,
        "REGISTRY_URL_LIFETIME",
        "Seconds a signed blob `Location` (what a puller's ranged GETs use) stays valid.",
        "float",
        1,
    )
    signing_secret: str = setting(
        "",
        "SIGNING_SECRET",
        "Secret for registry tokens and signed blob URLs; empty: a random one kept in the cache "
        "directory (shared by every process on that cache).",
        "str",
    )
    allowed_models: tuple[str, ...] = setting(
        (),
        "ALLOWED_MODELS",
        "Only these models may be pulled or shown (names or globs, with or without tag); empty: all.",
        "list",
    )
    blocked_models: tuple[str, ...] = setting(
        (),
        "BLOCKED_MODELS",
        "These models are never pulled or shown (names or globs, with or without tag).",
        "list",
    )
    rate_limit_requests: int = setting(
        100,
        "RATE_LIMIT_REQUESTS",
        "Requests per window and client address that send the mirror upstream (a tag not fresh in the "
        "cache, a blob no served manifest lists) or fail authentication; what the mirror holds or is "
        "already fetching is free. 0: no limit.",
        "int",
    )
    rate_limit_window: float = setting(
        60, "RATE_LIMIT_WINDOW", "The rate-limit window, in seconds.", "float", 1
    )
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "TRUSTED_PROXIES",
        "Reverse proxies (CIDRs or addresses) whose `X-Forwarded-For` names the real client.",
        "networks",
    )


@dataclass(frozen=True)
class LoggingConfig:
    level: str = setting("INFO", "LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR or CRITICAL.", "level")
    file: str = setting(
        "",
        "LOG_FILE",
        "Log file, rotated by size; empty: where twistd logs (standard output with `-n`, else "
        "twistd's `--logfile`).",
        "str",
    )
    max_file_size: int = setting(
        10_000_000, "LOG_MAX_FILE_SIZE", "Rotate the log file at this size.", "size", 1024
    )
    backup_count: int = setting(5, "LOG_BACKUP_COUNT", "Rotated log files kept.", "int")
    format: str = setting("text", "LOG_FORMAT", "`text` or `json` (one JSON object per line).", "format")


@dataclass(frozen=True)
class FeaturesConfig:
    enable_api_proxy: bool = setting(
        True, "ENABLE_API_PROXY", "Forward inference routes to the backend Ollama (`backend.url`).", "bool"
    )
    enable_metrics: bool = setting(True, "ENABLE_METRICS", "Serve Prometheus metrics at `/metrics`.", "bool")
    enable_web_ui: bool = setting(
        False, "ENABLE_WEB_UI", "Serve the admin web page (not built yet).", "bool", planned=True
    )


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)

    def listen_endpoints(self) -> list[str]:
        """The strports descriptions to listen on: ``server.listen``, or one built from host and port."""
        if self.server.listen:
            return list(self.server.listen)
        interface = self.server.host.replace(":", r"\:")
        return [f"tcp:{self.server.port}:interface={interface}"]

    def upstreams(self) -> list[UpstreamHost]:
        """Every upstream, the default (``upstream.*``) first."""
        u = self.upstream
        default = UpstreamHost(
            u.host, u.url, u.username, u.password, u.token, u.ca_bundle, u.insecure, u.address, u.timeout
        )
        return [default, *u.hosts]


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "cache": CacheConfig,
    "upstream": UpstreamConfig,
    "backend": BackendConfig,
    "security": SecurityConfig,
    "logging": LoggingConfig,
    "features": FeaturesConfig,
}


@dataclass(frozen=True)
class Key:
    """One documented key, as listed in the README's reference."""

    section: str
    name: str
    env: str
    kind: str
    default: Any
    doc: str
    minimum: float | None
    planned: bool

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


def keys() -> Iterator[Key]:
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            m = f.metadata
            yield Key(section, f.name, m["env"], m["kind"], f.default, m["doc"], m["min"], m["planned"])


_KEYS: dict[str, Key] = {k.dotted: k for k in keys()}
_BY_ENV: dict[str, Key] = {k.env: k for k in _KEYS.values()}

# --- value parsing -------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_size(text: str) -> int:
    """``10MB`` → 10_000_000, ``16MiB`` → 16_777_216, ``512`` → 512 (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("expected a size such as 512, 10MB or 16MiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    return int(float(number) * base**power)


def _parse_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network (CIDR)") from None
    return value


def _parse_structured(key: Key, value: Any, from_text: bool) -> Any:
    if key.kind == "networks":
        return _parse_networks(_parse(dataclasses.replace(key, kind="list"), value, from_text))
    return _parse_mapping(key.kind, value)


def _parse(key: Key, value: Any, from_text: bool) -> Any:
    """Turn a JSON value (typed) or an environment/CLI value (text) into the key's type."""
    kind = key.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if from_text and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("expected true or false")
    if kind in ("int", "port"):
        if from_text:
            value = value.strip()
            if not re.fullmatch(r"-?\d+", value):
                raise ValueError("expected a whole number")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected a whole number")
        if kind == "port" and not 0 <= value <= 65535:
            raise ValueError("expected a port number from 0 to 65535")
        return value
    if kind == "float":
        if from_text:
            try:
                value = float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        return float(value)
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_size(value)
        raise ValueError("expected a size such as 512, 10MB or 16MiB")
    if kind in ("upstreams", "hostmap", "networks"):
        return _parse_structured(key, value, from_text)
    if kind in ("list", "models"):
        return _parse_list(kind, value, from_text)
    if not isinstance(value, str):
        raise ValueError("expected a string")
    if kind == "url":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        return value.rstrip("/")
    if kind == "level":
        if value.upper() not in _LEVELS:
            raise ValueError("expected one of " + ", ".join(_LEVELS))
        return value.upper()
    if kind == "host" and not is_host(value):
        raise ValueError("expected a host name such as registry.ollama.ai")
    if kind == "address" and value:
        parse_address(value)
    if kind == "format" and value not in ("text", "json"):
        raise ValueError("expected text or json")
    if kind == "access" and value not in ("open", "networks", "keys"):
        raise ValueError("expected open, networks or keys")
    return value


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); raises ValueError."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([A-Za-z0-9_.-]+):(\d+)", text)
    if not match:
        raise ValueError("expected host:port, e.g. 104.21.0.1:443 or [2606:4700::1]:443")
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    if not 0 < int(port) <= 65535:
        raise ValueError("expected a port number from 1 to 65535")
    return host, int(port)


def _parse_mapping(kind: str, value: Any) -> Any:
    """A JSON object, given as JSON (file) or as JSON text (environment, command line)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise ValueError("expected a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return _parse_upstreams(value) if kind == "upstreams" else _parse_hostmap(value)


def _parse_hostmap(value: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name, target in value.items():
        if not is_host(name) or not isinstance(target, str) or not is_host(target):
            raise ValueError(f"entry {name!r}: expected a request host mapped to a model host")
        pairs.append((name.lower(), target))
    return tuple(pairs)


def _parse_upstreams(value: dict[str, Any]) -> tuple[UpstreamHost, ...]:
    hosts = []
    for host, spec in value.items():
        if not is_host(host):
            raise ValueError(f"{host!r} is not a model host such as hf.co")
        if not isinstance(spec, dict) or "url" not in spec:
            raise ValueError(f"{host}: expected an object with at least a url")
        fields: dict[str, Any] = {}
        for name, raw in spec.items():
            kind = _UPSTREAM_HOST_FIELDS.get(name)
            if kind is None:
                raise ValueError(f"{host}: unknown key {name!r} (known: {', '.join(_UPSTREAM_HOST_FIELDS)})")
            try:
                fields[name] = _parse(Key("upstream", name, "", kind, None, "", None, False), raw, False)
                if name == "timeout" and fields[name] <= 0:
                    raise ValueError("must be positive")
            except ValueError as e:
                raise ValueError(f"{host}.{name}: {e}") from None
        hosts.append(UpstreamHost(host, **fields))
    return tuple(hosts)


def _check_consistency(config: Config) -> None:
    """Rules between keys: one upstream per model host, virtual hosts name a configured upstream."""
    known = [u.host for u in config.upstreams()]
    if len(set(known)) != len(known):
        raise ConfigError(
            f"upstream.hosts: {config.upstream.host} is already the default upstream (upstream.*)"
        )
    for request_host, model_host in config.server.virtual_hosts:
        if model_host not in known:
            raise ConfigError(
                f"server.virtual_hosts: {request_host} maps to {model_host}, which no upstream serves "
                f"(configured: {', '.join(known)})"
            )
    if bool(config.server.tls_certificate) != bool(config.server.tls_key):
        raise ConfigError("server.tls_certificate and server.tls_key must be set together")


def _parse_list(kind: str, value: Any, from_text: bool) -> tuple[str, ...]:
    """Comma-separated text, or a JSON list of strings; ``models`` lists hold model names."""
    if from_text or isinstance(value, str):
        items = tuple(part.strip() for part in value.split(",") if part.strip())
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = tuple(value)
    else:
        raise ValueError("expected a list of strings")
    if kind == "models":
        _check_model_names(items)
    return items


def _check_model_names(items: tuple[str, ...]) -> None:
    for item in items:
        try:
            ModelName.parse(item)
        except InvalidName:
            raise ValueError(f"{item!r} is not a model name such as llama3.2:1b") from None


def _check_minimum(key: Key, value: Any) -> None:
    if key.minimum is not None and isinstance(value, int | float) and value < key.minimum:
        raise ValueError("is negative" if value < 0 else f"must be at least {key.minimum:g}")


def _describe(value: Any) -> str:
    return json.dumps(value)


# --- loading -------------------------------------------------------------------------------------

Layer = dict[str, tuple[Any, str, bool]]  # dotted key -> (raw value, where it came from, is text)


def _json_layer(path: str) -> Layer:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: expected a JSON object of sections")
    layer: Layer = {}
    for section, values in document.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section {section!r} (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be an object")
        for name, value in values.items():
            dotted = f"{section}.{name}"
            if dotted not in _KEYS:
                raise ConfigError(f"config file {path}: unknown key {dotted}")
            layer[dotted] = (value, f"config file {path}", False)
    return layer


def _env_layer(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = _BY_ENV.get(name)
        if key is None:
            raise ConfigError(f"unknown environment variable {name}")
        layer[key.dotted] = (value, name, True)
    return layer


def _override_layer(overrides: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for dotted, value in overrides.items():
        if dotted not in _KEYS:
            raise ConfigError(f"unknown key {dotted} on the command line")
        layer[dotted] = (value, "command line", True)
    return layer


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < JSON file < environment < command-line overrides.

    Raises :class:`ConfigError` with a one-line message naming the key, the value and its source.
    """
    merged: Layer = {}
    if path:
        merged.update(_json_layer(path))
    merged.update(_env_layer(environ or {}))
    merged.update(_override_layer(overrides or {}))
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for dotted, (raw, source, from_text) in merged.items():
        key = _KEYS[dotted]
        try:
            value = _parse(key, raw, from_text)
            _check_minimum(key, value)
        except ValueError as e:
            raise ConfigError(f"{dotted} = {_describe(raw)} (from {source}): {e}") from None
        values[key.section][key.name] = value
    config = Config(**{section: cls(**values[section]) for section, cls in SECTIONS.items()})
    _check_consistency(config)
    return config


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
    """A copy of *config* with some keys changed, e.g. ``replace(c, cache={"directory": d})`` (for tests
    and embedding apps that build their configuration in code)."""
    changed = {name: dataclasses.replace(getattr(config, name), **vals) for name, vals in sections.items()}
    return dataclasses.replace(config, **changed)


def inactive_settings(config: Config) -> list[str]:
    """Keys set away from their default that this version does not act on yet."""
    return [
        key.dotted
        for key in keys()
        if key.planned and getattr(getattr(config, key.section), key.name) != key.default
    ]


def _default_text(key: Key) -> str:
    value = key.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if key.kind in ("upstreams", "hostmap"):
        return "{}"
    if isinstance(value, tuple):
        return "(none)" if not value else ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if key.kind == "size":
        return size_text(value)
    return str(value) if value != "" else "(empty)"


def size_text(value: int) -> str:
    """A size as the configuration accepts it, exactly: ``64MiB``, ``16KiB``, ``10MB``, or bytes."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("GB", 10**9), ("MB", 10**6)):
        if value >= factor and value % factor == 0:
            return f"{value // factor}{unit}"
    return str(value)


def reference_table() -> str:
    """The configuration reference in Markdown, as the README shows it."""
    rows = ["| JSON key | Environment variable | Default | Meaning |", "| --- | --- | --- | --- |"]
    for key in keys():
        doc = key.doc + (
            " *(Accepted, not in effect yet: setting it logs a warning.)*" if key.planned else ""
        )
        rows.append(f"| `{key.dotted}` | `{key.env}` | `{_default_text(key)}` | {doc} |")
    return "\n".join(rows)


def sample_document() -> dict[str, dict[str, Any]]:
    """Every key with its default, as ``etc/mirror.json`` holds them."""
    document: dict[str, dict[str, Any]] = {}
    for key in keys():
        value = list(key.default) if isinstance(key.default, tuple) else key.default
        if key.kind in ("upstreams", "hostmap"):
            value = {}
        document.setdefault(key.section, {})[key.name] = value
    return document


if __name__ == "__main__":  # python -m ollama_mirror.config: print the README's reference table
    print(reference_table())
