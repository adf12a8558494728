"""What the pure-Python twins' result classes share: equality by ``astuple()``.

A twin result (Command, Reply, HeaderScan) equals any object with an ``astuple()`` giving
the same tuple, so it compares equal to its compiled counterpart.  Results are mutable and
so unhashable.  The compiled classes spell the same rules out themselves (a cdef class
cannot inherit a Python class).
"""

from __future__ import annotations

__all__ = ["Result"]


class Result:
    """Base of the twin result classes: ``__eq__`` by ``astuple()``, no hash."""

    __slots__ = ()

    def astuple(self) -> tuple[object, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        astuple = getattr(other, "astuple", None)
        if astuple is None:
            return NotImplemented
        return bool(self.astuple() == astuple())

    __hash__ = None  # type: ignore[assignment]  # mutable
