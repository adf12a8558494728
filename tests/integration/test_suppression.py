"""Bounce classes and the suppression list end to end: a whole Ferry on loopback delivers
by MX (a DNS responder the test starts) to a real SMTP sink that refuses some recipients;
the tracking log says each failure's category, a hard one puts the recipient on the list,
and the next message to it is refused at RCPT; ``ferry suppress`` (a separate process)
and the admin API change the list of the running server; HTTP injection fails suppressed
recipients; the list outlives a restart."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import smtplib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from engine.config import (
    BounceRuleConfig,
    HttpConfig,
    HttpToken,
    SuppressionConfig,
    TrackingConfig,
    tracking_dir,
)
from engine.ops.tracking import read_records
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
one.test.        IN MX 10 mx.one.test.
mx.one.test.     IN A 127.0.31.1
client.test.     IN MX 10 mx.client.test.
mx.client.test.  IN A 127.0.31.2
"""
SINK_ADDRESSES = ["127.0.31.1", "127.0.31.2"]
BODY = b"Subject: hello\r\nMessage-ID: <supp-1@client.test>\r\n\r\nHello\r\n"
RELAY_TOKEN = "r" * 32
ADMIN_TOKEN = "o" * 32
READ_TOKEN = "e" * 32

Start = Callable[..., RunningFerry]


@pytest.fixture
def ferry(tmp_path: Path, dns_server: DnsResponder, sink: CountingSink) -> Iterator[Start]:
    running: list[RunningFerry] = []

    def start(spool: str = "spool", **top: Any) -> RunningFerry:
        config = ferry_config(tmp_path / spool)
        tokens = {"relay": HttpToken(token=RELAY_TOKEN, scopes=("inject",), trusted=True),
                  "operator": HttpToken(token=ADMIN_TOKEN, scopes=("read", "admin")),
                  "reader": HttpToken(token=READ_TOKEN, scopes=("read",))}
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(
                config.delivery, dns=dns_server.address, mx_port=sink.port, paused=False,
                retry_interval=0.5, max_retry_interval=1.0),
            tracking=TrackingConfig(),
            http=HttpConfig(listen=(("127.0.0.1", 0),), tokens=tokens), **top)
        f = RunningFerry(config)
        running.append(f)
        return f

    with _shipped_bounces():
        yield start
        for f in running:
            f.stop()


def send(f: RunningFerry, rcpts: list[str]) -> tuple[str, dict[str, tuple[int, str]]]:
    """One message from a relaying client: its queue id ("" when no recipient was taken)
    and each recipient's RCPT reply."""
    replies: dict[str, tuple[int, str]] = {}
    with smtplib.SMTP(f.host, f.port) as client:
        client.ehlo("client.test")
        client.mail("a@client.test")
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            replies[rcpt] = (code, text.decode())
        if not any(code == 250 for code, _ in replies.values()):
            client.rset()
            return "", replies
        code, text = client.data(BODY)
    assert code == 250
    return text.decode().rsplit(" ", 1)[1], replies


def records(f: RunningFerry, qid: str) -> list[dict[str, Any]]:
    log = f.config.tracking.dir or tracking_dir(f.config.spool)
    return [r for r in read_records(log) if r["id"] == qid]


def kinds(f: RunningFerry, qid: str) -> list[str]:
    return [r["event"] for r in records(f, qid)]


def http(f: RunningFerry, method: str, path: str, token: str, doc: Any = None
         ) -> tuple[int, Any]:
    assert f.app.http is not None
    url = f"http://{f.app.http.addresses[0]}{path}"

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session, session.request(
                method, url, json=doc, headers={"Authorization": f"Bearer {token}"}) as answer:
            return answer.status, await answer.json(content_type=None)

    return asyncio.run(go())


def ferry_suppress(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", "suppress", "--spool", str(spool),
                           *args], capture_output=True, text=True, timeout=60)


def suppressed(f: RunningFerry, address: str) -> bool:
    assert f.app.suppression is not None
    return f.app.suppression.check(address) is not None


