"""SMTP line framing and message-body transfer: the selector for the compiled module.

Owns the octet level of SMTP: command lines split on CRLF with a length limit
(``LineReader``), the DATA body decoded up to ``<CRLF>.<CRLF>`` with unstuffing and bare
CR/LF detection (``DataDecoder``), BDAT chunks read by octet count (``BdatReader``) and the
outbound dot-stuffing encoder (``dot_stuff``).  Only a real CRLF ends a line and only
``<CRLF>.<CRLF>`` ends a message (RFC 5321 §2.3.8, §4.1.1.4; the SMTP smuggling rules in
DESIGN.md).  It must never do I/O, import asyncio, log or parse commands; it exports the
compiled implementation (engine._ext.wire) when built, else the pure-Python twin.
"""

from engine import _speedups
from engine.protocol._wire_py import (
    BARE_NORMALIZE,
    BARE_REJECT,
    BdatReader,
    DataDecoder,
    LineReader,
    dot_stuff,
)

__all__ = ["BARE_NORMALIZE", "BARE_REJECT", "BdatReader", "DataDecoder", "LineReader", "dot_stuff"]
COMPILED = _speedups.select("wire", __all__, globals())
