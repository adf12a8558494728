"""The message tracking log end to end: a whole Ferry on loopback receives and delivers
mail to aiosmtpd sinks (MX from a DNS responder the test starts), with the real tracking
sink; the records are read back from its files and through ``ferry track``."""

from __future__ import annotations

import dataclasses
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.config import TrackingConfig, tracking_dir
from engine.ops.tracking import CURRENT, log_files, read_records
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import id_bytes
from engine.server.auth import hash_password
from engine.testing.dns import DnsResponder
from engine.testing.mta import free_port
from engine.testing.rawsmtp import RawClient
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
one.test.        IN MX 10 mx.one.test.
mx.one.test.     IN A 127.0.12.1
slow.test.       IN MX 10 mx.slow.test.
mx.slow.test.    IN A 127.0.12.2
client.test.     IN MX 10 mx.client.test.
mx.client.test.  IN A 127.0.12.3
dead.test.       IN MX 10 mx.dead.test.
mx.dead.test.    IN A 127.0.12.9
tls.test.        IN MX 10 mx.tls.test.
mx.tls.test.     IN A 127.0.12.4
"""

BODY = (b"Subject: where is it\r\nMessage-ID: <track-1@client.test>\r\n\r\n"
        b"Hello\r\n")
ROOT = Path(__file__).resolve().parents[2]


#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.12.1", "127.0.12.2", "127.0.12.3"]


Start = Callable[..., RunningFerry]


@pytest.fixture
def ferry(tmp_path: Path, dns_server: DnsResponder, sink: CountingSink) -> Iterator[Start]:
    running: list[RunningFerry] = []

    def start(tracking: dict[str, Any] | None = None, receive: dict[str, Any] | None = None,
              top: dict[str, Any] | None = None, **delivery: Any) -> RunningFerry:
        config = ferry_config(tmp_path / f"spool{len(running)}", **(receive or {}))
        settings = {"dns": dns_server.address, "mx_port": sink.port, "retry_interval": 0.5,
                    "max_retry_interval": 1.0, "paused": False, **delivery}
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(config.delivery, **settings),
            tracking=TrackingConfig(**(tracking or {})), **(top or {}))
        f = RunningFerry(config)
        running.append(f)
        return f

    yield start
    for f in running:
        f.stop()


def log_dir(f: RunningFerry) -> Path:
    return f.config.tracking.dir or tracking_dir(f.config.spool)


def send(f: RunningFerry, sender: str, rcpts: list[str], body: bytes = BODY) -> str:
    """Send one message; its queue id (from the 250 reply)."""
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, text = client.data(body)
    assert code == 250
    return text.decode().rsplit(" ", 1)[1]


def events(f: RunningFerry, qid: str) -> list[dict[str, Any]]:
    return [r for r in read_records(log_dir(f)) if r["id"] == qid]


def kinds(f: RunningFerry, qid: str) -> list[str]:
    return [r["event"] for r in events(f, qid)]


def test_a_delivered_message_is_received_then_delivered(ferry: Start,
                                                         sink: CountingSink) -> None:
    f = ferry()
    qid = send(f, "a@client.test", ["x@one.test", "y@one.test"])
    wait_for(lambda: kinds(f, qid) == ["RECEIVE", "DELIVER", "DELIVER"], what="the events")
    receive, *delivers = events(f, qid)
    assert receive["message_id"] == "track-1@client.test"  # without the angle brackets
    assert {k: receive[k] for k in ("connector", "client", "helo", "tls", "auth", "sender",
                                    "recipients")} == {
        "connector": "default", "client": "127.0.0.1", "helo": "client.test", "tls": "",
        "auth": "", "sender": "a@client.test", "recipients": ["x@one.test", "y@one.test"]}
    assert receive["size"] > len(BODY)  # with the Received field
    assert "subject" not in receive  # [tracking] subject is off by default
    assert receive["time"].endswith("Z")
    assert sorted(d["recipient"] for d in delivers) == ["x@one.test", "y@one.test"]
    for d in delivers:
        assert (d["host"], d["address"], d["tls"]) == ("mx.one.test",
                                                       f"127.0.12.1:{sink.port}", "")
        assert d["reply"].startswith("250") and d["attempt"] == 1
        assert d["connector"] == "" and 0 <= d["delay"] < 60
        assert d["message_id"] == "track-1@client.test"


def test_a_refused_message_is_failed_with_a_dsn(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@one.test"] = "550 5.1.1 No such user"
    f = ferry()
    qid = send(f, "a@client.test", ["bad@one.test"])
    wait_for(lambda: kinds(f, qid) == ["RECEIVE", "FAIL", "DSN"], what="the events")
    _, fail, dsn = events(f, qid)
    assert (fail["recipient"], fail["reply"], fail["enhanced"], fail["attempt"]) == (
        "bad@one.test", "550 5.1.1 No such user", "5.1.1", 1)
    assert (fail["host"], fail["address"]) == ("mx.one.test", f"127.0.12.1:{sink.port}")
    assert (dsn["action"], dsn["recipients"]) == ("failed", ["bad@one.test"])
    # dsn_id is the report's own queue id: its delivery to the sender is tracked under it.
    wait_for(lambda: kinds(f, dsn["dsn_id"]) == ["DELIVER"], what="the DSN's delivery")
    (delivered,) = events(f, dsn["dsn_id"])
    assert delivered["recipient"] == "a@client.test"


def test_a_deferred_message_is_delivered_later(ferry: Start, sink: CountingSink) -> None:
    sink.state.data_replies["127.0.12.2"] = "451 4.3.0 try later"
    f = ferry()
    qid = send(f, "a@client.test", ["x@slow.test"])
    wait_for(lambda: "DEFER" in kinds(f, qid), what="DEFER")
    sink.state.data_replies["127.0.12.2"] = ""
    wait_for(lambda: kinds(f, qid)[-1:] == ["DELIVER"], what="DELIVER")
    got = kinds(f, qid)
    assert got[0] == "RECEIVE" and set(got[1:-1]) == {"DEFER"}
    defer = events(f, qid)[1]
    assert defer["reply"] == "451 4.3.0 try later" and defer["attempt"] == 1
    assert defer["retry"] > defer["time"]  # ISO times: the next try is later
    assert events(f, qid)[-1]["attempt"] == len(got) - 1


def test_an_expired_message(ferry: Start) -> None:
    f = ferry(max_queue_lifetime=1.5)
    qid = send(f, "a@client.test", ["x@dead.test"])
    wait_for(lambda: "EXPIRE" in kinds(f, qid), what="EXPIRE")
    got = kinds(f, qid)
    assert got[0] == "RECEIVE" and got[-2:] == ["EXPIRE", "DSN"]
    expire = events(f, qid)[-2]
    assert expire["recipient"] == "x@dead.test" and expire["delay"] >= 1.5
    assert "127.0.12.9" in expire["reply"]  # the last reply: the connection failed


def test_no_receive_for_a_message_the_queue_refused(ferry: Start) -> None:
    """RECEIVE follows the commit: a message refused at the end of data (back pressure
    came between MAIL and the final dot) has none; the next one, accepted, has one."""
    f = ferry(paused=True)
    with RawClient(f.host, f.port) as c:
        c.reply()
        c.command(b"EHLO client.test")
        assert c.command(b"MAIL FROM:<a@client.test>").code == 250
        assert c.command(b"RCPT TO:<x@one.test>").code == 250
        assert c.command(b"DATA").code == 354
        f.store.min_free_disk = 1 << 62
        f.store.disk_check_interval = 0
        c.send(BODY + b".\r\n")
        assert c.reply().code == 451
    f.store.min_free_disk = 0
    accepted = send(f, "b@client.test", ["y@one.test"])
    # Records keep the order of their commits: once this one is there, so would be the
    # refused message's, had it been written.
    (receive,) = wait_for(lambda: [r for r in read_records(log_dir(f))])
    assert (receive["id"], receive["sender"]) == (accepted, "b@client.test")


def test_suspend_and_resume_are_tracked_per_message(ferry: Start, sink: CountingSink) -> None:
    f = ferry()
    assert f.app.scheduler is not None
    f.call(f.app.scheduler.suspend("slow.test"))
    qid = send(f, "a@client.test", ["x@slow.test"])
    wait_for(lambda: "SUSPEND" in kinds(f, qid), what="SUSPEND")
    f.call(f.app.scheduler.resume("slow.test"))
    wait_for(lambda: kinds(f, qid) == ["RECEIVE", "SUSPEND", "RESUME", "DELIVER"])
    resume = events(f, qid)[2]
    assert (resume["destination"], resume["recipients"]) == ("slow.test", 1)


def test_tls_and_auth_on_both_sides(ferry: Start, ca: Any,
                                    cert_files: tuple[Path, Path]) -> None:
    """RECEIVE names the TLS and the AUTH user of the session; DELIVER the TLS of the
    connection to the next hop (a second Ferry that offers STARTTLS)."""
    cert, key = cert_files
    tls = {"tls": "starttls", "cert_file": cert, "key_file": key}
    first = ferry(top={"users": {"app": hash_password("s3cret")}},
                  receive={**tls, "relay_authenticated": True, "relay_networks": ()})
    # The next hop: listens where tls.test's MX is, on the port every MX is tried at.
    hop = ferry(receive={**tls, "listen": (("127.0.12.4", first.config.delivery.mx_port),)},
                top={"accepted_domains": ("tls.test",)}, paused=True)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with smtplib.SMTP(first.host, first.port) as client:
        client.ehlo("client.test")
        client.starttls(context=context)
        client.login("app", "s3cret")
        client.sendmail("a@client.test", ["x@tls.test"], BODY)
    (receive,) = wait_for(lambda: [r for r in read_records(log_dir(first))
                                   if r["event"] == "RECEIVE"])
    assert receive["auth"] == "app"
    assert receive["tls"].startswith("TLSv1.") and len(receive["tls"].split()) == 2
    (deliver,) = wait_for(lambda: [r for r in read_records(log_dir(first))
                                   if r["event"] == "DELIVER"])
    assert deliver["tls"].startswith("TLSv1.") and deliver["host"] == "mx.tls.test"
    (received,) = wait_for(lambda: list(read_records(log_dir(hop))))
    assert received["tls"].startswith("TLSv1.") and received["client"] == "127.0.0.1"


def track(directory: Path, *args: str) -> list[dict[str, Any]]:
    """``ferry track --json`` as an operator runs it: its records."""
    out = subprocess.run([sys.executable, "-m", "engine", "track", "--dir", str(directory),
                          "--json", *args], capture_output=True, check=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return [orjson.loads(line) for line in out.stdout.splitlines()]


def test_ferry_track_filters_across_a_rotation(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@one.test"] = "550 5.1.1 No such user"
    # Small files: nearly every batch of records starts a new one.
    f = ferry(tracking={"max_file_size": 700, "subject": True})
    first = send(f, "a@client.test", ["x@one.test", "bad@one.test"])
    other = send(f, "b@client.test", ["y@one.test"],
                 BODY.replace(b"track-1@", b"track-2@"))
    wait_for(lambda: len(kinds(f, first)) == 4 and len(kinds(f, other)) == 2)
    d = log_dir(f)
    assert len(log_files(d)) > 2  # rotated, and read back in time order
    by_mid = track(d, "--message-id", "<track-1@client.test>")
    assert by_mid[0]["event"] == "RECEIVE"
    assert sorted(r["event"] for r in by_mid[1:]) == ["DELIVER", "DSN", "FAIL"]
    assert by_mid[0]["subject"] == "where is it"
    assert by_mid == [r for r in read_records(d) if r["id"] == first]  # as logged
    assert track(d, "--message-id", "track-2@client.test") == events(f, other)
    assert track(d, "--queue-id", other.lower()) == events(f, other)
    assert [r["event"] for r in track(d, "--sender", "B@Client.Test")] == ["RECEIVE",
                                                                             "DELIVER"]
    by_rcpt = track(d, "--recipient", "bad@one.test")
    assert [r["event"] for r in by_rcpt] == ["RECEIVE", "FAIL", "DSN"]
    assert [r["id"] for r in track(d, "--event", "fail", "--event", "DSN")] == [first, first]
    receive_time = events(f, other)[0]["time"]
    later = track(d, "--start", receive_time, "--sender", "b@client.test")
    assert [r["event"] for r in later] == ["RECEIVE", "DELIVER"]
    assert track(d, "--end", events(f, first)[0]["time"]) == []
    table = subprocess.run([sys.executable, "-m", "engine", "track", "--dir", str(d),
                            "--queue-id", other], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = table.stdout.splitlines()
    assert len(lines) == 2 and "RECEIVE" in lines[0] and "sender=b@client.test" in lines[0]
    assert "DELIVER" in lines[1] and "y@one.test" in lines[1] and "host=mx.one.test" in lines[1]


# --- kill -9 during a burst -------------------------------------------------------------------


def test_kill_during_a_burst_leaves_whole_lines_and_only_committed_events(
        tmp_path: Path) -> None:
    """A server killed (SIGKILL) while clients send: every line of the tracking log but a
    last one without its line feed is a whole record, and every message a RECEIVE names
    is in the queue (nothing leaves it: the smarthost refuses connections, so the mail is
    deferred, with DEFER events)."""
    port = free_port()
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{port}",
         "--spool", str(spool), "--hostname", "ferry.test", "--smarthost",
         f"127.0.0.1:{free_port()}", "--retry-interval", "1"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: _greets(port), 30, "the server's greeting")
        stop = threading.Event()
        sent: list[str] = []

        def client() -> None:
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                        for _ in range(20):
                            c.sendmail("a@client.test", ["x@far.test", "y@far.test"], BODY)
                            sent.append("")
                except (OSError, smtplib.SMTPException):
                    return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        directory = tracking_dir(spool)
        # Killed once the log holds a good part of the burst: the writer gathers records
        # for half a second between two writes.
        wait_for(lambda: len(sent) >= 200 and (directory / CURRENT).exists()
                 and (directory / CURRENT).read_bytes().count(b'"RECEIVE"') > 50, 60,
                 "a burst under way, much of it in the log")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    raw = b"".join(p.read_bytes() for p in log_files(directory))
    # SIGKILL may cut the last write between two pages (engine.ops.tracking): only the
    # text after the last line feed may be half a record, and the reader skips it.
    whole = raw[:raw.rfind(b"\n") + 1]
    records = [orjson.loads(line) for line in whole.splitlines()]  # each line whole
    assert list(read_records(directory)) == records
    received = {r["id"] for r in records if r["event"] == "RECEIVE"}
    final = {r["id"] for r in records if r["event"] in ("DELIVER", "FAIL", "EXPIRE")}
    assert len(received) > 50
    store = LmdbQueue(spool / "queue", min_free_disk=0)
    try:
        missing = [qid for qid in received - final if not _queued(store, qid)]
        deferred = {r["id"] for r in records if r["event"] == "DEFER"}
        missing += [qid for qid in deferred - received if not _queued(store, qid)]
    finally:
        store.close_sync()
    assert not missing, f"events for messages the queue does not have: {missing[:5]}"


def _greets(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def _queued(store: LmdbQueue, qid: str) -> bool:
    try:
        store.get(id_bytes(qid))
    except KeyError:
        return False
    return True