def test_a_hard_bounce_is_classified_suppressed_and_refused_next_time(
        ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@one.test"] = "550 5.1.1 <bad@one.test>: No such user"
    f = ferry()
    qid, _ = send(f, ["bad@one.test", "good@one.test"])
    wait_for(lambda: sorted(kinds(f, qid)) == ["DELIVER", "DSN", "FAIL", "RECEIVE"],
             what="the events")
    (fail,) = [r for r in records(f, qid) if r["event"] == "FAIL"]
    assert (fail["recipient"], fail["category"]) == ("bad@one.test", "bad-mailbox")
    # The DSN's diagnostic is the reply as the server gave it, whatever the category.
    report = wait_for(lambda: [m for m in sink.state.messages if m.sender in ("", "<>")],
                      what="the DSN at the sender's MX")
    assert b"smtp; 550 5.1.1 <bad@one.test>: No such user" in report[0].body
    wait_for(lambda: suppressed(f, "bad@one.test"), what="the automatic entry")
    assert not suppressed(f, "good@one.test")
    _, replies = send(f, ["bad@one.test", "good@one.test"])
    assert replies["bad@one.test"] == (
        550, "5.1.1 <bad@one.test>: recipient is suppressed "
             "(bad-mailbox: 550 5.1.1 <bad@one.test>: No such user)")
    assert replies["good@one.test"][0] == 250
    # Case does not matter (no large receiver treats local parts case-sensitively).
    _, replies = send(f, ["BAD@One.Test"])
    assert replies["BAD@One.Test"][0] == 550


def test_a_deferral_is_classified_and_suppresses_nothing(ferry: Start,
                                                          sink: CountingSink) -> None:
    sink.state.rcpt_replies["slow@one.test"] = (
        "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected "
        "volume or user complaints")
    f = ferry()
    qid, _ = send(f, ["slow@one.test"])
    defer = wait_for(lambda: [r for r in records(f, qid) if r["event"] == "DEFER"],
                     what="the DEFER")[0]
    assert defer["category"] == "policy"
    assert defer["reply"].startswith("421 4.7.0 [TSS04]")
    assert not suppressed(f, "slow@one.test")


def test_operator_rules_and_auto_categories_come_from_the_configuration(
        ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["full@one.test"] = "550 mailbox full and then some"
    sink.state.rcpt_replies["gone@one.test"] = "550 5.1.1 No such user"
    f = ferry(bounce_rule=(BounceRuleConfig(category="quota", code=550, text="full"),),
              suppression=SuppressionConfig(auto_categories=("quota",)))
    qid, _ = send(f, ["full@one.test", "gone@one.test"])
    wait_for(lambda: kinds(f, qid).count("FAIL") == 2, what="two FAILs")
    categories = {r["recipient"]: r["category"] for r in records(f, qid)
                  if r["event"] == "FAIL"}
    assert categories == {"full@one.test": "quota", "gone@one.test": "bad-mailbox"}
    wait_for(lambda: suppressed(f, "full@one.test"), what="the quota entry")
    assert not suppressed(f, "gone@one.test")  # bad-mailbox is not listed here


def test_the_cli_changes_the_running_servers_list(ferry: Start, tmp_path: Path) -> None:
    f = ferry()
    spool = tmp_path / "spool"
    done = ferry_suppress(spool, "add", "x@one.test", "--reason", "asked to stop",
                          "--category", "policy")
    assert done.returncode == 0, done.stderr
    _, replies = send(f, ["x@one.test"])
    assert replies["x@one.test"] == (
        550, "5.1.1 <x@one.test>: recipient is suppressed (policy: asked to stop)")
    listed = ferry_suppress(spool, "list", "--json")
    (entry,) = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert (entry["address"], entry["source"], entry["category"]) == (
        "x@one.test", "operator", "policy")
    assert ferry_suppress(spool, "list", "--category", "quota").stdout == ""
    assert ferry_suppress(spool, "remove", "x@one.test").returncode == 0
    _, replies = send(f, ["x@one.test"])
    assert replies["x@one.test"][0] == 250
    again = ferry_suppress(spool, "remove", "x@one.test")
    assert again.returncode == 1 and "not suppressed" in again.stderr
    bad = ferry_suppress(spool, "add", "not-an-address")
    assert bad.returncode == 1 and "not an address" in bad.stderr


def test_a_client_that_may_not_relay_is_not_refused(ferry: Start) -> None:
    f = ferry(accepted_domains=("one.test",))
    connector = dataclasses.replace(f.config.receive[0], relay_networks=())
    f.stop()
    f = ferry(accepted_domains=("one.test",), receive=(connector,))
    assert f.app.suppression is not None
    f.call(f.app.suppression.add("x@one.test"))
    _, replies = send(f, ["x@one.test"])  # inbound mail for our own domain
    assert replies["x@one.test"][0] == 250


def test_off_means_not_refused(ferry: Start) -> None:
    f = ferry(suppression=SuppressionConfig(enabled=False))
    assert f.app.suppression is not None
    f.call(f.app.suppression.add("x@one.test"))
    _, replies = send(f, ["x@one.test"])
    assert replies["x@one.test"][0] == 250


def test_http_injection_fails_the_suppressed_recipients(ferry: Start) -> None:
    f = ferry()
    assert f.app.suppression is not None
    f.call(f.app.suppression.add("x@one.test", "unsubscribed"))
    status, doc = http(f, "POST", "/api/v1/messages", RELAY_TOKEN, {
        "from": "a@client.test", "recipients": ["x@one.test", "y@one.test"], "text": "hi"})
    assert status == 200, doc
    assert doc["recipients"] == 1 and len(doc["ids"]) == 1
    assert doc["suppressed"] == [{
        "recipient": "x@one.test", "field": "recipients[0]",
        "reply": "550 5.1.1 <x@one.test>: recipient is suppressed (unsubscribed)"}]
    envelope = f.store.get(bytes.fromhex(doc["id"]))
    assert [r.address for r in envelope.recipients] == ["y@one.test"]
    status, doc = http(f, "POST", "/api/v1/messages", RELAY_TOKEN, {
        "from": "a@client.test", "recipients": ["X@one.test"], "text": "hi"})
    assert status == 422 and doc["suppressed"][0]["recipient"] == "X@one.test"


def test_admin_api_adds_lists_and_removes(ferry: Start) -> None:
    f = ferry()
    base = "/api/v1/suppressions"
    status, _ = http(f, "POST", base, READ_TOKEN, {"address": "x@one.test"})
    assert status == 403  # changes need the admin scope
    status, entry = http(f, "POST", base, ADMIN_TOKEN,
                         {"address": "X@one.test", "reason": "complaint",
                          "category": "policy"})
    assert status == 200 and entry["address"] == "x@one.test"
    status, _ = http(f, "POST", base, ADMIN_TOKEN, {"address": "y@one.test", "bad": 1})
    assert status == 400
    for n in range(3):
        http(f, "POST", base, ADMIN_TOKEN, {"address": f"z{n}@one.test"})
    status, page = http(f, "GET", f"{base}?limit=2", READ_TOKEN)
    assert status == 200 and page["total"] == 4
    assert [e["address"] for e in page["entries"]] == ["x@one.test", "z0@one.test"]
    status, rest = http(f, "GET", f"{base}?limit=2&after={page['next']}", READ_TOKEN)
    assert [e["address"] for e in rest["entries"]] == ["z1@one.test", "z2@one.test"]
    assert rest["next"] == ""
    status, only = http(f, "GET", f"{base}?category=policy", READ_TOKEN)
    assert [e["address"] for e in only["entries"]] == ["x@one.test"]
    assert http(f, "GET", f"{base}/x@one.test", READ_TOKEN)[0] == 200
    assert http(f, "DELETE", f"{base}/x@one.test", ADMIN_TOKEN)[0] == 200
    assert http(f, "DELETE", f"{base}/x@one.test", ADMIN_TOKEN)[0] == 404
    assert http(f, "GET", f"{base}/x@one.test", READ_TOKEN)[0] == 404


def test_the_list_outlives_a_restart_and_takes_a_stopped_spools_changes(
        ferry: Start, tmp_path: Path) -> None:
    f = ferry()
    assert f.app.suppression is not None
    f.call(f.app.suppression.add("kept@one.test", "kept"))
    f.stop()
    spool = tmp_path / "spool"
    done = ferry_suppress(spool, "add", "offline@one.test", "--reason", "while stopped")
    assert done.returncode == 0, done.stderr
    assert "kept@one.test" in ferry_suppress(spool, "list").stdout
    f = ferry()
    _, replies = send(f, ["kept@one.test", "offline@one.test", "other@one.test"])
    assert [replies[a][0] for a in ("kept@one.test", "offline@one.test",
                                    "other@one.test")] == [550, 550, 250]


def test_auto_entries_expire_after_max_age(ferry: Start, sink: CountingSink) -> None:
    sink.state.rcpt_replies["bad@one.test"] = "550 5.1.1 No such user"
    f = ferry(suppression=SuppressionConfig(max_age=3600.0))
    send(f, ["bad@one.test"])
    wait_for(lambda: suppressed(f, "bad@one.test"), what="the automatic entry")
    listing = f.app.suppression
    assert listing is not None
    found = listing.entry("bad@one.test")
    assert found is not None and found.source == "auto"
    added = found.added

    async def check(now: float) -> bool:  # on the server's loop: a miss deletes the entry
        return listing.check("bad@one.test", now) is not None

    assert f.call(check(added + 3599))
    assert not f.call(check(added + 3601))
    assert "bad@one.test" not in listing.entries
    f.stop()
    f = ferry()  # the deletion was stored
    assert not suppressed(f, "bad@one.test")


def test_a_reload_applies_the_bounce_rules_and_the_suppression_table(tmp_path: Path) -> None:
    from engine.config import load_config
    from engine.scheduler import bounces

    path = tmp_path / "ferry.toml"
    head = """
hostname = "ferry.test"
spool = "spool"
[queue]
min_free_disk = 0
[delivery]
paused = true
dns = "127.0.0.1:9"
[[receive]]
listen = ["127.0.0.1:0"]
relay_networks = ["127.0.0.0/8"]
"""
    path.write_text(head, encoding="utf-8")
    with RunningFerry(load_config(path), path=path) as f, _shipped_bounces():
        assert f.app.suppression is not None
        f.call(f.app.suppression.add("x@one.test"))
        assert send(f, ["x@one.test"])[1]["x@one.test"][0] == 550
        assert bounces.classify("550 5.7.1 go away") == "policy"
        path.write_text(head + """
[suppression]
enabled = false
[[bounce_rule]]
category = "content"
text = "go away"
""", encoding="utf-8")
        result = f.call(f.app.reload())
        assert set(result.applied) == {"bounce_rule[0] (added)", "suppression.enabled"}
        assert send(f, ["x@one.test"])[1]["x@one.test"][0] == 250
        assert bounces.classify("550 5.7.1 go away") == "content"


@contextlib.contextmanager
def _shipped_bounces() -> Iterator[None]:
    """The process's bounce table back as shipped afterwards (servers in this process
    share it: engine.scheduler.bounces.configure)."""
    from engine.scheduler import bounces

    try:
        yield
    finally:
        bounces.configure([])
