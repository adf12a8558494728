"""The mail log sink (engine.ops.maillog) and the JSON line format (engine.ops.logfmt), fed
event records built to the contract of engine.ops.events: no server, no sockets."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.ops import logfmt
from engine.ops.events import Event, Events, Kind
from engine.ops.maillog import MailLog, line

QID = "4TQ2K9M1XJ3C0"


def rec(event: str, **fields: Any) -> Event:
    return {"time": "2026-12-06T10:02:03.412Z", "event": event, "id": QID,
            "message_id": "m1@app.example", **fields}


RECEIVE = rec("RECEIVE", connector="default", client="192.0.2.7", helo="app.example.com",
              tls="TLSv1.3 TLS_AES_256_GCM_SHA384", auth="app", size=1234,
              sender="app@example.com", recipients=["bob@example.org", "eve@example.net"])
DELIVER = rec("DELIVER", recipient="bob@example.org", host="mx.example.org",
              address="198.51.100.2:25", reply="250 2.0.0 Ok: queued as 9F", tls="",
              attempt=1, delay=0.414, connector="")
DEFER = rec("DEFER", recipient="bob@example.org", host="mx.example.org",
            address="198.51.100.2:25", reply="451 4.7.1 Greylisted, try later", attempt=2,
            delay=300.5, retry="2026-12-06T10:12:03.412Z")
FAIL = rec("FAIL", recipient="nobody@example.org", host="mx.example.org",
           address="198.51.100.2:25", reply="550 5.1.1 No such user", enhanced="5.1.1",
           attempt=1, delay=0.2)
EXPIRE = rec("EXPIRE", recipient="bob@example.org", reply="421 4.4.2 Timeout",
             delay=432000.0)


class Lines(logging.Handler):
    """The formatted lines a logger wrote (a real handler on a real logger)."""

    def __init__(self, fmt: logging.Formatter | None = None) -> None:
        super().__init__()
        self.setFormatter(fmt or logging.Formatter("%(message)s"))
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def mail_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("ferry.mail.test")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    logger.handlers.clear()


def test_received_line_names_sender_size_recipients_client_and_how() -> None:
    assert line(RECEIVE) == (
        f"{QID}: from=<app@example.com>, size=1234, nrcpt=2, client=[192.0.2.7], "
        "helo=<app.example.com>, tls=TLSv1.3 TLS_AES_256_GCM_SHA384, auth=app, "
        "connector=default, message-id=<m1@app.example>")


def test_received_line_leaves_out_what_the_session_did_not_have() -> None:
    bare = rec("RECEIVE", connector="default", client="::1", helo="", tls="", auth="",
               size=10, sender="", recipients=["a@b.example"], message_id="")
    assert line(bare) == (f"{QID}: from=<>, size=10, nrcpt=1, client=[::1], "
                          "connector=default")


_OPTIONAL = (("helo", "helo=<{}>"), ("tls", "tls={}"), ("auth", "auth={}"),
             ("connector", "connector={}"), ("message_id", "message-id=<{}>"))


@given(st.fixed_dictionaries({}, optional={key: st.sampled_from(["", "x", "a b", None])
                                           for key, _ in _OPTIONAL}))
def test_received_line_names_each_optional_field_it_has_in_order(extra: dict[str, Any]) -> None:
    record = {"event": "RECEIVE", "id": QID, "sender": "a@b.example", "size": 7,
              "client": "192.0.2.1", "recipients": ["c@d.example"], **extra}
    expected = f"{QID}: from=<a@b.example>, size=7, nrcpt=1, client=[192.0.2.1]"
    for key, shown in _OPTIONAL:
        if extra.get(key):
            expected += ", " + shown.format(extra[key])
    assert line(record) == expected


def test_delivered_line_has_next_hop_delay_attempt_and_reply_last() -> None:
    assert line(DELIVER) == (
        f"{QID}: to=<bob@example.org>, relay=mx.example.org[198.51.100.2:25], delay=0.41, "
        "attempt=1, status=sent (250 2.0.0 Ok: queued as 9F)")


def test_delivered_locally_has_no_address_and_names_tls_and_connector() -> None:
    local = {**DELIVER, "host": "maildir", "address": "", "reply": "delivered to Maildir",
             "tls": "TLSv1.3", "connector": "partner"}
    assert line(local) == (f"{QID}: to=<bob@example.org>, relay=maildir, delay=0.41, "
                           "attempt=1, tls=TLSv1.3, connector=partner, "
                           "status=sent (delivered to Maildir)")


def test_deferred_line_has_the_reason_and_the_next_try() -> None:
    assert line(DEFER) == (
        f"{QID}: to=<bob@example.org>, relay=mx.example.org[198.51.100.2:25], delay=300.50, "
        "attempt=2, retry=2026-12-06T10:12:03.412Z, "
        "status=deferred (451 4.7.1 Greylisted, try later)")


def test_deferred_without_a_connection_says_relay_none() -> None:
    down = {**DEFER, "host": "", "address": "", "reply": "connection refused"}
    assert ", relay=none, " in line(down)


def test_bounced_line_has_the_enhanced_code_and_reply() -> None:
    assert line(FAIL) == (
        f"{QID}: to=<nobody@example.org>, relay=mx.example.org[198.51.100.2:25], "
        "delay=0.20, attempt=1, enhanced=5.1.1, status=bounced (550 5.1.1 No such user)")


def test_expired_line() -> None:
    assert line(EXPIRE) == (f"{QID}: to=<bob@example.org>, delay=432000.00, "
                            "status=expired (421 4.4.2 Timeout)")


def test_dsn_line_names_the_report_and_whom_it_covers() -> None:
    dsn = rec("DSN", dsn_id="4TQ2K9M1XJ3D1", action="failed",
              recipients=["nobody@example.org"])
    assert line(dsn) == (f"{QID}: sender non-delivery notification: 4TQ2K9M1XJ3D1, "
                         "recipients=<nobody@example.org>")
    delayed = {**dsn, "action": "delayed"}
    assert "sender delay notification" in line(delayed)


@pytest.mark.parametrize(("event", "fields", "expected"), [
    ("SUSPEND", {"destination": "example.org", "recipients": 12},
     "destination=example.org, suspended, recipients=12"),
    ("RESUME", {"destination": "example.org", "recipients": 12},
     "destination=example.org, resumed, recipients=12"),
    ("HOLD", {"by": "alice", "reason": "looks like spam"}, "held, by=alice (looks like spam)"),
    ("RELEASE", {"by": "ferry", "reason": ""}, "released, by=ferry"),
    ("RETRY", {"by": "alice", "destination": "example.org"},
     "retry, by=alice, destination=example.org"),
    ("RETRY", {"by": "alice", "destination": ""}, "retry, by=alice"),
    ("REMOVE", {"by": "alice", "report": True}, "removed, by=alice, report=yes"),
    ("REMOVE", {"by": "alice", "report": False}, "removed, by=alice, report=no"),
    ("POISON", {"reason": "crashed the delivery 3 times"},
     "poison (crashed the delivery 3 times)"),
])
def test_operator_and_destination_lines(event: str, fields: dict[str, Any],
                                        expected: str) -> None:
    assert line(rec(event, **fields)) == f"{QID}: {expected}"


def test_an_event_without_a_queue_id_has_no_prefix() -> None:
    suspend = {**rec("SUSPEND", destination="example.org", recipients=3), "id": ""}
    assert line(suspend) == "destination=example.org, suspended, recipients=3"


def test_an_unknown_kind_lists_its_fields() -> None:
    assert line(rec("QUARANTINE", reason="virus", by="scanner")) == (
        f"{QID}: quarantine, reason=virus, by=scanner")


def test_nothing_from_the_wire_reaches_the_line_with_a_control_character() -> None:
    evil = {**DEFER, "reply": "451 first line\r\n451 injected: status=sent\x00",
            "recipient": "a\nb@example.org"}
    text = line(evil)
    assert "\r" not in text and "\n" not in text and "\x00" not in text
    assert "451 first line\\x0d\\x0a451 injected" in text


def test_sink_writes_one_info_line_per_record_with_the_record_attached(
        mail_logger: logging.Logger) -> None:
    lines = Lines()
    mail_logger.addHandler(lines)
    MailLog(mail_logger).write([RECEIVE, DELIVER, FAIL])
    assert lines.lines == [line(RECEIVE), line(DELIVER), line(FAIL)]
    assert [r.levelno for r in lines.records] == [logging.INFO] * 3
    assert lines.records[1].fields is DELIVER  # type: ignore[attr-defined]


def test_sink_formats_nothing_when_the_logger_is_above_info(
        mail_logger: logging.Logger) -> None:
    lines = Lines()
    mail_logger.addHandler(lines)
    mail_logger.setLevel(logging.WARNING)
    # A record no line function could format: the level test comes first, per batch.
    MailLog(mail_logger).write([{"event": "DELIVER", "id": QID, "delay": object()}])
    assert lines.lines == []


def test_a_malformed_record_does_not_hide_the_others(mail_logger: logging.Logger) -> None:
    lines = Lines()
    mail_logger.addHandler(lines)
    MailLog(mail_logger).write([{"event": "RECEIVE", "id": QID, "recipients": 5}, DELIVER])
    assert len(lines.lines) == 2 and "unreadable event record" in lines.lines[0]
    assert lines.lines[1] == line(DELIVER)


def test_the_hub_hands_emitted_events_to_the_sink(mail_logger: logging.Logger) -> None:
    lines = Lines()
    mail_logger.addHandler(lines)
    events = Events([MailLog(mail_logger)])
    # No loop running: the hub writes at once.
    events.emit(Kind.DEFER, b"\x01" * 10, "m1@app.example", recipient="bob@example.org",
                host="mx.example.org", address="198.51.100.2:25", reply="451 4.7.1 later",
                attempt=1, delay=1.0, retry="2026-12-06T10:12:03.412Z")
    assert len(lines.lines) == 1 and "status=deferred (451 4.7.1 later)" in lines.lines[0]


def test_json_line_carries_time_level_logger_message_and_the_fields(
        mail_logger: logging.Logger) -> None:
    lines = Lines(logfmt.JsonFormatter())
    mail_logger.addHandler(lines)
    MailLog(mail_logger).write([DELIVER])
    obj = json.loads(lines.lines[0])
    assert obj["level"] == "INFO" and obj["logger"] == "ferry.mail.test"
    assert obj["message"] == line(DELIVER)
    assert obj["time"].endswith("Z") and obj["time"][10] == "T"
    for key in ("event", "id", "message_id", "recipient", "host", "address", "reply",
                "attempt", "delay", "connector", "tls"):
        assert obj[key] == DELIVER[key], key


def test_json_line_of_an_ordinary_log_call_and_a_traceback() -> None:
    fmt = logfmt.JsonFormatter()
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.getLogger("ferry.x").makeRecord(
            "ferry.x", logging.ERROR, __file__, 1, "failed: %s", ("why",), __import__(
                "sys").exc_info())
    text = fmt.format(record)
    assert "\n" not in text
    obj = json.loads(text)
    assert obj["message"] == "failed: why" and obj["level"] == "ERROR"
    assert "ValueError: boom" in obj["exception"]


def test_use_sets_the_format_of_the_installed_handler_only() -> None:
    import io

    stream = io.StringIO()
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logfmt.install(stream)
    other = logging.StreamHandler(io.StringIO())
    before = other.formatter
    try:
        logfmt.use("json")
        logging.getLogger("ferry.logfmt.test").warning("hello %s", "there")
        assert json.loads(stream.getvalue())["message"] == "hello there"
        assert other.formatter is before
        with pytest.raises(ValueError, match="log format"):
            logfmt.use("xml")
    finally:
        logging.getLogger().removeHandler(handler)
        logfmt._installed.remove(handler)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


def test_text_format_writes_what_the_standard_formatter_writes() -> None:
    standard, ours = logging.Formatter(logfmt.TEXT), logfmt.formatter("text")
    logger = logging.getLogger("ferry.x")
    for when in (1765015323.001, 1765015323.999, 1765015324.5, 1765015323.25):
        record = logger.makeRecord("ferry.x", logging.INFO, "", 0, "hello %s", ("you",), None)
        record.created, record.msecs = when, int((when - int(when)) * 1000)
        assert ours.format(record) == standard.format(record)


def test_a_batch_of_mail_lines_is_one_write_and_one_flush() -> None:
    import io

    class Counting(io.StringIO):
        writes = flushes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

        def flush(self) -> None:
            self.flushes += 1

    stream = Counting()
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logfmt.install(stream)
    logger = logging.getLogger("ferry.mail.batch-test")
    logger.setLevel(logging.INFO)
    try:
        MailLog(logger).write([dict(DELIVER, recipient=f"u{n}@two.test") for n in range(3)])
        assert (stream.writes, stream.flushes) == (1, 1)
        assert [x.split("to=<")[1].split(">")[0] for x in stream.getvalue().splitlines()] == [
            "u0@two.test", "u1@two.test", "u2@two.test"]
        logger.warning("alone")  # outside a batch: written at once, as before
        assert stream.writes == 2 and stream.getvalue().endswith("alone\n")
    finally:
        logging.getLogger().removeHandler(handler)
        logfmt._installed.remove(handler)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags


def own_logger(name: str, handler: logging.Handler) -> logging.Logger:
    """A logger whose records reach ``handler`` alone (pytest's own handlers sit on the
    root logger, where logfmt.install() put ``handler``)."""
    logging.getLogger().removeHandler(handler)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def test_server_text_log_lines_are_those_of_one_record_per_line() -> None:
    import io

    stream = io.StringIO()
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logfmt.install(stream)
    logger = own_logger("ferry.mail.direct-test", handler)
    batch = [RECEIVE, DELIVER, dict(DELIVER, recipient="b\r\nc@two.test"), {"event": 3}]
    try:
        assert logfmt.text_handlers(logger) == [handler]
        MailLog(logger).write(batch)
        fast = stream.getvalue().splitlines()
        # The same batch through one record per line (a second, not installed, handler
        # makes the fast path step aside).
        lines = Lines(logfmt.formatter("text"))
        logger.addHandler(lines)
        assert logfmt.text_handlers(logger) is None
        MailLog(logger).write(batch)
        logger.removeHandler(lines)
    finally:
        logger.removeHandler(handler)
        logfmt._installed.remove(handler)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags
    stamp = len("2026-12-07 03:33:33,123 ")
    assert len(fast) == len(batch) == len(lines.lines)
    assert [x[stamp:] for x in fast] == [x[stamp:] for x in lines.lines]
    assert all(x[stamp:].startswith("INFO ferry.mail.direct-test: ") for x in fast)


def test_json_format_and_filters_keep_one_record_per_line() -> None:
    import io

    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    handler = logfmt.install(io.StringIO())
    logger = own_logger("ferry.mail.json-test", handler)
    try:
        logfmt.use("json")
        assert logfmt.text_handlers(logger) is None
        logfmt.use("text")
        assert logfmt.text_handlers(logger) == [handler]
        logger.addFilter(lambda record: True)
        assert logfmt.text_handlers(logger) is None
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()
        logfmt._installed.remove(handler)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags
