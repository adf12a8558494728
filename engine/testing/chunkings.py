"""Ways to cut a byte string into chunks, for feeding incremental decoders.

A decoder fed the same bytes must give the same events however the bytes are cut; these
generators produce the cuts the tests use: whole, every split point, every pair of split
points for short inputs, and fixed sizes down to one byte at a time.  :func:`fed` feeds
them to a stream that writes to a hash (DKIM's body canonicalisers) and keeps its output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import combinations, pairwise
from typing import Protocol


def split_at(data: bytes, points: tuple[int, ...]) -> list[bytes]:
    """Cut ``data`` at the given increasing offsets."""
    bounds = (0, *points, len(data))
    return [data[a:b] for a, b in pairwise(bounds)]


def chunkings(data: bytes, pair_limit: int = 40) -> Iterator[list[bytes]]:
    """Whole, every 2-way cut, every 3-way cut when ``len(data) <= pair_limit``, fixed sizes.

    The last one yielded is always one byte at a time.
    """
    n = len(data)
    yield [data]
    for i in range(1, n):
        yield split_at(data, (i,))
    if n <= pair_limit:
        for pts in combinations(range(1, n), 2):
            yield split_at(data, pts)
    for size in (2, 3, 5, 7):
        if size < n:
            yield [data[i : i + size] for i in range(0, n, size)]
    if n > 1:
        yield [data[i : i + 1] for i in range(n)]


class Collected:
    """A hash's stand-in for a stream's output: keeps every byte given to ``update``."""

    def __init__(self) -> None:
        self.data = b""

    def update(self, data: bytes | memoryview) -> None:
        self.data += bytes(data)


class _Stream(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


def fed(make: Callable[[Collected], _Stream], chunks: Iterable[bytes]) -> bytes:
    """What the stream ``make(out)`` writes to ``out`` when fed ``chunks`` and finished."""
    out = Collected()
    stream = make(out)
    for chunk in chunks:
        stream.feed(chunk)
    stream.finish()
    return out.data
