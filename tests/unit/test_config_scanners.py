"""[agents.rspamd] and [agents.clamav]: their keys load, and each bad value names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import MiB, load_config
from tests.unit.test_config import one_problem, write


def test_defaults() -> None:
    agents = load_config(None).agents
    assert agents.rspamd.url == "http://127.0.0.1:11333"
    assert (agents.rspamd.password, agents.rspamd.fail) == ("", "open")
    assert (agents.rspamd.reject_action, agents.rspamd.soft_reject_action,
            agents.rspamd.greylist_action) == ("reject", "tempfail", "tempfail")
    assert (agents.rspamd.header, agents.rspamd.spam_header) == ("X-Spamd-Result", "X-Spam")
    assert agents.rspamd.max_size == 20 * MiB
    assert agents.clamav.address == "unix:/run/clamav/clamd.ctl"
    assert (agents.clamav.action, agents.clamav.on_oversize) == ("reject", "accept")
    assert (agents.clamav.max_size, agents.clamav.max_concurrent) == (25 * MiB, 10)
    assert (agents.clamav.scanned_header, agents.clamav.fail) == ("", "closed")


def test_keys_load(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[agents.rspamd]
url = "https://rspamd.example:11333/"
password = "s3cret"
reject_action = "hold"
soft_reject_action = "tag"
greylist_action = "accept"
header = "X-Rspamd-Result"
spam_header = ""
max_size = "5MiB"

[agents.clamav]
address = "[::1]:3310"
action = "hold"
max_size = "10M"
on_oversize = "tempfail"
max_concurrent = 3
scanned_header = "X-Virus-Scanned"
"""))
    r, c = config.agents.rspamd, config.agents.clamav
    assert (r.url, r.password, r.reject_action, r.soft_reject_action, r.greylist_action) == (
        "https://rspamd.example:11333/", "s3cret", "hold", "tag", "accept")
    assert (r.header, r.spam_header, r.max_size) == ("X-Rspamd-Result", "", 5 * MiB)
    assert "s3cret" not in repr(r)
    assert (c.address, c.action, c.max_size, c.on_oversize, c.max_concurrent,
            c.scanned_header) == ("[::1]:3310", "hold", 10**7, "tempfail", 3, "X-Virus-Scanned")


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[agents.rspamd]\nurl = "ftp://x.example"', "agents.rspamd.url", '"http://"'),
        ('[agents.rspamd]\nreject_action = "drop"', "agents.rspamd.reject_action", '"hold"'),
        ('[agents.rspamd]\nsoft_reject_action = "reject"', "agents.rspamd.soft_reject_action",
         '"tempfail"'),
        ('[agents.rspamd]\ngreylist_action = "hold"', "agents.rspamd.greylist_action",
         '"accept"'),
        ('[agents.rspamd]\nheader = "X-Spam Result"', "agents.rspamd.header", "field name"),
        ('[agents.rspamd]\nspam_header = "X:Spam"', "agents.rspamd.spam_header", "field name"),
        ("[agents.rspamd]\nmax_size = 0", "agents.rspamd.max_size", "positive"),
        ('[agents.clamav]\naddress = "unix:clamd.ctl"', "agents.clamav.address", "absolute"),
        ('[agents.clamav]\naddress = "127.0.0.1"', "agents.clamav.address", "needs a port"),
        ('[agents.clamav]\naction = "tag"', "agents.clamav.action", '"reject", "hold"'),
        ('[agents.clamav]\non_oversize = "reject"', "agents.clamav.on_oversize", '"accept"'),
        ("[agents.clamav]\nmax_concurrent = 0", "agents.clamav.max_concurrent", "positive"),
        ('[agents.clamav]\nmax_size = "lots"', "agents.clamav.max_size", "size"),
    ],
)
def test_each_error_names_its_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    found = one_problem(tmp_path, text + "\n")
    assert found.startswith(f"{key}: "), found
    assert words in found, found


def test_password_is_never_echoed(tmp_path: Path) -> None:
    found = one_problem(tmp_path, '[agents.rspamd]\npassword = ""\n')
    assert found.startswith("agents.rspamd.password: ") and "not shown" in found
