"""Configuration: one schema (:mod:`.schema`), four layers (:mod:`.loading`).

Layers apply in order: built-in defaults, the JSON file, the environment, then command-line overrides.
"""

from .loading import inactive_settings, load_config, replace
from .parsing import parse_address, parse_size
from .reference import reference_table, sample_document, size_text
from .schema import (
    ENV_PREFIX,
    SECTIONS,
    BackendConfig,
    CacheConfig,
    ClusterConfig,
    Config,
    ConfigError,
    FeaturesConfig,
    Key,
    LoggingConfig,
    PrivateConfig,
    SecurityConfig,
    ServerConfig,
    UpstreamConfig,
    UpstreamHost,
    keys,
    setting,
)

__all__ = [
    "ENV_PREFIX",
    "SECTIONS",
    "BackendConfig",
    "CacheConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "FeaturesConfig",
    "Key",
    "LoggingConfig",
    "PrivateConfig",
    "SecurityConfig",
    "ServerConfig",
    "UpstreamConfig",
    "UpstreamHost",
    "inactive_settings",
    "keys",
    "load_config",
    "parse_address",
    "parse_size",
    "reference_table",
    "replace",
    "sample_document",
    "setting",
    "size_text",
]
