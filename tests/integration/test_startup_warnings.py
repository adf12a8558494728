"""Start-up warnings reach the ``ferry`` logger when a real Ferry starts (the checks
themselves: tests/unit/test_service_checks.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from engine.server.auth import hash_password
from engine.testing.server import RunningFerry, ferry_config


def test_hostname_and_clear_auth_warnings_are_logged_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = ferry_config(tmp_path / "spool", allow_plaintext_auth=True)
    config = dataclasses.replace(base, hostname="localhost", users={"app": hash_password("pw")})
    with caplog.at_level(logging.WARNING, logger="ferry"), RunningFerry(config):
        pass
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "ferry" and r.levelno == logging.WARNING]
    assert any("HOSTNAME 'localhost' IS NOT A FULLY QUALIFIED DOMAIN NAME" in w
               for w in warnings), warnings
    assert any("receive connector default offers AUTH without TLS" in w
               for w in warnings), warnings


def test_a_sane_configuration_starts_without_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ferry"), \
            RunningFerry(ferry_config(tmp_path / "spool")):
        pass
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
