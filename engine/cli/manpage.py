"""Manual pages in roff (man(7) macros), generated from ``ferry``'s argument parser.

``ferry man`` prints the page of ``ferry`` itself, ``ferry man queue`` the page of one
subcommand (``ferry-queue(1)``, with its actions and their options), ``ferry man --write
DIR`` writes every page as DIR/ferry*.1.  The parser is the one source: a flag added to a
subcommand is in its page, its ``--help`` and its completion (engine.cli.completion)
without another edit.  Pages are not committed; they are made at packaging time.

It reads the parser only (argparse's action list) and never runs a command.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from engine import __version__


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand of ``parser``, in order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The optional arguments and positionals of ``parser`` (not its subcommands)."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            yield action


def _escape(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting with a control
    character ('.' or "'" would be read as a request)."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                      for line in text.splitlines())


def _term(action: argparse.Action) -> str:
    """The .TP term of an argument: its flags in bold, its value in italics."""
    if not action.option_strings:
        return f"\\fI{_escape(str(action.metavar or action.dest))}\\fR"
    flags = ", ".join(f"\\fB{_escape(flag)}\\fR" for flag in action.option_strings)
    if action.nargs == 0:
        return flags
    value = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    return f"{flags} \\fI{_escape(str(value))}\\fR"


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return _escape(text % {"prog": "ferry", "default": action.default} if "%(" in text
                   else text)


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in options(parser):
        if action.help == argparse.SUPPRESS:
            continue
        lines += [".TP", _term(action), _help(action)]
    return lines


def _usage(parser: argparse.ArgumentParser) -> list[str]:
    usage = re.sub(r"^usage: ", "", parser.format_usage().strip())
    return [_escape(re.sub(r"\s+", " ", usage))]


def page(parser: argparse.ArgumentParser, command: str | None = None) -> str:
    """The roff page of ``ferry`` (command None) or of one of its subcommands."""
    subs = {name: (helptext, sub) for name, helptext, sub in subcommands(parser)}
    if command is None:
        # "Ferry: a high-throughput ..." → "ferry \- a high-throughput ..."
        summary = (parser.description or "").split(": ", 1)[-1]
        title, name, target = "FERRY", "ferry", parser
    else:
        helptext, target = subs[command]
        title, name, summary = f"FERRY-{command.upper()}", f"ferry-{command}", helptext
    lines = [f'.TH {title} 1 "" "ferry {__version__}" "Ferry manual"',
             ".SH NAME", f"{_escape(name)} \\- {_escape(summary.rstrip('.'))}",
             ".SH SYNOPSIS", *_usage(target)]
    if target.description:
        lines += [".SH DESCRIPTION", _escape(target.description)]
    arguments = _arguments(target)
    if arguments:
        lines += [".SH OPTIONS", *arguments]
    actions = subcommands(target)
    if actions:
        lines.append(".SH COMMANDS")
        for action_name, action_help, action_parser in actions:
            lines += [".TP", f"\\fB{_escape(action_name)}\\fR", _escape(action_help)]
            if command is not None:  # a subcommand's page also lists its actions' options
                own = _arguments(action_parser)
                if own:
                    lines += [".RS", *_usage(action_parser), *own, ".RE"]
    see = [f"\\fBferry\\-{n}\\fR(1)" for n in subs if n != command]
    if command is not None:
        see.insert(0, "\\fBferry\\fR(1)")
    if see:
        lines += [".SH SEE ALSO", ", ".join(see)]
    return "\n".join(lines) + "\n"


def write_pages(parser: argparse.ArgumentParser, directory: Path) -> list[Path]:
    """Write ferry.1 and ferry-<command>.1 for every subcommand into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for command in [None, *(name for name, _, _ in subcommands(parser))]:
        path = directory / (f"ferry-{command}.1" if command else "ferry.1")
        path.write_text(page(parser, command), encoding="utf-8")
        written.append(path)
    return written
