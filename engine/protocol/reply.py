"""SMTP replies (RFC 5321 §4.2, RFC 3463, RFC 2034): the client-side parser that turns a
server's bytes into Reply objects under line-length and line-count caps, and the
server-side formatter of the wire form.

It must never import asyncio, hold a transport or log, and nothing it returns may carry a
raw CR, LF or NUL from the wire.  Import it from here: this selector picks the compiled
module (engine._ext.reply) or its pure-Python twin.
"""

from engine import _speedups
from engine.protocol._reply_py import Reply, ReplyParser, format_reply

__all__ = ["Reply", "ReplyParser", "format_reply"]
COMPILED = _speedups.select("reply", __all__, globals())
