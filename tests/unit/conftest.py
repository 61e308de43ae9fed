"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os

import pytest

from .fakeregistry import FakeRegistry


@pytest.fixture
def registry() -> FakeRegistry:
    """An in-memory upstream holding ``library/tiny:latest``: a 200 kB weights layer and a template."""
    registry = FakeRegistry()
    registry.add_model("library/tiny", "latest", [os.urandom(200_000), b"{{ .Prompt }}"])
    return registry
