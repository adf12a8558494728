"""The admin API (engine.http.admin) and /readyz over a real listener of a whole Ferry
(delivery paused, loopback not trusted, a token of each scope): every route, the same
answers as the control channel and ``ferry queue`` / ``ferry track`` for the same queue,
verbs that change the queue and emit events naming the token, scopes enforced, and
problem documents for bad requests."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from engine.config import AlertConfig, AlertsConfig, HttpConfig, HttpToken
from engine.ops.control import request, socket_path
from engine.ops.readiness import Check
from engine.queue.api import Outcome
from engine.queue.records import RcptState, id_bytes, id_text
from engine.testing.events import Recorder
from engine.testing.server import RunningFerry, ferry_config
from engine.testing.wait import wait_for

TOKENS = {"reader": ("r" * 32, ("read",)), "operator": ("o" * 32, ("read", "admin")),
          "injector": ("i" * 32, ("inject",))}
BODY = (b"Subject: s\r\nMessage-ID: <m1@client.test>\r\n\r\n.leading dot\r\nx\r\n")


def http_config(**changes: Any) -> HttpConfig:
    return HttpConfig(listen=(("127.0.0.1", 0),), trust_loopback=False,
                      tokens={name: HttpToken(token=token, scopes=scopes)
                              for name, (token, scopes) in TOKENS.items()}, **changes)


@pytest.fixture
def ferry(tmp_path: Path) -> Iterator[RunningFerry]:
    config = dataclasses.replace(ferry_config(tmp_path / "spool"), http=http_config())
    with RunningFerry(config) as running:
        yield running


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> Any:
        return orjson.loads(self.body)


def call(f: RunningFerry, method: str, path: str, token: str | None = "operator",
         headers: dict[str, str] | None = None, **kwargs: Any) -> Answer:
    assert f.app.http is not None
    base = f"http://{f.app.http.addresses[0]}"
    headers = {**(headers or {}),
               **({"Authorization": f"Bearer {TOKENS[token][0]}"} if token else {})}

    async def go() -> Answer:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
                method, base + path, headers=headers,
                **kwargs) as answer:
            return Answer(answer.status, dict(answer.headers), await answer.read())

    return asyncio.run(go())


def ok(answer: Answer) -> Any:
    assert answer.status == 200, answer.body
    return answer.doc


def problem(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == "application/problem+json"
    doc: dict[str, Any] = answer.doc
    assert doc["status"] == status
    return doc


def queued(f: RunningFerry, sender: str = "a@client.test",
           recipients: tuple[str, ...] = ("x@one.test", "y@one.test")) -> str:
    before = set(f.store.ids_in_state("pending", 1000))
    with smtplib.SMTP(f.host, f.port) as client:
        client.sendmail(sender, list(recipients), BODY)
    (qid,) = set(f.store.ids_in_state("pending", 1000)) - before
    return id_text(qid)


def ask(f: RunningFerry, **message: object) -> dict[str, Any]:
    return request(socket_path(f.config.spool), message)


def ferry_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_tokens_and_scopes(ferry: RunningFerry) -> None:
    qid = queued(ferry)
    doc = problem(call(ferry, "GET", "/api/v1/queues", token=None), 401)
    assert "Authorization: Bearer" in doc["detail"]
    assert ok(call(ferry, "GET", "/api/v1/queues", token="reader"))["queues"]
    # A read token cannot hold; an inject token can neither remove nor read.
    doc = problem(call(ferry, "POST", f"/api/v1/messages/{qid}/hold", token="reader"), 403)
    assert doc["scope"] == "admin"
    problem(call(ferry, "DELETE", f"/api/v1/messages/{qid}", token="injector"), 403)
    problem(call(ferry, "POST", "/api/v1/queue/remove", token="injector",
                 json={"ids": [qid]}), 403)
    problem(call(ferry, "GET", "/api/v1/messages", token="injector"), 403)
    problem(call(ferry, "GET", "/api/v1/tracking", token=None), 401)
    assert [r.state for r in ferry.store.get(id_bytes(qid)).recipients] == [
        RcptState.PENDING] * 2
    # Probes need no token.
    assert call(ferry, "GET", "/readyz", token=None).status == 200


def test_views_answer_as_ferry_queue_and_the_control_channel(ferry: RunningFerry) -> None:
    first = queued(ferry)
    second = queued(ferry, sender="b@client.test", recipients=("z@two.test",))
    spool = str(ferry.config.spool)

    listed = ok(call(ferry, "GET", "/api/v1/messages", token="reader"))
    cli = ferry_cli("queue", "--spool", spool, "list", "--json")
    assert cli.returncode == 0, cli.stderr
    assert listed == {"messages": [orjson.loads(line) for line in cli.stdout.splitlines()],
                      "shown": 2, "total": 2}
    assert [m["id"] for m in listed["messages"]] == [first, second]

    # The same filters, the same "N of M".
    filtered = ok(call(ferry, "GET", "/api/v1/messages?state=pending&limit=1",
                       token="reader"))
    cli = ferry_cli("queue", "--spool", spool, "list", "--json", "--state", "pending",
                    "--limit", "1")
    assert [orjson.loads(line) for line in cli.stdout.splitlines()] == filtered["messages"]
    assert (filtered["shown"], filtered["total"]) == (1, 2)
    assert "1 of 2 shown" in cli.stderr
    by_recipient = ok(call(ferry, "GET", "/api/v1/messages",
                           params={"recipient": "@TWO.test", "older_than": "0"},
                           token="reader"))
    assert [m["id"] for m in by_recipient["messages"]] == [second]

    shown = ok(call(ferry, "GET", f"/api/v1/messages/{first}", token="reader"))
    cli = ferry_cli("queue", "--spool", spool, "show", "--json", first)
    assert shown == orjson.loads(cli.stdout)
    assert [(r["address"], r["state"]) for r in shown["recipients"]] == [
        ("x@one.test", "pending"), ("y@one.test", "pending")]

    exported = call(ferry, "GET", f"/api/v1/messages/{first}/content", token="reader")
    assert exported.status == 200
    assert exported.headers["Content-Type"] == "message/rfc822"
    cli_export = subprocess.run(
        [sys.executable, "-m", "engine", "queue", "--spool", spool, "export", first],
        capture_output=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert exported.body == cli_export.stdout
    assert exported.body.endswith(b".leading dot\r\nx\r\n")

    rows = ok(call(ferry, "GET", "/api/v1/queues", token="reader"))["queues"]
    control = ask(ferry, command="queues")["queues"]
    fixed = ("destination", "state", "messages", "recipients", "last_error", "next_retry")
    assert [{k: r[k] for k in fixed} for r in rows] == [
        {k: r[k] for k in fixed} for r in control]
    assert [(r["destination"], r["messages"]) for r in rows] == [("one.test", 1),
                                                                 ("two.test", 1)]
    stats = ok(call(ferry, "GET", "/api/v1/stats", token="reader"))
    assert stats["messages"] == ask(ferry, command="stats")["messages"]
    assert ok(call(ferry, "GET", "/api/v1/destinations/suspended", token="reader")) == {
        "destinations": []}


def test_verbs_change_the_queue_and_name_the_token(ferry: RunningFerry) -> None:
    seen = Recorder()
    ferry.app.events.add(seen)
    qid = queued(ferry)
    raw = id_bytes(qid)
    nobody = "00" * 12

    assert ok(call(ferry, "POST", f"/api/v1/messages/{qid}/hold")) == {
        "changed": [qid], "unchanged": [], "missing": []}
    assert [r.state for r in ferry.store.get(raw).recipients] == [RcptState.HELD] * 2
    hold = wait_for(lambda: seen.of("HOLD"))[0]
    assert (hold["id"], hold["by"]) == (qid, "operator")
    # Asked again, through either door: the same answer.
    again = ok(call(ferry, "POST", f"/api/v1/messages/{qid}/hold"))
    assert again == {"changed": [], "unchanged": [qid], "missing": []}
    assert ask(ferry, command="hold", ids=[qid]) == {"ok": True, **again}
    assert len(seen.of("HOLD")) == 1
    doc = problem(call(ferry, "POST", f"/api/v1/messages/{nobody}/hold"), 404)
    assert doc["missing"] == [nobody.upper()]

    # Many at once: by ids (one missing), by a filter.
    assert ok(call(ferry, "POST", "/api/v1/queue/release", json={"ids": [qid, nobody]})) == {
        "changed": [qid], "unchanged": [], "missing": [nobody.upper()]}
    assert wait_for(lambda: seen.of("RELEASE"))[0]["by"] == "operator"
    other = queued(ferry, recipients=("z@two.test",))
    assert ok(call(ferry, "POST", "/api/v1/queue/hold",
                   json={"filter": {"destination": "TWO.test"}}))["changed"] == [other]
    assert ferry.store.get(id_bytes(other)).recipients[0].state is RcptState.HELD
    assert ferry.store.get(raw).recipients[0].state is RcptState.PENDING

    assert ok(call(ferry, "POST", f"/api/v1/messages/{qid}/retry"))["unchanged"] == [qid]
    ferry.call(ferry.store.record([Outcome(raw, 1, RcptState.DEFERRED, "451 later",
                                           due=time.time() + 3600)]))
    assert ok(call(ferry, "POST", f"/api/v1/messages/{qid}/retry"))["changed"] == [qid]
    assert ferry.store.get(raw).recipients[1].due <= time.time()
    assert wait_for(lambda: seen.of("RETRY"))[0]["by"] == "operator"
    ferry.call(ferry.store.record([Outcome(raw, 1, RcptState.DEFERRED, "451 later",
                                           due=time.time() + 3600)]))
    assert ok(call(ferry, "POST", "/api/v1/destinations/ONE.test/retry")) == {
        "destination": "one.test", "recipients": 1}

    assert ok(call(ferry, "POST", "/api/v1/destinations/one.test/suspend")) == {
        "destination": "one.test", "recipients": 2}
    assert ok(call(ferry, "GET", "/api/v1/destinations/suspended", token="reader")) == {
        "destinations": ["one.test"]}
    assert ask(ferry, command="suspended")["destinations"] == ["one.test"]
    suspend = wait_for(lambda: seen.of("SUSPEND"))[0]
    assert (suspend["by"], suspend["destination"]) == ("operator", "one.test")
    assert ok(call(ferry, "POST", "/api/v1/destinations/one.test/resume")) == {
        "destination": "one.test", "recipients": 2, "was_suspended": True}
    assert wait_for(lambda: seen.of("RESUME"))[0]["by"] == "operator"

    removed = ok(call(ferry, "DELETE", f"/api/v1/messages/{qid}?report=true"))
    assert removed["changed"] == [qid]
    (report_id,) = removed["reports"]
    with pytest.raises(KeyError):
        ferry.store.get(raw)
    assert ferry.store.get(id_bytes(report_id)).recipients[0].address == "a@client.test"
    remove = wait_for(lambda: seen.of("REMOVE"))[0]
    assert (remove["by"], remove["report"]) == ("operator", True)
    problem(call(ferry, "GET", f"/api/v1/messages/{qid}", token="reader"), 404)
    assert ok(call(ferry, "POST", "/api/v1/queue/remove",
                   json={"ids": [other], "report": False}))["changed"] == [other]
    assert seen.of("DSN")[0]["dsn_id"] == report_id and len(seen.of("DSN")) == 1


@pytest.mark.parametrize(("method", "path", "body", "says"), [
    ("GET", "/api/v1/messages/not-an-id", None, "not a queue id"),
    ("GET", "/api/v1/messages/not-an-id/content", None, "not a queue id"),
    ("POST", "/api/v1/messages/XYZ/hold", None, "not a queue id"),
    ("DELETE", "/api/v1/messages/XYZ", None, "not a queue id"),
    ("DELETE", "/api/v1/messages/" + "00" * 12 + "?report=maybe", None, "true or false"),
    ("GET", "/api/v1/messages?state=nope", None, "is not one of"),
    ("GET", "/api/v1/messages?older_than=-1", None, "not a number of seconds"),
    ("GET", "/api/v1/messages?larger_than=1.5", None, "not a number of bytes"),
    ("GET", "/api/v1/messages?limit=lots", None, '"limit"'),
    ("GET", "/api/v1/messages?colour=red", None, "unknown query parameter"),
    ("GET", "/api/v1/messages?state=held&state=pending", None, "more than once"),
    ("POST", "/api/v1/queue/hold", {"ids": ["nope"]}, "not a queue id"),
    ("POST", "/api/v1/queue/hold", {"ids": []}, '"ids"'),
    ("POST", "/api/v1/queue/hold", {"filter": {}}, "give queue ids, or filters"),
    ("POST", "/api/v1/queue/hold", {"filter": {"state": 3}}, "must be a string"),
    ("POST", "/api/v1/queue/hold", {"filter": {"size": 3}}, "unknown filter"),
    ("POST", "/api/v1/queue/hold", {"ids": ["00" * 12], "filter": {"state": "held"}},
     "one of the two"),
    ("POST", "/api/v1/queue/hold", {"ids": ["00" * 12], "report": True}, "unknown field"),
    ("POST", "/api/v1/queue/remove", {"ids": ["00" * 12], "report": "yes"}, "true or false"),
    ("POST", "/api/v1/queue/hold", [1, 2], "JSON object"),
    ("POST", "/api/v1/destinations/a%20b/suspend", None, "spaces"),
    ("GET", "/api/v1/tracking?event=NOPE", None, "unknown event"),
    ("GET", "/api/v1/tracking?start=yesterday", None, "ISO 8601"),
])
def test_bad_requests_are_problem_documents(ferry: RunningFerry, method: str, path: str,
                                            body: Any, says: str) -> None:
    answer = call(ferry, method, path, **({"json": body} if body is not None else {}))
    assert says in problem(answer, 400)["detail"]


def test_bad_json_and_unknown_messages(ferry: RunningFerry) -> None:
    problem(call(ferry, "POST", "/api/v1/queue/hold", data=b"{no",
                 headers={"Content-Type": "application/json"}), 400)
    problem(call(ferry, "POST", "/api/v1/queue/hold", data=b"ids",
                 headers={"Content-Type": "text/plain"}), 415)
    nobody = "00" * 12
    assert "no message" in problem(call(ferry, "GET", f"/api/v1/messages/{nobody}",
                                        token="reader"), 404)["detail"]
    problem(call(ferry, "GET", f"/api/v1/messages/{nobody}/content", token="reader"), 404)
    problem(call(ferry, "DELETE", f"/api/v1/messages/{nobody}"), 404)


def test_tracking_search_answers_as_ferry_track(ferry: RunningFerry) -> None:
    first = queued(ferry)
    second = queued(ferry, sender="b@client.test", recipients=("z@two.test",))
    ok(call(ferry, "POST", f"/api/v1/messages/{first}/hold"))
    directory = Path(ferry.config.spool) / "log" / "tracking"

    def logged() -> bool:
        text = (directory / "tracking.log").read_bytes() if directory.is_dir() else b""
        return b'"HOLD"' in text and second.encode() in text

    wait_for(logged, what="the records in the tracking log")
    every = ok(call(ferry, "GET", "/api/v1/tracking", token="reader"))
    cli = ferry_cli("track", "--dir", str(directory), "--json")
    assert every["records"] == [orjson.loads(line) for line in cli.stdout.splitlines()]
    assert every["total"] == every["shown"] >= 3

    found = ok(call(ferry, "GET", "/api/v1/tracking", token="reader",
                    params=[("queue_id", first.lower()), ("event", "hold"),
                            ("event", "RECEIVE")]))
    cli = ferry_cli("track", "--dir", str(directory), "--json", "--queue-id", first.lower(),
                    "--event", "hold", "--event", "RECEIVE")
    assert found["records"] == [orjson.loads(line) for line in cli.stdout.splitlines()]
    assert [r["event"] for r in found["records"]] == ["RECEIVE", "HOLD"]
    assert found["records"][1]["by"] == "operator"
    by_sender = ok(call(ferry, "GET", "/api/v1/tracking?sender=b@client.test&limit=1",
                        token="reader"))
    assert [r["id"] for r in by_sender["records"]] == [second]
    assert (by_sender["shown"], by_sender["total"]) == (1, 1)


def test_readyz(ferry: RunningFerry) -> None:
    answer = call(ferry, "GET", "/readyz", token=None)
    assert answer.status == 200
    assert answer.doc == {"status": "ready", "checks": {
        "queue": {"ok": True}, "disk": {"ok": True}, "receive:default": {"ok": True},
        "http": {"ok": True}}, "alerts": []}
    # What another part adds (an alert that fires) makes it unready, naming it.
    ferry.app.readiness.append(lambda: [Check("alert:queue-depth", False, "fired")])
    answer = call(ferry, "GET", "/readyz", token=None)
    assert answer.status == 503
    assert answer.doc["failing"] == {"alert:queue-depth": "fired"}
    ferry.app.readiness.clear()
    # A receive connector that stopped listening.
    (server,) = ferry.app.connectors[0].servers
    ferry.loop.call_soon_threadsafe(server.close)
    wait_for(lambda: not server.is_serving(), what="the listener closed")
    answer = call(ferry, "GET", "/readyz", token=None)
    assert answer.status == 503
    assert answer.doc["failing"] == {
        "receive:default": "the receive connector is not listening"}


def test_readyz_is_503_while_the_disk_is_below_min_free_disk(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    st = os.statvfs(spool)
    config = ferry_config(spool)
    floor = st.f_bavail * st.f_frsize + (1 << 40)
    config = dataclasses.replace(
        config, http=http_config(), queue=dataclasses.replace(config.queue, min_free_disk=floor),
        alert=(AlertConfig(name="disk", metric="free_disk", below=floor, severity="error"),),
        alerts=AlertsConfig(interval=0.1))
    with RunningFerry(config) as f:
        answer = call(f, "GET", "/readyz", token=None)
        assert answer.status == 503
        doc = answer.doc
        assert doc["status"] == "unready"
        assert set(doc["failing"]) == {"queue", "disk"}
        assert "below queue.min_free_disk" in doc["failing"]["disk"]
        assert doc["failing"]["queue"].startswith("disk space low")
        assert doc["checks"]["receive:default"] == {"ok": True}
        # The alert that fires for it is in the detail.
        alerts = wait_for(lambda: call(f, "GET", "/readyz", token=None).doc["alerts"],
                          what="the free_disk alert in /readyz")
        assert [(a["rule"], a["severity"]) for a in alerts] == [("disk", "error")]
        assert "free_disk is" in alerts[0]["summary"]
