"""Loading the configuration from its four layers: defaults < JSON file < environment < command line."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from .parsing import check_consistency, check_minimum, describe_value, parse_value
from .schema import BY_ENV, ENV_PREFIX, KEYS, SECTIONS, Config, ConfigError, keys

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
            if dotted not in KEYS:
                raise ConfigError(f"config file {path}: unknown key {dotted}")
            layer[dotted] = (value, f"config file {path}", False)
    return layer


def _env_layer(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = BY_ENV.get(name)
        if key is None:
            raise ConfigError(f"unknown environment variable {name}")
        layer[key.dotted] = (value, name, True)
    return layer


def _override_layer(overrides: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for dotted, value in overrides.items():
        if dotted not in KEYS:
            raise ConfigError(f"unknown key {dotted} on the command line")
        layer[dotted] = (value, "command line", True)
    return layer


# The standard names of S3 credentials, read when the mirror's own keys are not set (beneath them).
AWS_VARIABLES = {
    "AWS_ACCESS_KEY_ID": "cluster.s3_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "cluster.s3_secret_access_key",
    "AWS_SESSION_TOKEN": "cluster.s3_session_token",
}


def _aws_layer(environ: Mapping[str, str]) -> Layer:
    return {
        dotted: (environ[name], f"environment {name}", True)
        for name, dotted in AWS_VARIABLES.items()
        if environ.get(name)
    }


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: defaults < JSON file < environment < command-line overrides.

    Raises :class:`ConfigError` with a one-line message naming the key, the value and its source.
    """
    merged: Layer = _aws_layer(environ or {})  # beneath everything else
    if path:
        merged.update(_json_layer(path))
    merged.update(_env_layer(environ or {}))
    merged.update(_override_layer(overrides or {}))
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for dotted, (raw, source, from_text) in merged.items():
        key = KEYS[dotted]
        try:
            value = parse_value(key, raw, from_text)
            check_minimum(key, value)
        except ValueError as e:
            raise ConfigError(f"{dotted} = {describe_value(raw)} (from {source}): {e}") from None
        values[key.section][key.name] = value
    config = Config(**{section: cls(**values[section]) for section, cls in SECTIONS.items()})
    check_consistency(config)
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
