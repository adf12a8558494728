"""Ingest's RECEIVE records (engine.server.ingest.Ingest.committed): built for a whole
commit at once, in the shape Events.emit gives a record.  No sockets, no queue: the
messages are prepared and reported as after their commit."""

from __future__ import annotations

import dataclasses

from engine.config import ReceiveConfig
from engine.ops.events import Events, Kind, bare_message_id
from engine.protocol.command import parse_command
from engine.server.ingest import Arrival, Ingest, Prepared, tls_text
from engine.testing.events import Recorder

BODY = b"Subject: Hello\r\nMessage-ID: <m1@example.com>\r\n\r\nhi\r\n"


def _arrival(client: str, sender: str, held: str = "", tls: str = "") -> Arrival:
    return Arrival(
        connector=dataclasses.replace(ReceiveConfig(), name="in"), client_address=client,
        helo="c.example", esmtp=True, tls=bool(tls), tls_info=tls, auth_user="",
        mail=parse_command(f"MAIL FROM:<{sender}>".encode(), False),
        recipients=(parse_command(b"RCPT TO:<r@example.net>", False),), body=BODY,
        held=held)


def test_a_commits_receives_are_emits_records_in_order_with_holds_after() -> None:
    recorder = Recorder()
    ingest = Ingest(None, "mx.test", lambda domain: "mx:" + domain,  # type: ignore[arg-type]
                    events=Events([recorder]), subject=True)
    tls = "version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384"
    arrivals = [_arrival("192.0.2.1", "a@example.com"), _arrival("192.0.2.1", "b@example.com"),
                _arrival("192.0.2.1", "b@example.com", held="scan: looks odd"),
                _arrival("192.0.2.7", "b@example.com", tls=tls)]
    prepared = [ingest.prepare(a) for a in arrivals]
    assert all(isinstance(p, Prepared) for p in prepared)
    ingest.committed(prepared)  # type: ignore[arg-type]

    expected = Recorder()
    by_emit = Events([expected])
    for p in prepared:
        assert isinstance(p, Prepared)
        env, arrival = p.envelope, p.arrival
        by_emit.emit(Kind.RECEIVE, env.queue_id, bare_message_id(env.message_id),
                     connector=env.receive_connector, client=arrival.client_address,
                     helo=arrival.helo, tls=tls_text(arrival.tls_info),
                     auth=arrival.auth_user, size=env.size, sender=env.sender,
                     recipients=[r.address for r in env.recipients], subject="Hello")
        if arrival.held:
            by_emit.emit(Kind.HOLD, env.queue_id, bare_message_id(env.message_id),
                         by="agent scan", reason="looks odd")
    # Every field, in emit's order; the RECEIVEs of one commit share its time.
    assert [list(r.items())[1:] for r in recorder.events] == [
        list(r.items())[1:] for r in expected.events]
    assert [r["event"] for r in recorder.events] == [
        "RECEIVE", "RECEIVE", "RECEIVE", "HOLD", "RECEIVE"]
    assert len({r["time"] for r in recorder.of("RECEIVE")}) == 1
    assert recorder.events[-1]["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"
