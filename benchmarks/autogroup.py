"""The kernel's autogroup switch, turned off for a benchmark's run (bench_relay.py,
bench_inject.py): one function, so every benchmark that starts servers in sessions of
their own measures them the same way.

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
from pathlib import Path
from typing import Final

AUTOGROUP: Final = Path("/proc/sys/kernel/sched_autogroup_enabled")


def autogroup_off() -> str:
    """Turn the autogroup off for this run (root only); the line that says what was done."""
    try:
        before = AUTOGROUP.read_text().strip()
    except OSError:
        return "autogroup: not in this kernel"
    if before != "1":
        return "autogroup: off"
    try:
        AUTOGROUP.write_text("0")
    except OSError as exc:
        return (f"autogroup: on (cannot turn it off: {exc.strerror}): servers of many "
                "processes are held back")
    atexit.register(AUTOGROUP.write_text, "1")
    return "autogroup: turned off for this run (put back at exit)"
