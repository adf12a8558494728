"""Alert rules end to end: a whole Ferry on loopback (MX from a DNS responder the test
starts, aiosmtpd sinks as next hops) with ``[[alert]]`` rules evaluated every 0.1 s; each
fire and clear is seen as the tracking log's ``ALERT`` record, the ``ferry.alerts`` log line
and ``Alerts.active()``."""

from __future__ import annotations

import dataclasses
import logging
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import AlertConfig, AlertsConfig, SendConfig, tracking_dir
from engine.ops.alerts import Alert, Alerts
from engine.ops.events import Event
from engine.ops.tracking import read_records
from engine.testing.dns import DnsResponder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.sink import CountingSink
from engine.testing.wait import wait_for

ZONE = """
$TTL 60
@ IN SOA ns.test. admin.test. 1 60 60 600 60
held.test.       IN MX 10 mx.held.test.
mx.held.test.    IN A 127.0.41.1
dead.test.       IN MX 10 mx.dead.test.
mx.dead.test.    IN A 127.0.41.9
tls.test.        IN MX 10 mx.tls.test.
mx.tls.test.     IN A 127.0.41.4
"""


#: Where the counting sink of tests/integration/conftest.py listens.
SINK_ADDRESSES = ["127.0.41.1"]


Start = Callable[..., RunningFerry]


@pytest.fixture
def ferry(tmp_path: Path, dns_server: DnsResponder, sink: CountingSink) -> Iterator[Start]:
    running: list[RunningFerry] = []

    def start(*rules: AlertConfig, queue: dict[str, Any] | None = None,
              receive: dict[str, Any] | None = None, top: dict[str, Any] | None = None,
              **delivery: Any) -> RunningFerry:
        config = ferry_config(tmp_path / f"spool{len(running)}", **(receive or {}))
        settings = {"dns": dns_server.address, "mx_port": sink.port, "retry_interval": 0.5,
                    "max_retry_interval": 1.0, "paused": False, **delivery}
        config = dataclasses.replace(
            config, delivery=dataclasses.replace(config.delivery, **settings),
            queue=dataclasses.replace(config.queue, **(queue or {})),
            alert=rules, alerts=AlertsConfig(interval=0.1), **(top or {}))
        f = RunningFerry(config)
        running.append(f)
        return f

    yield start
    for f in running:
        f.stop()


def alerts_of(f: RunningFerry) -> Alerts:
    assert f.app.alerts is not None
    return f.app.alerts


def firing(f: RunningFerry, rule: str) -> list[Alert]:
    return [a for a in alerts_of(f).active() if a.rule == rule]


def alert_records(f: RunningFerry, state: str) -> list[Event]:
    return [r for r in read_records(tracking_dir(f.config.spool))
            if r["event"] == "ALERT" and r["state"] == state]


def lines(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "ferry.alerts" and r.getMessage().startswith(start)]


def send(f: RunningFerry, *recipients: str) -> None:
    with smtplib.SMTP(f.host, f.port) as client:
        for rcpt in recipients:
            client.sendmail("app@client.test", [rcpt], b"Subject: alert\r\n\r\nx\r\n")


def test_queue_depth_of_a_suspended_destination_fires_and_clears_once_delivered(
        ferry: Start, sink: CountingSink, caplog: pytest.LogCaptureFixture) -> None:
    rule = AlertConfig(name="held-backlog", metric="queue_depth", destination="held.test",
                       above=2, lasting=0.2)
    f = ferry(rule)
    scheduler = f.app.scheduler
    assert scheduler is not None
    f.call(scheduler.suspend("held.test"))
    caplog.set_level(logging.WARNING, logger="ferry.alerts")
    send(f, "a@held.test", "b@held.test")
    # Two messages are not above 2: two evaluations later, nothing fires.
    wait_for(lambda: len(f.store.ids_for_hop("held.test", 10)) == 2, what="two queued")
    seen = alerts_of(f).evaluations
    wait_for(lambda: alerts_of(f).evaluations >= seen + 2, what="two evaluations")
    assert not firing(f, "held-backlog")
    send(f, "c@held.test")
    (alert,) = wait_for(lambda: firing(f, "held-backlog"), what="the alert firing")
    assert (alert.destination, alert.value, alert.threshold, alert.comparison) == (
        "held.test", 3.0, 2.0, "above")
    assert alert.fired - alert.since >= 0.2  # it held for `lasting` first
    (record,) = wait_for(lambda: alert_records(f, "firing"), what="the ALERT record")
    assert (record["id"], record["message_id"], record["alert"], record["metric"],
            record["destination"], record["value"], record["threshold"],
            record["severity"]) == ("", "", "held-backlog", "queue_depth", "held.test",
                                    3.0, 2.0, "warning")
    (line,) = lines(caplog, "alert held-backlog firing")
    assert line.levelno == logging.WARNING
    assert "queue_depth for held.test is 3 messages, above 2 messages" in line.getMessage()
    # Resumed, the mail is delivered: the queue empties and the alert clears.
    f.call(scheduler.resume("held.test"))
    wait_for(lambda: len(sink.state.messages) == 3, what="three delivered")
    wait_for(lambda: not firing(f, "held-backlog"), what="the alert clearing")
    (cleared,) = wait_for(lambda: alert_records(f, "cleared"), what="the clear record")
    assert cleared["alert"] == "held-backlog" and cleared["value"] < 3
    assert cleared["duration"] >= 0
    wait_for(lambda: lines(caplog, "alert held-backlog cleared"), what="the clear line")


