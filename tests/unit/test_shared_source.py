"""The cluster's tiered source: whether it can promise ranges before the first one (the shared copy)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from ollama_mirror.cluster.shared import _TieredSource
from ollama_mirror.upstream.errors import UpstreamError


class FakeShared:
    """What the tiered source asks of the shared store: whether it holds a blob (its size)."""

    def __init__(self, held: dict[str, int], failing: bool = False) -> None:
        self.held = held
        self.failing = failing
        self.asked: list[str] = []

    async def holds(self, hexdigest: str) -> int | None:
        self.asked.append(hexdigest)
        if self.failing:
            raise UpstreamError("storage did not answer")
        return self.held.get(hexdigest)


def result(coroutine: Any) -> Any:
    box: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(box.append)
    assert box, "the coroutine did not finish"
    return box[0]


def test_ranges_are_promised_only_for_a_blob_the_shared_copy_holds() -> None:
    shared = FakeShared({"a" * 64: 10})
    source = _TieredSource(shared, fallback=object())  # type: ignore[arg-type]
    assert result(source.honours_ranges("sha256:" + "a" * 64)) is True
    assert result(source.honours_ranges("sha256:" + "b" * 64)) is False  # from upstream: probed first
    assert shared.asked == ["a" * 64, "b" * 64]


def test_a_store_that_fails_promises_nothing() -> None:
    source = _TieredSource(FakeShared({}, failing=True), fallback=object())  # type: ignore[arg-type]
    assert result(source.honours_ranges("sha256:" + "a" * 64)) is False
