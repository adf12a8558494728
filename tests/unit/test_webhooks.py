"""The webhooks' parts without sockets: the signature, the body, the backoff, and the
[[webhook]] configuration's errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import EVENT_KINDS, ConfigError, load_config
from engine.ops.events import Kind
from engine.ops.tracking import record_json
from engine.ops.webhooks import backoff, batch_body, sign, verify, with_event_id


def test_signature_is_hmac_sha256_of_the_body_in_hex() -> None:
    # RFC 4231 §4.3, test case 2 (HMAC-SHA-256).
    assert sign("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert verify(b"Jefe", b"what do ya want for nothing?", sign("Jefe",
                                                                 b"what do ya want for nothing?"))
    assert not verify("Jefe", b"what do ya want for nothing!", sign(
        "Jefe", b"what do ya want for nothing?"))
    assert not verify("other", b"x", sign("Jefe", b"x"))


def test_the_body_is_an_array_of_tracking_records_with_their_event_ids() -> None:
    records: list[dict[str, Any]] = [
               {"time": "2026-12-06T10:02:03.412Z", "event": "DELIVER", "id": "AB",
                "message_id": "m@x", "recipient": "b@example.net", "delay": 0.5,
                "where": Path("/x")},
               {"time": "2026-12-06T10:02:04.000Z", "event": "FAIL", "id": "CD",
                "message_id": "", "reply": "550 5.1.1 \u00e9"}]
    lines = [with_event_id(f"E{i}", record_json(r)) for i, r in enumerate(records)]
    body = batch_body(lines)
    decoded = orjson.loads(body)
    # the tracking log's serialisation (Path -> str), the event id first
    assert decoded == [{"event_id": f"E{i}", **orjson.loads(record_json(r))}
                       for i, r in enumerate(records)]
    assert next(iter(decoded[0])) == "event_id"
    assert batch_body([]) == b"[]"


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [backoff(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert backoff(10_000, 0.05, 300.0) == 300.0


def test_the_event_names_are_the_tracking_logs() -> None:
    assert set(EVENT_KINDS) == {k.value for k in Kind}


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "ferry.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return list(info.value.problems)


def test_webhook_configuration_errors_are_clear(tmp_path: Path) -> None:
    found = _problems(tmp_path, """
[[webhook]]
name = "a"
url = "ftp://example.com/x"
secret = "k"
events = ["DELIVERED", "FAIL"]

[[webhook]]
name = "b"
url = "https://user:hunter2@example.com/x"
secret = "k"
batch_size = 0

[[webhook]]
url = "http:///nohost"
secret = ""
""")
    assert found == [
        'webhook[0].url: must be an "http://" or "https://" URL ("ftp://example.com/x")',
        "webhook[0].events[0]: is not an event of the tracking log: "
        + ", ".join(EVENT_KINDS) + ' (got "DELIVERED"; did you mean "DELIVER"?)',
        "webhook[1].batch_size: must be a positive integer (got 0)",
        "webhook[2].name: is required in a [[webhook]] entry",
        "webhook[2].url: must name a host, without spaces (\"http:///nohost\")",
        "webhook[2].secret: must be a non-empty string without NUL (the value is not shown)",
    ]
    assert not any("hunter2" in p for p in found)


def test_webhook_cross_checks(tmp_path: Path) -> None:
    secret = "do-not-echo-me"
    found = _problems(tmp_path, f"""
[[webhook]]
name = "a"
url = "http://127.0.0.1:1/x"
secret = "{secret}"
retry_interval = "1m"
max_retry_interval = 30
ca_file = "{__file__}"

[[webhook]]
name = "a"
url = "http://127.0.0.1:1/y"
secret = "{secret}"
events = []
""")
    assert found == [
        "webhook[0].max_retry_interval: must be at least retry_interval (60) (got 30)",
        "webhook[0].ca_file: applies to an https:// url only",
        "webhook[1].events: must name at least one event of " + ", ".join(EVENT_KINDS),
    ]
    assert not any(secret in p for p in found)
    good = tmp_path / "good.toml"
    good.write_text('[[webhook]]\nname = "a"\nurl = "https://h.example/x"\nsecret = "s"\n'
                    '[[webhook]]\nname = "a"\nurl = "https://h.example/y"\nsecret = "s"\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(good)
    assert info.value.problems == ('webhook[1].name: "a" is already the name of webhook[0] '
                                   "(names must be unique)",)


def test_webhook_defaults(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('[[webhook]]\nname = "app"\nurl = "https://app.example/e"\nsecret = "s"\n',
                    encoding="utf-8")
    (hook,) = load_config(path).webhook
    assert hook.events == ("DELIVER", "DEFER", "FAIL", "EXPIRE", "DSN")
    assert (hook.batch_size, hook.max_backlog, hook.ca_file) == (100, 100_000, None)
    assert "s" not in repr(hook).split("secret")[-1][:5]
