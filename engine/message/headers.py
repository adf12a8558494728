"""Header scanning (RFC 5322 §2.2, §3.6): where the header section ends, where each field's
name and value lie, and the few fields the relay acts on (Received count for loop
detection, Message-ID, From, To, Subject, Date, DKIM-Signature presence).

It returns offsets into the caller's bytes and never raises for any input; it must never
copy, decode or rewrite the message, and never do I/O.  Import it from here: this selector
picks the compiled module (engine._ext.headers) or its pure-Python twin.
"""

from engine import _speedups
from engine.message._headers_py import HeaderScan, scan_headers

__all__ = ["HeaderScan", "scan_headers"]
COMPILED = _speedups.select("headers", __all__, globals())
