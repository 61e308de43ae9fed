"""Which ranges of a blob are on disk: the chunk map of one Fill.

A blob is cut into chunks of ``chunk_size`` bytes (the last one shorter).  Each chunk is finished, or
filled up to a mark from its start (its bytes arrive in order from one upstream response), so that a
reader can use the first bytes of a chunk still arriving.  Chunks being fetched are "in flight".  This
is bookkeeping only: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping


class ChunkMap:
    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.count = max(1, -(-size // chunk_size))
        self.done = [False] * self.count
        self.filled = [0] * self.count  # bytes on disk from each chunk's start
        self.inflight: set[int] = set()

    def bounds(self, index: int) -> tuple[int, int]:
        """The chunk's first byte and the byte after its last."""
        start = index * self.chunk_size
        return start, min(self.size, start + self.chunk_size)

    def length(self, index: int) -> int:
        start, end = self.bounds(index)
        return end - start

    def index_of(self, offset: int) -> int:
        """The chunk holding *offset* (the last one for an offset at or past the end)."""
        return min(max(0, offset // self.chunk_size), self.count - 1)

    def available(self, offset: int) -> int:
        """How many bytes from *offset* on are on disk, contiguous."""
        total, position = 0, offset
        index = offset // self.chunk_size
        while index < self.count:
            start, end = self.bounds(index)
            ready_end = end if self.done[index] else start + self.filled[index]
            if ready_end <= position:
                break
            total += ready_end - position
            position = ready_end
            if ready_end < end:
                break
            index += 1
        return total

    def completed_bytes(self) -> int:
        """Bytes on disk, for progress reports."""
        return sum(self.length(i) if self.done[i] else self.filled[i] for i in range(self.count))

    def bytes_of(self, indices: Iterable[int]) -> int:
        return sum(self.length(i) for i in indices)

    def finished(self) -> frozenset[int]:
        return frozenset(i for i in range(self.count) if self.done[i])

    def marks(self) -> dict[int, int]:
        """How far each unfinished chunk with bytes on disk got from its start."""
        return {i: mark for i, mark in enumerate(self.filled) if mark and not self.done[i]}

    def resume(self, done: Iterable[int], marks: Mapping[int, int]) -> list[int]:
        """Take what a record says is on disk (chunks finished, marks of the others); the indices of the
        chunks that became finished, in order.  Marks only move forward."""
        finished = sorted(i for i in done if 0 <= i < self.count and not self.done[i])
        for index in finished:
            self.done[index] = True
        for index, mark in marks.items():
            if 0 <= index < self.count and not self.done[index] and 0 < mark < self.length(index):
                self.filled[index] = max(self.filled[index], mark)
        return finished

    def record(self, start: int, end: int) -> Iterator[tuple[int, bool]]:
        """Bytes [start, end) are on disk: advance the marks of the chunks they continue, one at a time
        (lazily: the caller acts on each before the next moves), yielding ``(index, now finished)``.
        A chunk whose mark is below *start* is not continued: those bytes came out of order (a retry's)."""
        index = start // self.chunk_size
        while index < self.count and index * self.chunk_size < end:
            chunk_start, chunk_end = self.bounds(index)
            if not self.done[index] and chunk_start + self.filled[index] >= start:
                self.filled[index] = max(self.filled[index], min(end, chunk_end) - chunk_start)
                yield index, chunk_start + self.filled[index] >= chunk_end
            index += 1

    def next_chunk(self, wanted: Iterable[int] = ()) -> int | None:
        """The first of the *wanted* chunks (readers wait on them) that is neither finished nor in flight,
        else the lowest such chunk."""
        for index in sorted(wanted):
            if not self.done[index] and index not in self.inflight:
                return index
        for index in range(self.count):
            if not self.done[index] and index not in self.inflight:
                return index
        return None

    def unfinished(self, indices: Iterable[int]) -> set[int]:
        return {i for i in indices if not self.done[i]}
