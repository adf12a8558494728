"""engine.ops.reload: what a reload applies and what waits for a restart, from two
configurations (no server, no sockets)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import Config, load_config
from engine.ops.reload import RESTART, ReloadResult, diff, plan, why_restart

BASE = """\
spool = "/var/spool/ferry"
hostname = "mx.example.com"

[[receive]]
name = "default"
listen = ["127.0.0.1:2525"]

[[send]]
name = "out"
address_spaces = ["*"]
smarthosts = ["relay.example.com:25"]
"""

_files = itertools.count()

Load = Callable[[str], Config]


@pytest.fixture
def load(tmp_path: Path) -> Load:
    def read(text: str) -> Config:
        path = tmp_path / f"ferry{next(_files)}.toml"
        path.write_text(text)
        return load_config(path)

    return read


def test_the_same_configuration_changes_nothing(load: Load) -> None:
    done = plan(load(BASE), load(BASE))
    assert done.applied == () and done.restart == ()


def test_a_route_and_a_limit_apply_at_once(load: Load) -> None:
    new = load(BASE.replace("relay.example.com", "relay2.example.com")
               + '[delivery.domains."Gmail.com"]\nmax_connections = 3\n')
    done = plan(load(BASE), new)
    assert set(done.applied) == {'delivery.domains."gmail.com" (added)', "send[0].smarthosts"}
    assert done.restart == ()
    assert done.config == new


def test_listen_addresses_wait_for_a_restart_and_keep_their_running_value(
        load: Load) -> None:
    old = load(BASE)
    new = load(BASE.replace("127.0.0.1:2525", "0.0.0.0:25")
               .replace('"/var/spool/ferry"', '"/srv/spool"'))
    done = plan(old, new)
    assert done.applied == ()
    # The protocol logs' directory follows the spool when the file does not set it.
    assert set(done.restart) == {"receive[0].listen", "spool", "log.protocol_log_dir"}
    assert done.config.receive[0].listen == (("127.0.0.1", 2525),)
    assert done.config.spool == Path("/var/spool/ferry")
    # Reloading the same file again names the same keys, and applies nothing.
    again = plan(done.config, new)
    assert again.applied == () and again.restart == done.restart


def test_dkim_signing_keys_wait_for_a_restart(load: Load, tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("loaded at start, not by the plan")
    entry = '[[dkim_sign]]\ndomain = "example.com"\nselector = "{}"\nkey_file = "k.pem"\n'
    old = load(BASE + entry.format("s1"))
    new = load(BASE + entry.format("s2"))
    done = plan(old, new)
    assert done.applied == () and done.restart == ("dkim_sign[0].selector",)
    assert done.config.dkim_sign == old.dkim_sign


def test_receive_connectors_added_or_removed_wait_and_the_running_ones_stay(
        load: Load) -> None:
    two = BASE + '[[receive]]\nname = "submission"\nlisten = ["127.0.0.1:587"]\n'
    done = plan(load(BASE), load(two))
    assert done.restart == ("receive[1] (added: 'submission')",)
    assert [rc.name for rc in done.config.receive] == ["default"]
    done = plan(load(two), load(BASE))
    assert done.restart == ("receive[1] (removed: 'submission')",)
    assert [rc.name for rc in done.config.receive] == ["default", "submission"]


def test_a_receive_connector_is_matched_by_name_not_position(
        load: Load) -> None:
    two = BASE + ('[[receive]]\nname = "submission"\nlisten = ["127.0.0.1:587"]\n'
                  "max_recipients = 10\n")
    swapped = ('spool = "/var/spool/ferry"\nhostname = "mx.example.com"\n'
               '[[receive]]\nname = "submission"\nlisten = ["127.0.0.1:587"]\n'
               "max_recipients = 20\n"
               '[[receive]]\nname = "default"\nlisten = ["127.0.0.1:2525"]\n'
               + BASE.split("\n\n", 2)[2])
    done = plan(load(two), load(swapped))
    assert done.applied == ("receive[1].max_recipients",)
    assert done.restart == ()
    assert [rc.name for rc in done.config.receive] == ["default", "submission"]
    assert done.config.receive[1].max_recipients == 20


def test_tls_to_or_from_implicit_waits_other_modes_apply(
        load: Load, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    files = f'cert_file = "{cert}"\nkey_file = "{key}"\n'

    def with_tls(mode: str, pair: str = files) -> Config:
        return load(BASE.replace('listen = ["127.0.0.1:2525"]\n',
                                 f'listen = ["127.0.0.1:2525"]\ntls = "{mode}"\n{pair}'))

    assert plan(load(BASE), with_tls("starttls")).applied == (
        "receive[0].tls", "receive[0].cert_file", "receive[0].key_file")
    done = plan(with_tls("starttls"), with_tls("implicit"))
    assert done.restart == ("receive[0].tls",) and done.config.receive[0].tls == "starttls"
    # Off in the file, implicit while running: the certificate stays with it.
    done = plan(with_tls("implicit"), with_tls("off", ""))
    assert done.config.receive[0].tls == "implicit"
    assert done.config.receive[0].cert_file == cert
    assert set(done.restart) == {"receive[0].tls", "receive[0].cert_file",
                                 "receive[0].key_file"}


def test_tracking_http_and_logs_split_between_now_and_restart(
        load: Load) -> None:
    token = "t" * 32
    new = load(BASE + '[tracking]\nsubject = true\nmax_age = "1d"\n'
               f'[http]\nlisten = ["127.0.0.1:8025"]\n[http.tokens.ops]\ntoken = "{token}"\n'
               '[log]\nlevel = "warning"\nformat = "json"\nprotocol_log_dir = "/tmp/p"\n')
    done = plan(load(BASE), new)
    assert set(done.applied) == {"tracking.subject", "http.tokens.ops (added)", "log.level",
                                 "log.format"}
    assert set(done.restart) == {"tracking.max_age", "http.listen", "log.protocol_log_dir"}


def test_keys_never_carry_values(load: Load) -> None:
    secret = "hunter2hunter2"
    with_auth = BASE.replace('smarthosts = ["relay.example.com:25"]\n',
                             'smarthosts = ["relay.example.com:25"]\nauth_user = "u"\n'
                             f'auth_password = "{secret}"\n')
    keys = diff(load(BASE), load(with_auth))
    assert keys == ["send[0].auth_user", "send[0].auth_password"]
    assert secret not in repr(keys)


def test_send_connectors_by_name_and_a_new_ones_log_waits(
        load: Load) -> None:
    more = BASE + ('[[send]]\nname = "partner"\naddress_spaces = ["partner.example"]\n'
                   "protocol_log = true\n")
    done = plan(load(BASE), load(more))
    assert done.applied == ("send[1] (added: 'partner')",)
    assert done.restart == ("send[1].protocol_log",)
    assert done.config.send[1].protocol_log is False


def test_entries_of_an_array_of_tables_by_position(load: Load) -> None:
    local = '[[local]]\ndomains = ["{}"]\nmaildir = "/var/mail/{{domain}}/{{local}}"\n'
    one = load(BASE + local.format("a.example"))
    two = load(BASE + local.format("a.example") + local.format("b.example"))
    assert diff(load(BASE), one) == ["local[0] (added)"]
    assert diff(one, two) == ["local[1] (added)"]
    assert diff(two, one) == ["local[1] (removed)"]
    assert diff(one, load(BASE + local.format("c.example"))) == ["local[0].domains"]


@pytest.mark.parametrize("key", sorted(RESTART))
def test_every_restart_key_says_why(key: str) -> None:
    concrete = key.replace("[*]", "[3]")
    assert why_restart(concrete) == RESTART[key]


def test_why_restart_falls_back_to_the_table_then_a_default() -> None:
    assert why_restart("tracking.max_age") == RESTART["tracking"]
    assert why_restart("receive[2] (added: 'x')") == RESTART["receive"]
    assert why_restart("queue.map_size") == RESTART["queue"]
    assert why_restart("nothing.known") == "it is read at start only"


def test_the_reply_of_the_control_channel() -> None:
    assert ReloadResult.refused(["a: b"]).to_json() == {
        "ok": False, "error": "configuration refused, the running one stays",
        "errors": ["a: b"]}
    assert ReloadResult(True, ("x",), ("spool",)).to_json() == {
        "ok": True, "applied": ["x"], "restart": [{"key": "spool", "why": RESTART["spool"]}]}


def test_every_restart_key_is_in_the_docs() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "reload.md").read_text()
    missing = [key for key in RESTART if f"`{key}`" not in docs]
    assert not missing, f"docs/reload.md does not name: {missing}"


def test_agent_chains_wait_for_a_restart() -> None:
    import dataclasses

    from engine.config import load_config
    from engine.ops.reload import plan

    old = load_config(None)
    rc = dataclasses.replace(old.receive[0], agents=("ratelimit",), verify=("spf",))
    new = dataclasses.replace(old, receive=(rc,), http=dataclasses.replace(
        old.http, agents=("clamav",)), agents=dataclasses.replace(
        old.agents, clamav=dataclasses.replace(old.agents.clamav, timeout=3.0)))
    done = plan(old, new)
    assert done.config.receive[0].agents == () and done.config.receive[0].verify == ()
    assert done.config.http.agents == () and done.config.agents == old.agents
    assert not done.applied
    assert set(done.restart) >= {"receive[0].agents", "receive[0].verify", "http.agents",
                                 "agents.clamav.timeout"}
