"""The injection API (engine.http.inject) against a real RunningFerry over real sockets: a
message posted over HTTP is queued in the group commit and delivered byte-correct to a
real SMTP sink, where the standard library's ``email`` parses it back."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage, MIMEPart
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from engine.config import Config, HttpConfig, HttpToken
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink, Received
from engine.testing.wait import wait_for

APP_TOKEN = "a" * 32
RELAY_TOKEN = "r" * 32


def _post(f: RunningFerry, doc: Any = None, *, data: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    assert f.app.http is not None
    url = f"http://{f.app.http.addresses[0]}/api/v1/messages"

    async def go() -> tuple[int, dict[str, str], Any]:
        async with aiohttp.ClientSession() as session, session.post(
                url, json=doc if data is None else None, data=data,
                headers=headers or {}) as answer:
            return answer.status, dict(answer.headers), await answer.json(content_type=None)

    return asyncio.run(go())


def _config(spool: Path, sink: CountingSink | None = None, **http: Any) -> Config:
    config = ferry_config(spool)
    tokens = {"app": HttpToken(token=APP_TOKEN, scopes=("inject",)),
              "relay": HttpToken(token=RELAY_TOKEN, scopes=("inject",), trusted=True)}
    config = dataclasses.replace(
        config, accepted_domains=("example.com",),
        http=HttpConfig(listen=(("127.0.0.1", 0),), tokens=tokens, **http))
    if sink is not None:
        config = dataclasses.replace(config, delivery=dataclasses.replace(
            config.delivery, paused=False, smarthost=("127.0.10.1", sink.port)))
    return config


#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.10.1"]


@pytest.fixture
def delivering(tmp_path: Path, sink: CountingSink) -> Iterator[RunningFerry]:
    with RunningFerry(_config(tmp_path / "spool", sink)) as f:
        yield f


@pytest.fixture
def held(tmp_path: Path) -> Iterator[RunningFerry]:
    """Delivery paused: what is posted stays in the queue."""
    with RunningFerry(_config(tmp_path / "spool", max_recipients=200,
                              max_message_size=4096, max_received_headers=3)) as f:
        yield f


def _parse(message: Received) -> EmailMessage:
    parsed = email.message_from_bytes(message.body, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _text(part: MIMEPart) -> str:
    # The parser keeps a 7bit part's CRLF line ends (they came from bytes).
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def test_raw_message_is_queued_after_the_commit_and_arrives_byte_correct(
        delivering: RunningFerry, sink: CountingSink) -> None:
    content = "From: app@example.com\nTo: bob@example.net\nSubject: raw\n\nline one\n.\nend\n"
    status, _, doc = _post(delivering, {"from": "app@example.com",
                                        "recipients": ["bob@example.net"],
                                        "content": content})
    assert status == 200, doc
    assert doc["recipients"] == 1 and doc["ids"] == [doc["id"]]
    wait_for(lambda: len(sink.state.messages) == 1)
    (got,) = sink.state.messages
    assert (got.sender, got.recipients) == ("app@example.com", ["bob@example.net"])
    # Received (ours, with the queue id), then the Date and Message-ID a submission server
    # adds (RFC 6409 §8), then the content byte for byte with CRLF line ends.
    assert got.body.startswith(b"Received: from unknown (")
    assert f"with HTTP id {doc['id']}".encode() in got.body
    _, _, original = got.body.partition(b"Subject: raw\r\n")
    assert original == b"\r\nline one\r\n.\r\nend\r\n"
    parsed = _parse(got)
    assert parsed["Message-ID"] and parsed["Date"]
    assert _text(parsed) == "line one\n.\nend\n"


def test_structured_message_with_substitutions_per_recipient(
        delivering: RunningFerry, sink: CountingSink) -> None:
    attachment = bytes(range(256)) * 4
    status, _, doc = _post(delivering, {
        "from": "app@example.com",
        "recipients": [{"email": "ann@example.net", "substitutions": {"name": "Ann"}},
                       {"email": "zoe@example.net", "substitutions": {"name": "Zoë <&>"}},
                       "x@example.net", "y@example.net"],
        "substitutions": {"name": "friend"},
        "subject": "Hello {{name}}",
        "text": "Dear {{ name }},\nyour order shipped.\n",
        "html": "<p>Dear {{name}}</p>",
        "headers": {"Reply-To": "help@example.com", "X-Campaign": "spring"},
        "attachments": [{"filename": "data.bin", "content_type": "application/octet-stream",
                         "content": base64.b64encode(attachment).decode()}],
    })
    assert status == 200, doc
    # Ann, Zoë, and one message shared by the two recipients with the default value.
    assert doc["recipients"] == 4 and len(doc["ids"]) == 3
    wait_for(lambda: sum(len(m.recipients) for m in sink.state.messages) == 4)
    by_rcpt = {tuple(m.recipients): _parse(m) for m in sink.state.messages}
    assert set(by_rcpt) == {("ann@example.net",), ("zoe@example.net",),
                            ("x@example.net", "y@example.net")}
    for rcpts, name in ((("ann@example.net",), "Ann"), (("zoe@example.net",), "Zoë <&>"),
                        (("x@example.net", "y@example.net"), "friend")):
        msg = by_rcpt[rcpts]
        assert msg["Subject"] == f"Hello {name}"
        assert msg["To"] == (rcpts[0] if len(rcpts) == 1 else "undisclosed-recipients:;")
        assert msg["Reply-To"] == "help@example.com" and msg["X-Campaign"] == "spring"
        assert msg.get_content_type() == "multipart/mixed"
        text = msg.get_body(("plain",))
        html = msg.get_body(("html",))
        assert text is not None and html is not None
        assert _text(text) == f"Dear {name},\nyour order shipped.\n"
        escaped = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert _text(html) == f"<p>Dear {escaped}</p>\n"
        (part,) = list(msg.iter_attachments())
        assert part.get_filename() == "data.bin"
        assert part.get_content() == attachment
    assert len({m["Message-ID"] for m in by_rcpt.values()}) == 3
    # 7bit-clean: the Zoë message travels without 8BITMIME.
    assert all(m.body.isascii() for m in sink.state.messages)


def test_idempotent_retry_queues_once_also_after_a_restart(tmp_path: Path) -> None:
    config = _config(tmp_path / "spool")
    request = {"from": "app@example.com", "recipients": ["bob@example.net"], "text": "hi"}
    key = {"Idempotency-Key": "order-4711"}
    with RunningFerry(config) as f:
        status, headers, first = _post(f, request, headers=key)
        assert status == 200
        assert "Idempotent-Replayed" not in headers
        status, headers, again = _post(f, request, headers=key)
        assert (status, again, headers["Idempotent-Replayed"]) == (200, first, "true")
        assert f.store.count() == 1
        # The same key for another request is the client's mistake (RFC 9110 §15.5.21).
        status, _, doc = _post(f, {**request, "text": "other"}, headers=key)
        assert (status, doc["field"]) == (422, "Idempotency-Key")
        # Keys are per principal: another token's key of the same name is its own.
        status, _, other = _post(f, request, headers={
            **key, "Authorization": f"Bearer {RELAY_TOKEN}"})
        assert status == 200 and other["id"] != first["id"]
        assert f.store.count() == 2
    with RunningFerry(config) as f:
        status, headers, after = _post(f, request, headers=key)
        assert (status, after, headers["Idempotent-Replayed"]) == (200, first, "true")
        assert f.store.count() == 2


def test_back_pressure_is_503_with_retry_after_and_nothing_queued(tmp_path: Path) -> None:
    config = _config(tmp_path / "spool")
    config = dataclasses.replace(config, queue=dataclasses.replace(
        config.queue, min_free_disk=1 << 60))
    with RunningFerry(config) as f:
        status, headers, doc = _post(f, {"from": "app@example.com",
                                          "recipients": ["bob@example.net"], "text": "hi"})
        assert status == 503
        assert headers["Retry-After"].isdigit()
        assert doc["detail"] == "disk space low"
        assert f.store.count() == 0


def test_a_writer_behind_is_429_with_retry_after(tmp_path: Path) -> None:
    config = _config(tmp_path / "spool")
    # queue.max_pending 0 (below what the file allows): the writer counts as behind at once.
    config = dataclasses.replace(config, queue=dataclasses.replace(config.queue,
                                                                   max_pending=0))
    with RunningFerry(config) as f:
        status, headers, doc = _post(f, {"from": "app@example.com",
                                          "recipients": ["bob@example.net"], "text": "hi"})
        assert (status, headers["Retry-After"], doc["detail"]) == (
            429, "1", "queue writer is behind")
        assert f.store.count() == 0


@pytest.mark.parametrize(("doc", "status", "field"), [
    ([1, 2], 400, ""),
    ({"recipients": ["b@example.net"], "text": "x"}, 400, "from"),
    ({"from": 5, "recipients": ["b@example.net"], "text": "x"}, 400, "from"),
    ({"from": "not an address", "recipients": ["b@example.net"], "text": "x"}, 400, "from"),
    ({"from": "a@example.com", "text": "x"}, 400, "recipients"),
    ({"from": "a@example.com", "recipients": [], "text": "x"}, 400, "recipients"),
    ({"from": "a@example.com", "recipients": ["b@example.net", "x y@z"], "text": "x"},
     400, "recipients[1]"),
    ({"from": "a@example.com", "recipients": [{"email": "b@example.net", "substitutions": 1}],
      "text": "x"}, 400, "recipients[0].substitutions"),
    ({"from": "a@example.com", "recipients": ["b@example.net", {"email": "c@"}],
      "text": "x"}, 400, "recipients[1].email"),
    ({"from": "a@example.com", "recipients": [{"email": "b@example.net", "cc": "x"}],
      "text": "x"}, 400, "recipients[0].cc"),
    ({"from": "a@example.com", "recipients": ["b@example.net", "postmaster"],
      "text": "x"}, 400, "recipients[1]"),
    ({"from": "a@example.com", "recipients": [f"r{i}@x.net" for i in range(201)],
      "text": "x"}, 400, "recipients"),
    ({"from": "a@example.com", "recipients": ["b@example.net"]}, 400, "text"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "text": 3}, 400, "text"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "content": "S: x\n\nx",
      "text": "x"}, 400, "text"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "bcc": "x"}, 400, "bcc"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "text": "Hi {{name}}"},
     400, "recipients[0].substitutions.name"),
    ({"from": "a@example.com", "recipients": ["b@example.net"],
      "content": "Subject: x\r\n\r\nbare\rCR\r\n"}, 400, "content"),
    ({"from": "a@example.com", "recipients": ["b@example.net"],
      "content": "Subject: x\n\n" + "y" * 5000}, 413, "content"),
    ({"from": "a@example.com", "recipients": ["b@example.net"],
      "content": "Received: from a\nReceived: from b\nReceived: from c\n\nloop\n"},
     400, "content"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "text": "x",
      "headers": {"Content-Type": "text/html"}}, 400, "headers.Content-Type"),
    ({"from": "a@example.com", "recipients": ["b@example.net"], "text": "x",
      "attachments": [{"filename": "a", "content": "!!not base64!!"}]},
     400, "attachments[0].content"),
])
def test_bad_input_is_a_problem_document_naming_the_field(
        held: RunningFerry, doc: Any, status: int, field: str) -> None:
    got, headers, problem = _post(held, doc)
    assert (got, problem.get("field")) == (status, field), problem
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["status"] == status and problem["detail"].startswith(field or "")
    assert held.store.count() == 0


def test_malformed_json_and_a_bad_idempotency_key(held: RunningFerry) -> None:
    status, _, problem = _post(held, data=b"{nope", headers={
        "Content-Type": "application/json"})
    assert (status, problem["title"]) == (400, "Malformed JSON")
    status, _, problem = _post(held, {"from": "a@example.com"},
                               headers={"Idempotency-Key": "\u00e9t\u00e9"})
    assert (status, problem["field"]) == (400, "Idempotency-Key")


def test_an_untrusted_token_may_only_send_to_accepted_domains(held: RunningFerry) -> None:
    doc = {"from": "app@example.com", "recipients": ["ok@example.com", "far@example.net"],
           "text": "hi"}
    app = {"Authorization": f"Bearer {APP_TOKEN}"}
    status, _, problem = _post(held, doc, headers=app)
    assert (status, problem["field"]) == (403, "recipients[1]")
    assert held.store.count() == 0
    status, _, _ = _post(held, {**doc, "recipients": ["ok@example.com"]}, headers=app)
    assert status == 200
    status, _, _ = _post(held, doc, headers={"Authorization": f"Bearer {RELAY_TOKEN}"})
    assert status == 200
    # The loopback without a token is trusted (http.trust_loopback).
    status, _, _ = _post(held, doc)
    assert status == 200
    assert held.store.count() == 3


class _Collect:
    """An event sink (engine.ops.events) that keeps every record."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, batch: list[dict[str, Any]]) -> None:
        self.events += batch

    def close(self) -> None:
        pass


