"""Configuration: defaults, the four layers and their order, and a clear error for every bad value."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from ollama_mirror.config import (
    Config,
    ConfigError,
    inactive_settings,
    keys,
    load_config,
    parse_size,
    reference_table,
    sample_document,
    size_text,
)
from ollama_mirror.config.reference import default_text

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, document: Any) -> str:
    path = tmp_path / "mirror.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_defaults_are_the_seed_defaults() -> None:
    config = load_config()
    assert config.server.port == 11434
    assert config.server.host == "0.0.0.0"
    assert config.cache.directory == "./cache"
    assert config.cache.retention_days == 30
    assert config.cache.max_size_gb == 100
    assert config.upstream.url == "https://registry.ollama.ai"
    assert config.upstream.timeout == 300
    assert config.upstream.max_concurrent_downloads == 3
    assert config.logging.max_file_size == 10_000_000
    assert config.listen_endpoints() == ["tcp:11434:interface=0.0.0.0"]


def test_precedence_defaults_then_file_then_environment_then_command_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"server": {"port": 1111, "host": "127.0.0.1"}, "cache": {"directory": "/from/file"}}
    )
    env = {"OLLAMA_MIRROR_PORT": "2222", "OLLAMA_MIRROR_CACHE_DIR": "/from/env"}
    config = load_config(path, env, {"server.port": "3333"})
    assert config.server.port == 3333  # command line beats environment beats file
    assert config.cache.directory == "/from/env"  # environment beats file
    assert config.server.host == "127.0.0.1"  # file beats default
    assert config.upstream.url == "https://registry.ollama.ai"  # default where nobody said otherwise


def test_every_seed_environment_variable_is_understood() -> None:
    env = {
        "OLLAMA_MIRROR_HOST": "127.0.0.2",
        "OLLAMA_MIRROR_PORT": "8080",
        "OLLAMA_MIRROR_WORKERS": "2",
        "OLLAMA_MIRROR_CACHE_DIR": "/c",
        "OLLAMA_MIRROR_CACHE_RETENTION_DAYS": "7",
        "OLLAMA_MIRROR_CACHE_MAX_SIZE_GB": "2.5",
        "OLLAMA_MIRROR_CACHE_CLEANUP_INTERVAL": "60",
        "OLLAMA_MIRROR_UPSTREAM_URL": "http://registry.example:5000/",
        "OLLAMA_MIRROR_UPSTREAM_TIMEOUT": "5",
        "OLLAMA_MIRROR_MAX_CONCURRENT_DOWNLOADS": "8",
        "OLLAMA_MIRROR_RETRY_ATTEMPTS": "1",
        "OLLAMA_MIRROR_RETRY_DELAY": "0.5",
        "OLLAMA_MIRROR_API_KEY": "k",
        "OLLAMA_MIRROR_ALLOWED_MODELS": "llama3.2, codellama,mistral",
        "OLLAMA_MIRROR_BLOCKED_MODELS": "bad",
        "OLLAMA_MIRROR_RATE_LIMIT_REQUESTS": "10",
        "OLLAMA_MIRROR_RATE_LIMIT_WINDOW": "30",
        "OLLAMA_MIRROR_LOG_LEVEL": "debug",
        "OLLAMA_MIRROR_LOG_FILE": "/var/log/m.log",
    }
    config = load_config(None, env)
    assert (config.server.host, config.server.port, config.server.workers) == ("127.0.0.2", 8080, 2)
    assert config.cache.directory == "/c"
    assert (config.cache.retention_days, config.cache.max_size_gb, config.cache.cleanup_interval) == (
        7,
        2.5,
        60,
    )
    assert config.upstream.url == "http://registry.example:5000"
    assert (config.upstream.timeout, config.upstream.max_concurrent_downloads) == (5, 8)
    assert (config.upstream.retry_attempts, config.upstream.retry_delay) == (1, 0.5)
    assert config.security.api_key == "k"
    assert config.security.allowed_models == ("llama3.2", "codellama", "mistral")
    assert config.security.blocked_models == ("bad",)
    assert (config.security.rate_limit_requests, config.security.rate_limit_window) == (10, 30)
    assert (config.logging.level, config.logging.file) == ("DEBUG", "/var/log/m.log")


def test_the_seed_config_json_loads_as_written(tmp_path: Path) -> None:
    seed = {
        "server": {"host": "0.0.0.0", "port": 11434, "workers": 1},
        "cache": {"directory": "./cache", "retention_days": 30, "max_size_gb": 100, "cleanup_interval": 3600},
        "upstream": {
            "url": "https://registry.ollama.ai",
            "timeout": 300,
            "max_concurrent_downloads": 3,
            "retry_attempts": 3,
        },
        "security": {
            "api_key": "your-secret-key",
            "allowed_models": ["llama3.2", "codellama", "mistral"],
            "rate_limit_requests": 100,
            "rate_limit_window": 60,
        },
        "logging": {
            "level": "INFO",
            "file": "/var/log/ollama-mirror.log",
            "max_file_size": "10MB",
            "backup_count": 5,
        },
        "features": {"enable_api_proxy": True, "enable_metrics": True, "enable_web_ui": False},
    }
    config = load_config(write(tmp_path, seed))
    assert config.security.allowed_models == ("llama3.2", "codellama", "mistral")
    assert config.logging.max_file_size == 10_000_000


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("10MB", 10_000_000),
        ("10mb", 10_000_000),
        ("16MiB", 16 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("2 KiB", 2048),
        ("1TB", 10**12),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("document", "env", "message"),
    [
        ({"server": {"port": "abc"}}, {}, 'server.port = "abc" (from config file'),
        ({"server": {"port": 70000}}, {}, "server.port = 70000"),
        (
            {},
            {"OLLAMA_MIRROR_PORT": "eleven"},
            'server.port = "eleven" (from OLLAMA_MIRROR_PORT): expected a whole',
        ),
        ({"cache": {"max_size_gb": -1}}, {}, "cache.max_size_gb = -1 (from config file"),
        ({}, {"OLLAMA_MIRROR_CACHE_RETENTION_DAYS": "-3"}, 'cache.retention_days = "-3"'),
        ({"upstream": {"url": "ftp://example.com"}}, {}, 'upstream.url = "ftp://example.com"'),
        ({"upstream": {"url": "not a url"}}, {}, 'upstream.url = "not a url"'),
        ({"upstream": {"timeout": True}}, {}, "upstream.timeout = true"),
        ({"logging": {"max_file_size": "ten megs"}}, {}, 'logging.max_file_size = "ten megs"'),
        ({"logging": {"level": "LOUD"}}, {}, 'logging.level = "LOUD"'),
        ({"features": {"enable_metrics": "yes"}}, {}, 'features.enable_metrics = "yes"'),
        ({"security": {"allowed_models": [1, 2]}}, {}, "security.allowed_models = [1, 2]"),
        ({"upstream": {"max_concurrent_downloads": 0}}, {}, "upstream.max_concurrent_downloads = 0"),
        ({"cache": {"colour": "blue"}}, {}, "unknown key cache.colour"),
        ({"caches": {}}, {}, "unknown section 'caches'"),
        ({}, {"OLLAMA_MIRROR_CACHE_DIRR": "/x"}, "unknown environment variable OLLAMA_MIRROR_CACHE_DIRR"),
    ],
)
def test_bad_values_stop_with_a_message_naming_key_value_and_source(
    tmp_path: Path, document: dict[str, Any], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, document), env)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_unknown_command_line_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key cache.size on the command line"):
        load_config(None, {}, {"cache.size": "1"})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(str(bad))


def test_listen_endpoints_override_host_and_port_and_ipv6_is_escaped() -> None:
    assert load_config(None, {"OLLAMA_MIRROR_HOST": "::1"}).listen_endpoints() == [
        r"tcp:11434:interface=\:\:1"
    ]
    config = load_config(None, {"OLLAMA_MIRROR_LISTEN": "tcp:80, unix:/run/m.sock"})
    assert config.listen_endpoints() == ["tcp:80", "unix:/run/m.sock"]


def test_settings_not_yet_in_effect_are_reported() -> None:
    assert inactive_settings(load_config()) == []
    config = load_config(
        None,
        {"OLLAMA_MIRROR_WORKERS": "2", "OLLAMA_MIRROR_ENABLE_WEB_UI": "false", "OLLAMA_MIRROR_API_KEY": "k"},
    )
    assert (
        inactive_settings(config) == []
    )  # (the web page, once planned, is in effect: turning it off is too)


def test_sample_config_in_etc_has_every_key_and_loads() -> None:
    path = ROOT / "etc" / "mirror.json"
    document = json.loads(path.read_text())
    assert {(s, k) for s, values in document.items() for k in values} == {(k.section, k.name) for k in keys()}
    assert document == sample_document()
    assert isinstance(load_config(str(path)), Config)


def test_readme_documents_every_key_exactly_as_the_code_defines_it() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", readme, re.S)
    assert block, "README.md lacks the configuration reference block"
    assert block.group(1).strip() == reference_table(), (
        "README's configuration reference is stale: regenerate it with `python -m ollama_mirror.config`"
    )
    for key in keys():
        assert f"`{key.dotted}`" in readme and f"`{key.env}`" in readme


def test_the_reference_shows_every_size_default_as_a_value_that_reads_back_the_same() -> None:
    """``server.max_header_size`` (16384) once showed as ``0MB``."""
    sizes = [key for key in keys() if key.kind == "size"]
    assert sizes
    for key in sizes:
        shown = default_text(key)
        assert parse_size(shown) == key.default, (key.dotted, shown)
    assert [size_text(v) for v in (16384, 64 * 2**20, 10**7, 1000, 1536)] == [
        "16KiB",
        "64MiB",
        "10MB",
        "1000",
        "1536",
    ]


# --- cluster -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [("s3://models", "models", ""), ("s3://models/mirror/v1/", "models", "mirror/v1")],
)
def test_a_storage_url_names_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    from ollama_mirror.config.parsing import parse_storage_url

    environ = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    config = load_config(None, environ, {"cluster.storage_url": url})
    assert parse_storage_url(config.cluster.storage_url) == (bucket, prefix)
    assert (config.cluster.s3_access_key_id, config.cluster.s3_secret_access_key) == ("id", "secret")


@pytest.mark.parametrize(
    ("url", "words"),
    [("http://models", "expected s3://BUCKET"), ("s3://A_B", "bucket name"), ("s3://models/a//b", "prefix")],
)
def test_a_storage_url_that_cannot_be_used_is_refused_in_one_line(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=rf"cluster.storage_url = .* \(from command line\): .*{words}"):
        load_config(None, {}, {"cluster.storage_url": url})


def test_shared_storage_without_credentials_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="S3 credentials are missing"):
        load_config(None, {}, {"cluster.storage_url": "s3://models"})


def test_the_mirrors_own_credentials_win_over_the_standard_aws_variables(tmp_path: Path) -> None:
    path = write(tmp_path, {"cluster": {"s3_access_key_id": "from-file", "s3_secret_access_key": "s"}})
    config = load_config(path, {"AWS_ACCESS_KEY_ID": "from-aws", "AWS_SECRET_ACCESS_KEY": "x"})
    assert config.cluster.s3_access_key_id == "from-file" and config.cluster.s3_secret_access_key == "s"


def test_leases_need_the_shared_storage_and_one_secret_for_the_cluster() -> None:
    storage = {
        "cluster.storage_url": "s3://models",
        "cluster.s3_access_key_id": "i",
        "cluster.s3_secret_access_key": "s",
    }
    with pytest.raises(ConfigError, match="cluster.redis_url needs cluster.storage_url"):
        load_config(None, {}, {"cluster.redis_url": "redis://127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match="cluster.redis_url needs security.signing_secret"):
        load_config(None, {}, {**storage, "cluster.redis_url": "redis://127.0.0.1:6379/0"})
    config = load_config(
        None,
        {},
        {**storage, "cluster.redis_url": "redis://:pw@127.0.0.1:6379/2", "security.signing_secret": "x" * 32},
    )
    assert config.node_url().startswith("http://") and config.node_url().endswith(":11434")
