"""The real Ollama client's contract, kept in CI without the binary: ``tests/vectors/*.json`` replayed.

Each vector was recorded while the real ``ollama`` pulled, listed, showed, removed, ran and pushed models
through the mirror (``test_real_ollama.py`` with ``RECORD_VECTORS=1``). Here the same scenario is set up again (a
registry of its own with the same models, the daemon with the recorded settings, a stand-in backend for
inference), every request is sent again, and every answer must match the recorded one in status, the
headers the client reads and the body it parsed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backend import OllamaBackend
from tests.support.daemon import MirrorFactory, merge_config
from tests.support.models import PushedModel, build_model, push_model
from tests.support.ollamakey import OllamaKey
from tests.support.recorder import RecordingProxy
from tests.support.registry import RegistryProcess, free_port
from tests.support.replay import Replayer, differences
from tests.support.vectors import VECTORS_DIR, Bindings, Vector

VECTOR_FILES = sorted(VECTORS_DIR.glob("*.json"))


def test_there_are_vectors_of_every_mode() -> None:
    modes = {"registry-pull", "registry-keys", "registry-push", "api-mode", "inference"}
    assert {p.stem for p in VECTOR_FILES} >= modes


@pytest.fixture(scope="module")
def vector_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    process = RegistryProcess(tmp_path_factory.mktemp("vector-registry"))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def vector_models(
    vector_registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PushedModel]:
    """The models the vectors name, built as the recording built them, by prefix."""
    work = tmp_path_factory.mktemp("vector-models")
    specs: dict[str, dict[str, Any]] = {}
    for path in VECTOR_FILES:
        for spec in Vector.load(path).setup["models"]:
            specs[spec["prefix"]] = spec
    built = {}
    for prefix, spec in specs.items():
        args = {k: v for k, v in spec.items() if k not in ("prefix", "repo")}
        built[prefix] = push_model(vector_registry.url, spec["repo"], "latest", build_model(work, **args))
    return built


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_the_mirror_answers_the_real_client_as_recorded(
    path: Path,
    vector_registry: RegistryProcess,
    vector_models: dict[str, PushedModel],
    mirror_factory: MirrorFactory,
    tmp_path: Path,
) -> None:
    vector = Vector.load(path)
    keys = {"authorized": OllamaKey("authorized@replay"), "unknown": OllamaKey("stranger@replay")}
    config: dict[str, Any] = merge_config({}, vector.setup.get("mirror", {}))
    backend = None
    if vector.setup.get("keys"):
        authorized = tmp_path / "authorized_keys"
        authorized.write_text(keys["authorized"].public_line() + "\n")
        config = merge_config(config, {"security": {"registry_authorized_keys": str(authorized)}})
    if "push_keys" in vector.setup:  # the authorized_keys options the recording gave the pusher's key
        pushers = tmp_path / "push_authorized_keys"
        pushers.write_text(f"{vector.setup['push_keys']} {keys['authorized'].public_line()}\n".lstrip())
        config = merge_config(config, {"private": {"push_authorized_keys": str(pushers)}})
    if vector.setup.get("backend") == "stand-in":
        backend = OllamaBackend(delay=0.01)
        config = merge_config(config, {"backend": {"url": backend.url}})
    elif vector.setup.get("backend") == "none":
        config = merge_config(config, {"backend": {"url": f"http://127.0.0.1:{free_port()}"}})
    try:
        mirror = mirror_factory(upstream_url=vector_registry.url, config=config)
        with RecordingProxy(mirror.url) as recorder:
            bindings = Bindings(host=recorder.host)
            for prefix, model in vector_models.items():
                bindings.add_model(prefix, model)
            replayer = Replayer(recorder, bindings, keys)
            found = []
            for phase in vector.phases:
                for line in differences(phase["exchanges"], replayer.phase(phase)):
                    found.append(f"{phase['phase']}: {line}")
        assert not found, "\n".join(found)
    finally:
        if backend is not None:
            backend.stop()