def test_each_unreachable_destination_is_its_own_alert_and_clears_when_removed(
        ferry: Start, caplog: pytest.LogCaptureFixture) -> None:
    rule = AlertConfig(name="stuck", metric="queue_depth", destination="*", above=1,
                       severity="error")
    f = ferry(rule)
    caplog.set_level(logging.WARNING, logger="ferry.alerts")
    send(f, "a@dead.test", "b@dead.test", "c@held.test")
    (alert,) = wait_for(lambda: firing(f, "stuck"), what="the alert for dead.test")
    assert alert.destination == "dead.test" and alert.value == 2.0
    (line,) = wait_for(lambda: lines(caplog, "alert stuck firing"), what="the ERROR line")
    assert line.levelno == logging.ERROR
    # Nothing listens at dead.test's MX: the mail stays deferred until it is removed.
    wait_for(lambda: [r for r in read_records(tracking_dir(f.config.spool))
                      if r["event"] == "DEFER"], what="a deferral")
    assert firing(f, "stuck")
    scheduler = f.app.scheduler
    assert scheduler is not None
    ids = f.store.ids_for_hop("dead.test", 10)
    f.call(scheduler.remove(ids))
    wait_for(lambda: not firing(f, "stuck"), what="the alert clearing")
    (cleared,) = wait_for(lambda: alert_records(f, "cleared"), what="the clear record")
    assert (cleared["destination"], cleared["value"], cleared["severity"]) == (
        "dead.test", 2.0, "error")  # its last figure: the queue has none for it now


def test_back_pressure_and_free_disk_fire_when_min_free_disk_exceeds_the_free_space(
        ferry: Start, caplog: pytest.LogCaptureFixture) -> None:
    floor = 1 << 60  # an exbibyte: more than any disk here has free
    rules = (AlertConfig(name="refusing", metric="back_pressure", above=0),
             AlertConfig(name="disk", metric="free_disk", below=floor, severity="error"))
    caplog.set_level(logging.WARNING, logger="ferry.alerts")
    f = ferry(*rules, queue={"min_free_disk": floor})
    wait_for(lambda: firing(f, "refusing") and firing(f, "disk"), what="both alerts firing")
    assert firing(f, "refusing")[0].value == 1.0
    assert 0 < firing(f, "disk")[0].value < floor
    wait_for(lambda: len(alert_records(f, "firing")) == 2, what="two ALERT records")
    assert {r["alert"] for r in alert_records(f, "firing")} == {"refusing", "disk"}
    assert [r.levelno for r in lines(caplog, "alert disk firing")] == [logging.ERROR]
    # The floor lowered (what a reload of [queue] min_free_disk does): mail is taken again.
    f.store.min_free_disk = 0
    wait_for(lambda: not firing(f, "refusing"), what="back pressure clearing")
    assert firing(f, "disk")
    wait_for(lambda: lines(caplog, "alert refusing cleared"), what="the clear line")


def test_tls_failures_to_a_destination(ferry: Start, sink: CountingSink,
                                       cert_files: tuple[Path, Path]) -> None:
    """A send connector that verifies the next hop's certificate, and a next hop (a second
    Ferry) whose certificate no store here trusts: each handshake fails, and counts."""
    cert, key = cert_files
    strict = SendConfig(name="strict", address_spaces=("tls.test",), tls="verify",
                        port=sink.port)
    rule = AlertConfig(name="tls", metric="tls_failures", destination="tls.test", above=0,
                       window=60.0)
    f = ferry(rule, top={"send": (strict,)})
    hop = ferry(receive={"tls": "starttls", "cert_file": cert, "key_file": key,
                         "listen": (("127.0.41.4", sink.port),)},
                top={"accepted_domains": ("tls.test",)}, paused=True)
    send(f, "x@tls.test")
    (alert,) = wait_for(lambda: firing(f, "tls"), what="the TLS alert")
    assert alert.destination == "tls.test" and alert.value >= 1
    (failure,) = wait_for(lambda: [r for r in read_records(tracking_dir(f.config.spool))
                                   if r["event"] == "TLS_FAIL"][:1], what="TLS_FAIL")
    assert (failure["destination"], failure["host"], failure["tls"]) == (
        "tls.test", "mx.tls.test", "verify")
    assert failure["reason"].startswith("451 4.7.5 TLS handshake with mx.tls.test")
    assert failure["address"] == f"127.0.41.4:{sink.port}"
    assert not list(read_records(tracking_dir(hop.config.spool)))  # nothing got through


def test_no_starttls_where_tls_is_required_counts_as_a_tls_failure(
        ferry: Start, sink: CountingSink) -> None:
    # The sink offers no STARTTLS; the connector requires TLS (RFC 3207 §4: the client
    # decides what to do when the server does not offer it; "required" does not send).
    required = SendConfig(name="required", address_spaces=("held.test",), tls="required",
                          port=sink.port)
    rule = AlertConfig(name="tls", metric="tls_failures", destination="*", above=0)
    f = ferry(rule, top={"send": (required,)})
    send(f, "x@held.test")
    (alert,) = wait_for(lambda: firing(f, "tls"), what="the TLS alert")
    assert alert.destination == "held.test"
    failure = wait_for(lambda: next((r for r in read_records(tracking_dir(f.config.spool))
                                     if r["event"] == "TLS_FAIL"), None), what="TLS_FAIL")
    assert failure["reason"].startswith("451 4.7.10 ") and "STARTTLS" in failure["reason"]
    assert failure["tls"] == "required" and failure["host"] == "mx.held.test"
    assert not sink.state.messages
