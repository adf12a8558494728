"""``[log] format`` in a real ``ferry serve`` process: JSON lines parse, one object per line,
and carry the structured fields; the text format stays what it was."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any

from tests.e2e.test_cli import free_port, start, stop, wait_for_port


def serve(tmp_path: Path, fmt: str) -> tuple[int, str]:
    """Run ``ferry serve`` with ``[log] format = fmt``, make it refuse a relay attempt
    and an AUTH-less MAIL for low disk; its exit status and standard error."""
    port = free_port()
    config = tmp_path / "ferry.toml"
    config.write_text(f"""
hostname = "mx.test"
spool = "spool"
accepted_domains = ["accepted.test"]

[queue]
# More than any disk here has: every MAIL gets 452, and the start says so.
min_free_disk = {1 << 62}

[[receive]]
listen = ["127.0.0.1:{port}"]
relay_networks = []

[log]
format = "{fmt}"
""", encoding="utf-8")
    proc = start(["serve", "--config", str(config)], tmp_path)
    try:
        wait_for_port(port, proc)
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo("client.test")
            assert client.mail("s@client.test")[0] == 452
    finally:
        code, err = stop(proc)
    return code, err


def test_json_lines_parse_and_carry_the_fields(tmp_path: Path) -> None:
    code, err = serve(tmp_path, "json")
    assert code == 0, err
    lines: list[dict[str, Any]] = [json.loads(line) for line in err.splitlines()]
    assert lines, err
    for obj in lines:
        assert {"time", "level", "logger", "message"} <= obj.keys(), obj
        assert obj["time"].endswith("Z") and obj["time"][10] == "T"
    (start_warning,) = [o for o in lines if o["level"] == "WARNING"
                        and "spool free space is low at start" in o["message"]]
    assert start_warning["logger"] == "ferry.queue"
    (reject,) = [o for o in lines if o.get("event") == "REJECT"]
    assert reject["logger"] == "ferry.mail" and reject["level"] == "INFO"
    assert (reject["command"], reject["client"], reject["helo"], reject["sender"]) == (
        "MAIL", "127.0.0.1", "client.test", "s@client.test")
    assert reject["reply"].startswith("452 4.3.1 ")
    assert reject["message"].startswith("NOQUEUE: reject: MAIL from [127.0.0.1]: 452 4.3.1")


def test_text_lines_are_time_level_logger_message(tmp_path: Path) -> None:
    code, err = serve(tmp_path, "text")
    assert code == 0, err
    (reject,) = [line for line in err.splitlines() if "NOQUEUE" in line]
    assert " INFO ferry.mail: NOQUEUE: reject: MAIL from [127.0.0.1]: 452 4.3.1 " in reject
    assert not err.lstrip().startswith("{")
