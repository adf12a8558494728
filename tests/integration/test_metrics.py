"""GET /metrics on a real server: Prometheus text that moves as mail flows over SMTP to a
sink on loopback and matches the queue database, and the ``read`` scope it needs."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import trustme
from prometheus_client.parser import text_string_to_metric_families

from engine.config import AlertConfig, AlertsConfig, HttpConfig, HttpToken, WebhookConfig
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
one.test.      IN MX 10 mx.one.test.
mx.one.test.   IN A 127.0.12.1
dead.test.     IN MX 10 mx.dead.test.
mx.dead.test.  IN A 127.0.12.9
"""
ONE_SITE = "mx:mx.one.test"
DEAD_SITE = "mx:mx.dead.test"
BODY = b"Subject: metrics\r\nMessage-ID: <m1@client.test>\r\n\r\nHello\r\n"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(f: RunningFerry, token: str = "") -> tuple[int, str, str]:
    assert f.app.http is not None
    url = f"http://{f.app.http.addresses[0]}/metrics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def go() -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as session, session.get(url,
                                                                   headers=headers) as answer:
            return answer.status, answer.headers["Content-Type"], await answer.text()

    return asyncio.run(go())


def samples(f: RunningFerry) -> Samples:
    status, content_type, text = scrape(f)
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("ferry_")
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.12.1"]


def _config(tmp_path: Path, http: HttpConfig, **delivery: Any) -> Any:
    config = ferry_config(tmp_path / "spool")
    return dataclasses.replace(config, http=http, delivery=dataclasses.replace(
        config.delivery, **delivery))


def test_metrics_move_as_mail_flows_and_match_the_queue(
        tmp_path: Path, dns_server: DnsResponder, sink: CountingSink, ca: trustme.CA,
        cert_files: tuple[Path, Path]) -> None:
    cert, key = cert_files
    config = _config(tmp_path, HttpConfig(listen=(("127.0.0.1", 0),)), paused=False,
                     dns=dns_server.address, mx_port=sink.port, retry_interval=60)
    config = dataclasses.replace(config, receive=(dataclasses.replace(
        config.receive[0], tls="starttls", cert_file=cert, key_file=key),))
    with RunningFerry(config) as f:
        before = samples(f)
        assert value(before, "ferry_build_info", version=__import__("engine").__version__,
                     extensions=_extensions()) == 1
        assert value(before, "ferry_queue_messages") == 0
        assert value(before, "ferry_received_messages_total", connector="default",
                     outcome="accepted") == 0

        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP(f.host, f.port) as client:
            client.starttls(context=context)
            client.ehlo("client.test")
            client.mail("a@client.test")
            assert client.rcpt("x@one.test")[0] == 250
            assert client.rcpt("y@dead.test")[0] == 250
            assert client.docmd("RCPT", "TO:<no address>")[0] == 501  # the protocol refuses
            assert client.data(BODY)[0] == 250
            # A message over the hop limit: refused at the end of its data, with its
            # recipient (RFC 5321 §6.3).
            looped = b"Received: from a\r\n" * 100 + BODY
            client.mail("a@client.test")
            client.rcpt("z@one.test")
            assert client.data(looped)[0] == 554
            during = samples(f)
            assert value(during, "ferry_connections_in", connector="default") == 1

        wait_for(lambda: len(sink.state.messages) == 1, what="delivered to one.test")
        after = wait_for(lambda: (lambda s: s if value(
            s, "ferry_deferred_recipients_total", site=DEAD_SITE) >= 1 and value(
            s, "ferry_delivered_recipients_total", site=ONE_SITE) == 1 else None)(samples(f)),
            what="the delivery and the deferral counted")

        def at(name: str, **labels: str) -> float:
            return value(after, name, **labels)

        assert at("ferry_received_messages_total", connector="default", outcome="accepted") == 1
        assert at("ferry_received_recipients_total", connector="default",
                  outcome="accepted") == 2
        assert at("ferry_received_messages_total", connector="default",
                  outcome="rejected_5xx") == 1
        # the 501 RCPT, and the recipient of the refused message
        assert at("ferry_received_recipients_total", connector="default",
                  outcome="rejected_5xx") == 2
        assert at("ferry_received_messages_total", connector="default",
                  outcome="rejected_4xx") == 0
        assert at("ferry_tls_in_handshakes_total", connector="default") == 1
        assert at("ferry_tls_in_failures_total", connector="default") == 0
        assert at("ferry_failed_recipients_total", site=ONE_SITE) == 0
        assert at("ferry_connections_out_opened_total", agent="smtp") >= 1
        assert at("ferry_dns_query_seconds_count") >= 2  # the MX and A lookups
        assert at("ferry_queue_commit_seconds_count") >= 2  # the message, the outcomes
        assert at("ferry_queue_commit_writes_sum") >= 2
        # The queue as the database says: the message waits for dead.test, deferred.
        assert at("ferry_queue_messages") == f.store.count() == 1
        deferred = f.store.ids_in_state("deferred", 100)
        assert at("ferry_queue_state_messages", state="deferred") == len(deferred) == 1
        assert at("ferry_queue_state_messages", state="pending") == len(
            f.store.ids_in_state("pending", 100)) == 0
        assert at("ferry_queue_oldest_message_age_seconds") > 0
        assert at("ferry_back_pressure", reason="disk space low") == 0
        assert at("ferry_connections_in", connector="default") == 0
        # The site that took no connection is marked down.
        assert at("ferry_site_down", site=DEAD_SITE) == 1

        # Removing the message empties the queue, and the gauges say so.
        f.call(_remove(f, deferred))
        emptied = wait_for(lambda: (lambda s: s if value(s, "ferry_queue_messages") == 0
                                    else None)(samples(f)), what="the queue emptied")
        assert value(emptied, "ferry_queue_state_messages", state="deferred") == 0
        assert value(emptied, "ferry_queue_oldest_message_age_seconds") == 0


async def _remove(f: RunningFerry, ids: list[bytes]) -> None:
    assert f.app.scheduler is not None
    await f.app.scheduler.remove(ids, report=False)


def _extensions() -> str:
    from engine import _speedups

    _speedups.status()
    return ",".join(sorted(n for n, on in _speedups.active.items() if on)) or "none"


def test_read_scope_is_needed_to_scrape(tmp_path: Path) -> None:
    http = HttpConfig(listen=(("127.0.0.1", 0),), trust_loopback=False, tokens={
        "prometheus": HttpToken(token="r" * 32, scopes=("read",)),
        "app": HttpToken(token="i" * 32, scopes=("inject",))})
    with RunningFerry(_config(tmp_path, http)) as f:
        status, _, text = scrape(f, "r" * 32)
        assert status == 200
        assert any(family.name == "ferry_queue_messages"
                   for family in text_string_to_metric_families(text))
        status, content_type, text = scrape(f, "i" * 32)
        assert (status, content_type) == (403, "application/problem+json")
        assert '"insufficient_scope"' not in text and '"read"' in text
        status, _, _ = scrape(f)
        assert status == 401


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_alerts_firing_and_webhook_backlog(tmp_path: Path) -> None:
    config = dataclasses.replace(
        _config(tmp_path, HttpConfig(listen=(("127.0.0.1", 0),))),
        alert=(AlertConfig(name="backlog", metric="queue_depth", destination="*", above=0),),
        alerts=AlertsConfig(interval=0.1),
        # A receiver that is not there: the RECEIVE events wait for it.
        webhook=(WebhookConfig(name="crm", url=f"http://127.0.0.1:{_closed_port()}/",
                               secret="s" * 16, events=("RECEIVE",), retry_interval=60.0),))
    with RunningFerry(config) as f:
        assert not any(name == "ferry_alert_firing" for name, _ in samples(f))
        with smtplib.SMTP(f.host, f.port) as client:  # delivery is paused: it stays
            client.sendmail("a@client.test", ["x@one.test"], BODY)
        firing = ("ferry_alert_firing", frozenset(
            {("rule", "backlog"), ("destination", "one.test"), ("severity", "warning")}))
        assert wait_for(lambda: samples(f).get(firing), what="the alert firing") == 1

        assert wait_for(lambda: value(samples(f), "ferry_webhook_backlog", webhook="crm"),
                        what="the webhook's backlog") == 1


def test_queue_depth_per_destination_with_the_rest_as_other(tmp_path: Path) -> None:
    config = _config(tmp_path, HttpConfig(listen=(("127.0.0.1", 0),), metrics_destinations=1))
    with RunningFerry(config) as f:
        with smtplib.SMTP(f.host, f.port) as client:  # delivery is paused: they stay
            for rcpt in ("a@one.test", "b@one.test", "c@two.test"):
                client.sendmail("s@client.test", [rcpt], BODY)
        # Each scrape starts the walk that the next one reads.
        def walked() -> Samples | None:
            found = samples(f)
            depth = value(found, "ferry_queue_destination_messages", destination="one.test")
            return found if depth == 2 else None

        found = wait_for(walked, what="one.test's depth")
        assert value(found, "ferry_queue_destination_messages", destination="(other)") == 1
        assert ("ferry_queue_destination_messages",
                frozenset({("destination", "two.test")})) not in found
        assert value(found, "ferry_queue_destination_oldest_seconds",
                     destination="one.test") >= 0
