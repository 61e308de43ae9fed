"""Reading one configuration value: sizes, booleans, lists, addresses, networks, maps of upstreams."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from typing import Any
from urllib.parse import urlsplit

from ..names import InvalidName, ModelName, is_host, is_namespace
from .schema import UPSTREAM_HOST_KINDS, Config, ConfigError, Key, UpstreamHost

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
        return _parse_networks(parse_value(dataclasses.replace(key, kind="list"), value, from_text))
    return _parse_mapping(key.kind, value)


def parse_value(key: Key, value: Any, from_text: bool) -> Any:
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
    if kind in ("list", "models", "namespaces"):
        return _parse_list(kind, value, from_text)
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return _parse_text(kind, value)


def _parse_text(kind: str, value: str) -> str:
    """The kinds held as text, checked."""
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
    if kind == "storage" and value:
        parse_storage_url(value)
    if kind == "endpoint" and value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError("expected an http:// or https:// URL of a host, without a path")
        return value.rstrip("/")
    if kind == "access" and value not in ("open", "networks", "keys"):
        raise ValueError("expected open, networks or keys")
    return value


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_storage_url(text: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` → (bucket, prefix without slashes at either end); raises ValueError."""
    parts = urlsplit(text)
    if parts.scheme != "s3" or not _BUCKET.fullmatch(parts.netloc) or parts.query or parts.fragment:
        raise ValueError(
            "expected s3://BUCKET or s3://BUCKET/PREFIX (a bucket name of 3 to 63 a-z, 0-9, . and -)"
        )
    prefix = parts.path.strip("/")
    if any(not segment or segment in (".", "..") for segment in prefix.split("/") if prefix):
        raise ValueError("the prefix must be path segments such as mirror/blobs-v1")
    return parts.netloc, prefix


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
            kind = UPSTREAM_HOST_KINDS.get(name)
            if kind is None:
                raise ValueError(f"{host}: unknown key {name!r} (known: {', '.join(UPSTREAM_HOST_KINDS)})")
            try:
                fields[name] = parse_value(Key("upstream", name, "", kind, None, "", None, False), raw, False)
                if name == "timeout" and fields[name] <= 0:
                    raise ValueError("must be positive")
            except ValueError as e:
                raise ValueError(f"{host}.{name}: {e}") from None
        hosts.append(UpstreamHost(host, **fields))
    return tuple(hosts)


def check_consistency(config: Config) -> None:
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
    cluster = config.cluster
    if cluster.redis_url and not cluster.storage_url:
        raise ConfigError("cluster.redis_url needs cluster.storage_url (the cluster's shared storage)")
    if cluster.redis_url and not config.security.signing_secret:
        raise ConfigError(
            "cluster.redis_url needs security.signing_secret, the same on every node (nodes sign what "
            "they ask of each other with it)"
        )
    if cluster.storage_url and not (cluster.s3_access_key_id and cluster.s3_secret_access_key):
        raise ConfigError(
            "cluster.storage_url: S3 credentials are missing: set cluster.s3_access_key_id and "
            "cluster.s3_secret_access_key (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )


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
    if kind == "namespaces":
        for item in items:
            if not is_namespace(item.replace("*", "x").replace("?", "x")):
                raise ValueError(f"{item!r} is not a namespace or a glob of one, such as team or lab-*")
    return items


def _check_model_names(items: tuple[str, ...]) -> None:
    for item in items:
        try:
            ModelName.parse(item)
        except InvalidName:
            raise ValueError(f"{item!r} is not a model name such as llama3.2:1b") from None


def check_minimum(key: Key, value: Any) -> None:
    if key.minimum is not None and isinstance(value, int | float) and value < key.minimum:
        raise ValueError("is negative" if value < 0 else f"must be at least {key.minimum:g}")


def describe_value(value: Any) -> str:
    return json.dumps(value)
