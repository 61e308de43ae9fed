"""The chunk map on its own: geometry, what is readable, what comes next."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ollama_mirror.fill.chunks import ChunkMap


def test_geometry_and_the_short_last_chunk() -> None:
    chunks = ChunkMap(2500, 1000)
    assert chunks.count == 3 and chunks.bounds(2) == (2000, 2500) and chunks.length(2) == 500
    assert chunks.index_of(2499) == 2 and chunks.index_of(9999) == 2 and chunks.index_of(-5) == 0
    assert ChunkMap(0, 1000).count == 1  # an empty blob still has a chunk to finish


def test_a_chunk_is_readable_up_to_its_mark_and_on_through_finished_ones() -> None:
    chunks = ChunkMap(2500, 1000)
    assert list(chunks.record(0, 400)) == [(0, False)]
    assert chunks.available(0) == 400 and chunks.available(100) == 300 and chunks.available(400) == 0
    assert list(chunks.record(400, 1000)) == [(0, True)]
    chunks.done[0] = True
    assert list(chunks.record(1000, 1500)) == [(1, False)]
    assert chunks.available(0) == 1500  # through the finished chunk into the next one's first bytes
    assert chunks.completed_bytes() == 1500


def test_bytes_out_of_order_do_not_advance_a_mark() -> None:
    chunks = ChunkMap(2000, 1000)
    assert list(chunks.record(500, 700)) == []  # chunk 0's mark is at 0: these came from elsewhere
    assert chunks.filled == [0, 0]


def test_one_write_across_chunks_yields_each_as_it_moves() -> None:
    chunks = ChunkMap(3000, 1000)
    seen = []
    for index, finished in chunks.record(0, 2500):
        seen.append((index, finished, list(chunks.filled)))
        if finished:
            chunks.done[index] = True
    assert seen == [(0, True, [1000, 0, 0]), (1, True, [1000, 1000, 0]), (2, False, [1000, 1000, 500])]


def test_the_next_chunk_is_a_waited_one_first_else_the_lowest_free_one() -> None:
    chunks = ChunkMap(5000, 1000)
    chunks.done[0] = True
    chunks.inflight.add(1)
    assert chunks.next_chunk() == 2
    assert chunks.next_chunk({4, 3}) == 3
    assert chunks.next_chunk({1}) == 2  # in flight already: not twice
    chunks.done[2:] = [True, True, True]
    assert chunks.next_chunk() is None


@given(size=st.integers(0, 10_000), chunk_size=st.integers(1, 3000), offset=st.integers(0, 10_000))
def test_everything_recorded_in_order_is_all_readable(size: int, chunk_size: int, offset: int) -> None:
    chunks = ChunkMap(size, chunk_size)
    for index, finished in chunks.record(0, size):
        if finished:
            chunks.done[index] = True
    assert chunks.available(offset) == max(0, size - offset)
    assert chunks.completed_bytes() == size
