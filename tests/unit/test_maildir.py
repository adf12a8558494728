"""Maildir delivery: the safe write into new/, the path rules, disk errors deferred."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.client.maildir import MaildirAgent
from engine.queue.records import Envelope, RcptState, Recipient
from engine.routing.api import Route

BODY = b"Subject: hi\r\n\r\n.dot line\r\nend\r\n"


def route(template: str) -> Route:
    return Route("example.net", "local", (), protocol="maildir", maildir=template)


def deliver(
    template: str,
    *rcpts: str,
    sender: str = "a@client.test",
    indexes: list[int] | None = None,
    body: bytes = BODY,
) -> list[Any]:
    env = Envelope(sender, [Recipient(r, "example.net") for r in rcpts])
    agent = MaildirAgent(hostname="host.test")
    chosen = list(range(len(rcpts))) if indexes is None else indexes
    return asyncio.run(agent.deliver(route(template), env, chosen, body))


def test_delivers_into_new_with_return_path_and_delivered_to(tmp_path: Path) -> None:
    template = str(tmp_path / "{domain}" / "{local}")
    (result,) = deliver(template, "User.Name@Example.NET", sender="s@client.test")
    assert result.state is RcptState.DELIVERED and result.reply.startswith("250 2.0.0")
    assert result.index == 0 and result.remote == ""
    folder = tmp_path / "example.net" / "user.name"
    assert sorted(p.name for p in folder.iterdir()) == ["cur", "new", "tmp"]
    (message,) = list((folder / "new").iterdir())
    assert list((folder / "tmp").iterdir()) == []
    assert message.read_bytes() == (
        b"Return-Path: <s@client.test>\r\nDelivered-To: <User.Name@Example.NET>\r\n" + BODY
    )
    assert ".host.test," in message.name and message.name.endswith(f",S={message.stat().st_size}")
    assert oct(message.stat().st_mode & 0o777) == "0o600"


def test_null_sender_and_unique_names(tmp_path: Path) -> None:
    template = str(tmp_path / "{local}")
    results = deliver(template, "u@example.net", "U@example.net", sender="")
    assert [r.state for r in results] == [RcptState.DELIVERED, RcptState.DELIVERED]
    files = list((tmp_path / "u" / "new").iterdir())
    assert len(files) == 2 and files[0].name != files[1].name
    assert all(f.read_bytes().startswith(b"Return-Path: <>\r\n") for f in files)


def test_only_the_chosen_recipients(tmp_path: Path) -> None:
    results = deliver(str(tmp_path / "{local}"), "a@x.test", "b@x.test", "c@x.test", indexes=[2])
    assert [(r.index, r.state) for r in results] == [(2, RcptState.DELIVERED)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.mark.parametrize("local", ["../etc", ".hidden", "..", "a/b", "a\\b", "x\x01y"])
def test_unsafe_local_parts_are_refused(tmp_path: Path, local: str) -> None:
    (result,) = deliver(str(tmp_path / "{domain}" / "{local}"), f"{local}@example.net")
    assert (result.state, result.reply) == (RcptState.FAILED, "550 5.1.1 Mailbox name not allowed")
    assert list(tmp_path.iterdir()) == []


def test_unsafe_domain_is_refused(tmp_path: Path) -> None:
    (result,) = deliver(str(tmp_path / "{domain}" / "{local}"), "u@..")
    assert result.state is RcptState.FAILED and list(tmp_path.iterdir()) == []


def test_disk_errors_are_deferred(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    (result,) = deliver(str(blocker / "{local}"), "u@example.net")
    assert result.state is RcptState.DEFERRED and result.reply.startswith("451 4.3.0")
    assert "\n" not in result.reply and "\r" not in result.reply


def test_missing_or_bad_template_is_deferred(tmp_path: Path) -> None:
    (missing,) = deliver("", "u@example.net")
    (bad,) = deliver(str(tmp_path / "{nope}"), "u@example.net")
    assert missing.state is RcptState.DEFERRED and missing.reply.startswith("451 4.3.5")
    assert bad.state is RcptState.DEFERRED and list(tmp_path.iterdir()) == []


def test_no_recipients_no_work(tmp_path: Path) -> None:
    assert deliver(str(tmp_path / "{local}"), "u@example.net", indexes=[]) == []
    assert list(tmp_path.iterdir()) == []
