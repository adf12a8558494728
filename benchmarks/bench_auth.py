"""AUTH password checks: an unknown user must cost what a known one costs.

Run: ``.venv/bin/python benchmarks/bench_auth.py [--runs N]``

Times ``Authenticator.check`` (one scrypt run off the loop) for a known user with a wrong
password, the baseline measured in the same run, and for an unknown user, which is checked
against a dummy hash with the users' commonest parameters so that a name cannot be probed
by timing.  Both with the default cost (N=2**14) and with cheap user hashes (N=2**4: the
dummy follows them).  Prints best-of-N milliseconds and the unknown/known ratio (expect
about 1.0; the unit tests check the parameters of each run, this checks the clock).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from engine.server.auth import Authenticator, hash_password


def best_of(runs: int, first: Callable[[], object],
            second: Callable[[], object]) -> tuple[float, float]:
    """Best seconds per call of each, timed in alternation (which one goes first alternates
    too), so that warming up and the machine's drift weigh on both alike."""
    best = [float("inf"), float("inf")]
    for i in range(runs):
        order = ((0, first), (1, second)) if i % 2 == 0 else ((1, second), (0, first))
        for slot, fn in order:
            started = time.perf_counter()
            fn()
            best[slot] = min(best[slot], time.perf_counter() - started)
    return best[0], best[1]


def check(auth: Authenticator, user: str) -> Callable[[], bool]:
    """One whole check of a wrong password for ``user``, on a fresh event loop."""
    return lambda: asyncio.run(auth.check(user, "wrong"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed checks per cell (best of)")
    args = parser.parse_args()
    print(f"{'user hashes':<22}{'known ms':>10}{'unknown ms':>12}{'unknown/known':>15}")
    for label, n in (("default (N=2**14)", 2**14), ("cheap (N=2**4)", 2**4)):
        auth = Authenticator({"alice": hash_password("right", n=n)})
        known, unknown = best_of(args.runs, check(auth, "alice"), check(auth, "nobody"))
        print(f"{label:<22}{known * 1e3:>10.2f}{unknown * 1e3:>12.2f}{unknown / known:>14.2f}x")


if __name__ == "__main__":
    main()
