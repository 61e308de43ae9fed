"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from .fakeregistry import FakeRegistry


@pytest.fixture
def registry() -> FakeRegistry:
    """An in-memory upstream holding ``library/tiny:latest``: a 200 kB weights layer and a template."""
    registry = FakeRegistry()
    registry.add_model("library/tiny", "latest", [os.urandom(200_000), b"{{ .Prompt }}"])
    return registry


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event published while the test runs."""
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)
