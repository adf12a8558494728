"""The kernel's autogroup switch, turned off for a benchmark's run (bench_relay.py,
bench_inject.py): one function, so every benchmark that starts servers in sessions of
their own measures them the same way (bench_inbound.py too).

With the autogroup on, every session is one scheduling group, and CPU is shared fairly
between groups before processes.  Ferry and the sink run in sessions of their own (so
they can be stopped apart), and Postfix's master makes its own: a node of N workers (and
Postfix's many processes) would then get one group's share against the load tools',
whatever it could use (measured on 2026-12-07: 2 workers at 0.86-1.02x one worker with it
on, 1.42x with it off).  A server machine has no load tools beside it, so the run turns
it off and puts it back at the end.  Root only; without root it says so and changes
nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

AUTOGROUP: Final = Path("/proc/sys/kernel/sched_autogroup_enabled")
#: The runs that want it off now, one file per process, and what it was before the first
#: of them: the last run to end puts it back, not the first (runs overlap on a shared
#: machine, and one that ended must not turn it on under another that still measures).
RUNS: Final = Path("/run/ferry-bench-autogroup")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def autogroup_off() -> str:
    """Turn the autogroup off for this run (root only); the line that says what was done."""
    try:
        now = AUTOGROUP.read_text().strip()
    except OSError:
        return "autogroup: not in this kernel"
    if os.geteuid() != 0:
        return (f"autogroup: {'on' if now == '1' else 'off'} (not root: left as it is)"
                + (": servers of many processes are held back" if now == "1" else ""))
    with _locked():
        before = RUNS / "before"
        if not before.exists():
            before.write_text(now)
        (RUNS / str(os.getpid())).touch()
        AUTOGROUP.write_text("0")
    atexit.register(_put_back)
    return ("autogroup: turned off for this run (put back by the last run to end)"
            if now == "1" else "autogroup: off")


def _put_back() -> None:
    with _locked():
        with contextlib.suppress(FileNotFoundError):
            (RUNS / str(os.getpid())).unlink()
        for entry in RUNS.iterdir():
            if entry.name.isdigit() and not _alive(int(entry.name)):
                entry.unlink()
        if any(entry.name.isdigit() for entry in RUNS.iterdir()):
            return  # another run still measures
        before = RUNS / "before"
        with contextlib.suppress(FileNotFoundError):
            AUTOGROUP.write_text(before.read_text().strip() or "1")
            before.unlink()