def test_envelope_and_receive_event_name_the_http_connector(tmp_path: Path) -> None:
    sink = _Collect()
    with RunningFerry(_config(tmp_path / "spool"), sinks=[sink]) as f:
        status, _, doc = _post(f, {"from": "app@example.com", "recipients": ["b@example.com"],
                                   "text": "hi"},
                               headers={"Authorization": f"Bearer {APP_TOKEN}"})
        assert status == 200
        envelope = f.store.get(bytes.fromhex(doc["id"]))
        assert (envelope.receive_connector, envelope.auth_user) == ("http", "app")
        assert envelope.client_address == "127.0.0.1"
        assert envelope.message_id.startswith("<") and envelope.message_id.endswith(".test>")
        (event,) = wait_for(lambda: [e for e in sink.events if e["event"] == "RECEIVE"])
    assert event["id"] == doc["id"]
    assert (event["connector"], event["auth"], event["client"], event["helo"]) == (
        "http", "app", "127.0.0.1", "")
    assert (event["sender"], event["recipients"]) == ("app@example.com", ["b@example.com"])
    assert event["message_id"] == envelope.message_id.strip("<>")


@pytest.mark.parametrize("key", [None, "bulk-1"])
def test_many_personalised_recipients_in_one_request(held: RunningFerry,
                                                     key: str | None) -> None:
    """150 distinct messages: built in a thread, stored in parts as they are built
    (without a key) or in one commit (with one); every id answered is in the queue."""
    count = 150
    doc = {"from": "app@example.com",
           "recipients": [{"email": f"u{i}@example.net", "substitutions": {"n": str(i)}}
                          for i in range(count)],
           "subject": "No. {{n}}", "text": "You are number {{n}}.\n"}
    status, _, answer = _post(held, doc, headers={"Idempotency-Key": key} if key else {})
    assert status == 200, answer
    assert answer["recipients"] == count and len(set(answer["ids"])) == count
    assert held.store.count() == count
    for i in (0, count - 1):
        envelope, body = held.store.get_with_body(bytes.fromhex(answer["ids"][i]))
        assert [r.address for r in envelope.recipients] == [f"u{i}@example.net"]
        msg = email.message_from_bytes(body, policy=email.policy.default)
        assert msg["Subject"] == f"No. {i}"


