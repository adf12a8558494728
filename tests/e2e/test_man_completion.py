"""``ferry man`` and ``ferry completion``: pages and scripts generated from the parser,
read by the real tools (groff, man, bash) when they are installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.main import build_parser
from engine.cli.manpage import options, subcommands
from engine.ops.select import STATES

FERRY = [sys.executable, "-m", "engine"]
ENV = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
COMMANDS = [name for name, _, _ in subcommands(build_parser())]
QUEUE_ACTIONS = [name for name, _, _ in subcommands(
    dict((n, p) for n, _, p in subcommands(build_parser()))["queue"])]


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FERRY, *args], capture_output=True, text=True, timeout=60, env=ENV)


def every_option(command: str) -> set[str]:
    """The option strings of a command and of its actions."""
    parser = dict((n, p) for n, _, p in subcommands(build_parser()))[command]
    found = {flag for action in options(parser) for flag in action.option_strings}
    for _, _, action_parser in subcommands(parser):
        found |= {flag for action in options(action_parser) for flag in action.option_strings}
    return found


def test_every_command_has_a_page() -> None:
    assert {"serve", "passwd", "queue", "config", "man", "completion"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_page_is_well_formed_roff(command: str | None) -> None:
    out = ferry("man", *([command] if command else []))
    assert out.returncode == 0, out.stderr
    page = out.stdout
    title = "FERRY" if command is None else f"FERRY-{command.upper()}"
    assert page.startswith(f'.TH {title} 1 "" "ferry ')
    for section in (".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS"):
        assert f"\n{section}\n" in page
    # No text line may start with a control character but the macros themselves.
    assert all(not line.startswith("'") for line in page.splitlines())
    if shutil.which("groff") is None:
        return
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-cbou"], input=page,
                              capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    text = rendered.stdout.replace("\u2010", "-").replace("\u2212", "-")
    if command is not None:
        for flag in every_option(command):
            assert flag in text, (command, flag)


def test_write_pages_and_man_reads_them(tmp_path: Path) -> None:
    out = ferry("man", "--write", str(tmp_path / "man1"))
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "man1").iterdir())
    assert names == sorted(["ferry.1", *(f"ferry-{c}.1" for c in COMMANDS)])
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    shown = subprocess.run(["man", "-l", str(tmp_path / "man1" / "ferry-config.1")],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, MANPAGER="cat", MANWIDTH="200"))
    assert shown.returncode == 0, shown.stderr
    assert "FERRY-CONFIG(1)" in shown.stdout and "--retry-interval" in shown.stdout


def test_unknown_page_is_refused() -> None:
    out = ferry("man", "nothing")
    assert out.returncode == 2 and "invalid choice: 'nothing'" in out.stderr


COMPLETE = r"""
source "$1"
complete -p ferry
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _ferry; echo "${COMPREPLY[*]}"; }
t ferry ""
t ferry q
t ferry queue --spool /tmp ""
t ferry queue list --state ""
t ferry queue list --st
t ferry config check --config conf/o
t ferry completion ""
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "ferry.bash"
    out = ferry("completion", "bash")
    assert out.returncode == 0, out.stderr
    script.write_text(out.stdout)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "only.toml").write_text("")
    run = subprocess.run(["bash", "-c", COMPLETE, "bash", str(script)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "complete -o default -F _ferry ferry"
    assert lines[1].split() == COMMANDS
    assert lines[2:] == [
        "queue",
        " ".join(QUEUE_ACTIONS),
        " ".join(STATES),
        "--state",
        "conf/only.toml",
        "bash zsh",
    ]
    # The zsh script is the same functions behind bashcompinit: at least its syntax is
    # checked here when zsh itself is not installed.
    zsh = tmp_path / "ferry.zsh"
    zsh.write_text(ferry("completion", "zsh").stdout)
    parsed = subprocess.run(["bash", "-n", str(zsh)], capture_output=True, text=True,
                            timeout=60)
    assert parsed.returncode == 0, parsed.stderr


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion(tmp_path: Path) -> None:
    script = tmp_path / "ferry.zsh"
    script.write_text(ferry("completion", "zsh").stdout)
    run = subprocess.run(["zsh", "-f", "-c", 'autoload -U compinit && compinit -u && '
                          'source "$1" && print -r -- "${_comps[ferry]}"', "zsh", str(script)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "_ferry" in run.stdout  # bashcompinit registers "_bash_complete ... -F _ferry"


@pytest.mark.parametrize("path", [["serve"], ["config", "check"], ["config", "show"]])
def test_key_flags_are_exactly_the_config_flags(path: list[str]) -> None:
    from engine.config import FLAGS

    parser = build_parser()
    for name in path:
        parser = dict((n, p) for n, _, p in subcommands(parser))[name]
    flags = {f for action in options(parser) for f in action.option_strings}
    assert flags - {"-h", "--help", "--config", "--json"} == set(FLAGS)


# passwd reads no configuration (a hash does not depend on it); man and completion read
# only the parser; dkim keygen makes a key from its arguments alone.
@pytest.mark.parametrize("command", [c for c in COMMANDS
                                     if c not in ("passwd", "man", "completion", "dkim")])
def test_every_command_takes_config(command: str) -> None:
    parser = dict((n, p) for n, _, p in subcommands(build_parser()))[command]
    own = {f for action in options(parser) for f in action.option_strings}
    actions = [{f for a in options(p) for f in a.option_strings}
               for _, _, p in subcommands(parser)]
    assert "--config" in own or (actions and all("--config" in a for a in actions))
