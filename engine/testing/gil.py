"""Whether a call releases the GIL: the test of the compiled public-key operations
(tests/unit/test_pkey.py) and benchmarks/bench_dkim.py's handoff figure.

It must never be used outside tests and benchmarks (it sets the interpreter's switch
interval for the length of a call)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

__all__ = ["gil_handoff"]


def gil_handoff(fn: Callable[[], object], calls: int = 300) -> int:
    """How many of ``calls`` calls of ``fn`` a worker thread made before this thread ran
    again, with the switch interval so long that only a call that releases the GIL lets
    it: ``calls`` when ``fn`` never releases it (then a thread would not help), small when
    it does.  Independent of the load on the other core."""
    done = [0]

    def work() -> None:
        for _ in range(calls):
            fn()
            done[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        seen = done[0]
    finally:
        sys.setswitchinterval(interval)
    worker.join()
    return seen