def test_utf8_addresses_and_8bit_content_set_the_envelope(held: RunningFerry) -> None:
    status, _, doc = _post(held, {"from": "app@example.com", "recipients": ["zoë@exämple.net"],
                                  "content": "Subject: Grüße\n\nÜnïcödé\n"})
    assert status == 200, doc
    envelope, body = held.store.get_with_body(bytes.fromhex(doc["id"]))
    # RFC 6531 (a UTF-8 address and header section) and RFC 6152 (8-bit content).
    assert (envelope.smtputf8, envelope.body_type) == (True, "8BITMIME")
    assert [r.address for r in envelope.recipients] == ["zoë@exämple.net"]
    assert body.endswith("Subject: Grüße\r\n\r\nÜnïcödé\r\n".encode())


def test_a_long_line_is_folded_like_smtp_ingest_does(held: RunningFerry) -> None:
    """RFC 5321 §4.5.3.1.6 (http.long_lines = "wrap"): stored sendable, as over SMTP."""
    status, _, doc = _post(held, {"from": "a@example.com", "recipients": ["b@example.net"],
                                  "content": "Subject: x\n\n" + "z" * 2500 + "\n"})
    assert status == 200
    body = held.store.body(bytes.fromhex(doc["id"]))
    assert max(len(line) for line in body.split(b"\r\n")) <= 998
    assert body.count(b"z") == 2500
