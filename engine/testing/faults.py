"""Fault injection for tests of a real ``ferry serve`` process.

``python -m engine.testing.faults serve ...`` is ``ferry serve ...`` with the faults that
environment variables ask for, installed from outside before the server starts (the
production code has no test branch and never imports this module):

- ``FERRY_TEST_DSN_FAULT=<address>``: building a delivery status notification about a
  message whose envelope sender is ``<address>`` raises ``RuntimeError`` (the scheduler's
  DSN generation fails for that message alone: the poison-message test).

Test-side only; never used by the running server.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from engine.scheduler import scheduler

DSN_FAULT = "FERRY_TEST_DSN_FAULT"


def install() -> None:
    """Install the faults the environment names (none: nothing changes)."""
    sender = os.environ.get(DSN_FAULT)
    if sender:
        real = scheduler.build_dsn  # type: ignore[attr-defined]

        def failing_build_dsn(**kwargs: Any) -> bytes | None:
            if kwargs["envelope"].sender == sender:
                raise RuntimeError(f"test hook {DSN_FAULT}: DSN generation fails")
            return real(**kwargs)

        scheduler.build_dsn = failing_build_dsn  # type: ignore[attr-defined]


if __name__ == "__main__":
    install()
    from engine.cli.main import main

    sys.exit(main())
