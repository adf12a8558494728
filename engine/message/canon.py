"""DKIM's relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4): a whole body, and the header
fields a signature covers, each in one call; a verifier's whole header data (§3.7); and a
DKIM-Signature field's tags parsed and checked (§6.1.1: ``signature_tags``).

Import it from here: this selector picks the compiled module (engine._ext.canon, one pass
over the octets) or its pure-Python twin (engine.message._canon_py), which give the same
bytes.  engine.message.dkim uses them for every signature made or checked; its streaming
:class:`~engine.message.dkim.RelaxedBody` remains for bodies too large to copy at once.
It must never do I/O, nor raise on any bytes.
"""

from engine import _speedups
from engine.message._canon_py import (
    field_items,
    header_data,
    relaxed_body,
    relaxed_fields,
    signature_tags,
)

__all__ = ["field_items", "header_data", "relaxed_body", "relaxed_fields", "signature_tags"]
COMPILED = _speedups.select("canon", __all__, globals())
