# Included by the .pyx modules whose cdef result classes have a Python twin (Reply, Command,
# HeaderScan).  A cdef class cannot inherit the twins' engine/protocol/_twin.Result, so the
# rule it holds lives here once: equal to any object whose ``astuple()`` gives the same
# tuple (the compiled and the pure result compare equal); mutable, so never hashable
# (each class sets ``__hash__ = None``).


cdef object _astuple_eq(object self, object other):
    astuple = getattr(other, "astuple", None)
    if astuple is None:
        return NotImplemented
    return bool(self.astuple() == astuple())
