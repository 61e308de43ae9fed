"""The configuration's schema: the section dataclasses *are* the schema.

Each field carries its default, its ``OLLAMA_MIRROR_*`` variable and its documentation, so that the
loader, the validation messages and the README's reference table cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

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
    max_connections_per_client: int = setting(
        1024,
        "MAX_CONNECTIONS_PER_CLIENT",
        "Open connections one client address may hold, per process (beyond it a new one gets 503 and is "
        "closed); 0 = no cap. A fleet behind one NAT address pulls with 16 connections per server.",
        "int",
    )
    max_connections: int = setting(
        0,
        "MAX_CONNECTIONS",
        "Open client connections in all, per process (beyond it a new one gets 503 and is closed); 0 = "
        "automatic: half of the open-file limit left after 256 for files and upstream connections.",
        "int",
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


UPSTREAM_HOST_KINDS = {
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
    retry_attempts: int = setting(
        3,
        "RETRY_ATTEMPTS",
        "Retries of an upstream request (token, manifest, blob size, blob or chunk GET) that got no answer, "
        "408, 429 or a 5xx; other answers are final.",
        "int",
    )
    retry_delay: float = setting(
        1,
        "RETRY_DELAY",
        "Seconds before the first retry; doubles on each further one (with jitter, up to 30 s), or what "
        "the upstream's Retry-After asks if longer (up to 60 s).",
        "float",
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
        "already fetching is free. In a cluster with Redis, counted across all nodes. 0: no limit.",
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
        True,
        "ENABLE_WEB_UI",
        "Serve the operators' web page at `/mirror/ui` (cache, downloads, savings, actions); with "
        "`security.api_key(s)` set it asks for a key first.",
        "bool",
    )


@dataclass(frozen=True)
class ClusterConfig:
    storage_url: str = setting(
        "",
        "STORAGE_URL",
        "`s3://BUCKET` or `s3://BUCKET/PREFIX`: the cluster's copy of every verified blob and complete "
        "manifest, which any node reads before going upstream; the cache directory is then a read-through "
        "cache of it. Empty: the cache directory alone.",
        "storage",
    )
    s3_endpoint: str = setting(
        "",
        "S3_ENDPOINT",
        "The S3-compatible endpoint, e.g. `http://127.0.0.1:8333` (path-style addressing); empty: AWS.",
        "endpoint",
    )
    s3_region: str = setting("us-east-1", "S3_REGION", "The S3 region requests are signed for.", "str")
    s3_access_key_id: str = setting(
        "",
        "S3_ACCESS_KEY_ID",
        "S3 access key id; empty: `AWS_ACCESS_KEY_ID` (never logged).",
        "str",
    )
    s3_secret_access_key: str = setting(
        "",
        "S3_SECRET_ACCESS_KEY",
        "S3 secret access key; empty: `AWS_SECRET_ACCESS_KEY` (never logged).",
        "str",
    )
    s3_session_token: str = setting(
        "",
        "S3_SESSION_TOKEN",
        "S3 session token, for temporary credentials; empty: `AWS_SESSION_TOKEN`.",
        "str",
    )
    redis_url: str = setting(
        "",
        "REDIS_URL",
        "`redis://[:password@]host:port/db` (`rediss://`: TLS): who downloads which blob for the whole "
        "cluster (one upstream transfer per blob; the other nodes read from that node meanwhile). Needs "
        "`cluster.storage_url` and `security.signing_secret`, the same on every node.",
        "str",
    )
    node_url: str = setting(
        "",
        "NODE_URL",
        "The base URL other nodes reach this node at; empty: `http://<hostname>:<server.port>`.",
        "str",
    )
    lease_seconds: float = setting(
        15,
        "LEASE_SECONDS",
        "How long a download's lease lives without renewal: a dead node's download is taken over within "
        "twice this.",
        "float",
        1,
    )
    redirect_to_storage: bool = setting(
        False,
        "REDIRECT_TO_STORAGE",
        "Answer blob GETs with a 307 to a presigned URL of the shared storage (valid an hour) when it holds "
        "the blob, instead of streaming it through the node; HEAD is still answered by the node. Ollama "
        "follows it only when the storage's host name differs from the mirror's.",
        "bool",
    )


@dataclass(frozen=True)
class PrivateConfig:
    namespaces: tuple[str, ...] = setting(
        (),
        "PRIVATE_NAMESPACES",
        "Namespaces (names or globs, e.g. `team,lab-*`) whose models live on the mirror only: pushed "
        "there (`ollama push`), pulled from there, never asked of any upstream. Empty: nothing can be "
        "pushed.",
        "namespaces",
    )
    push_authorized_keys: str = setting(
        "",
        "PUSH_AUTHORIZED_KEYS",
        "File of Ollama public keys (`ssh-ed25519 AAAA... comment`, as in `~/.ollama/id_ed25519.pub`) "
        'allowed to push, each optionally limited to namespaces (`namespaces="team,lab-*" ssh-ed25519 '
        "...`); re-read when it changes. Empty: nobody may push.",
        "str",
    )
    max_size_gb: float = setting(
        0,
        "PRIVATE_MAX_SIZE_GB",
        "Cap on the pushed models' blobs, in GB (10^9 bytes); a push over it is refused. 0: no cap. "
        "Pushed models are never evicted (the mirror holds the only copy).",
        "float",
    )
    upload_timeout: float = setting(
        3600,
        "PRIVATE_UPLOAD_TIMEOUT",
        "Seconds an unfinished upload may rest before it is removed.",
        "float",
        1,
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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    private: PrivateConfig = field(default_factory=PrivateConfig)

    def listen_endpoints(self) -> list[str]:
        """The strports descriptions to listen on: ``server.listen``, or one built from host and port."""
        if self.server.listen:
            return list(self.server.listen)
        interface = self.server.host.replace(":", r"\:")
        return [f"tcp:{self.server.port}:interface={interface}"]

    def node_url(self) -> str:
        """Where other nodes of the cluster reach this one (``cluster.node_url``, or the host's name)."""
        if self.cluster.node_url:
            return self.cluster.node_url.rstrip("/")
        return f"http://{socket.gethostname()}:{self.server.port}"

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
    "cluster": ClusterConfig,
    "private": PrivateConfig,
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


KEYS: dict[str, Key] = {k.dotted: k for k in keys()}
BY_ENV: dict[str, Key] = {k.env: k for k in KEYS.values()}
