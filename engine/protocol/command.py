"""SMTP command lines: parse them into Command objects (server side) and format them (client).

Owns the RFC 5321 §4.1 command grammar, paths and ESMTP parameters, xtext (RFC 3461 §4) and
the CommandError reply each malformed command maps to.  Must never do I/O, log, import
asyncio, or echo bytes from the wire into an error text.  The compiled engine._ext.command
replaces these names unless FERRY_NO_EXTENSIONS is set.
"""

from engine import _speedups
from engine.protocol._command_py import (
    Command,
    format_command,
    parse_command,
    xtext_decode,
    xtext_encode,
)

__all__ = ["Command", "format_command", "parse_command", "xtext_decode", "xtext_encode"]
COMPILED = _speedups.select("command", __all__, globals())
