"""The tables the compiled wire modules (ext/*.pyx) and their pure-Python twins share.

Owns, once, every constant both implementations of a module must agree on: the error
reply each command-line mistake maps to, the verbs and ESMTP parameters the server knows,
the RFC 5321 §4.5.3.1 size limits, the reply parser's error texts and default caps, the
wire layer's bare CR/LF policies, and the header fields a header scan remembers.  The twin
imports these names; the .pyx binds them to module globals at import (C variables where a
hot loop needs one), so a table is written in one place and the twins cannot drift apart.

It must never import anything but the standard library (the compiled modules import it
while ``engine.protocol`` is still being set up) and never hold logic.
"""

from __future__ import annotations

from typing import Final

# --- command (ext/command.pyx, _command_py.py) --------------------------------------------

# Error kinds: indexes into COMMAND_ERRORS.  ext/command.pyx binds each by name to a C int
# for its nogil helpers.  E_MAIL_PATH/_LONG/_UTF8 and E_RCPT_PATH/_LONG/_UTF8 stay adjacent,
# in that order: both path parsers add a fault offset (0 syntax, 1 too long) to the first.
(
    E_CTL,
    E_UNREC,
    E_NOTIMPL,
    E_NOARGS,
    E_NEEDARG,
    E_HELO,
    E_ARGCHARS,
    E_MAIL_KW,
    E_RCPT_KW,
    E_MAIL_PATH,
    E_MAIL_LONG,
    E_MAIL_UTF8,
    E_RCPT_PATH,
    E_RCPT_LONG,
    E_RCPT_UTF8,
    E_NONASCII,
    E_P_SYNTAX,
    E_P_UNKNOWN,
    E_P_DUP,
    E_P_NEEDVAL,
    E_P_NOVAL,
    E_P_CHARS,
    E_SIZE,
    E_BODY,
    E_RET,
    E_ENVID,
    E_AUTHP,
    E_NOTIFY,
    E_ORCPT,
    E_BDAT,
    E_AUTH,
    E_X_ESC,
    E_X_CTL,
    E_X_CHAR,
) = range(34)

# (text, code, enhanced status), by kind.  Texts are constants: nothing from the line is
# echoed, so a reply built from a CommandError never carries CR, LF or NUL from the wire.
COMMAND_ERRORS: Final[tuple[tuple[str, int, str], ...]] = (
    ("Line contains CR, LF or NUL", 501, "5.5.2"),
    ("Command unrecognized", 500, "5.5.2"),
    ("Command not implemented", 502, "5.5.1"),
    ("Syntax error: no arguments allowed", 501, "5.5.4"),
    ("Syntax error: argument required", 501, "5.5.4"),
    ("Syntax: HELO/EHLO <domain or address literal>", 501, "5.5.4"),
    ("Syntax error: invalid characters in argument", 501, "5.5.4"),
    ("Syntax: MAIL FROM:<address> [parameters]", 501, "5.5.4"),
    ("Syntax: RCPT TO:<address> [parameters]", 501, "5.5.4"),
    ("Bad sender address syntax", 501, "5.1.7"),
    ("Sender address too long", 501, "5.1.7"),
    ("Sender address is not valid UTF-8", 501, "5.1.7"),
    ("Bad recipient address syntax", 501, "5.1.3"),
    ("Recipient address too long", 501, "5.1.3"),
    ("Recipient address is not valid UTF-8", 501, "5.1.3"),
    ("Non-ASCII address requires SMTPUTF8", 553, "5.6.7"),
    ("Syntax error in parameters", 501, "5.5.4"),
    ("Parameter not recognized", 555, "5.5.4"),
    ("Duplicate parameter", 501, "5.5.4"),
    ("Parameter requires a value", 501, "5.5.4"),
    ("Parameter takes no value", 501, "5.5.4"),
    ("Invalid characters in parameter value", 501, "5.5.4"),
    ("Invalid SIZE value", 501, "5.5.4"),
    ("Invalid BODY value", 501, "5.5.4"),
    ("Invalid RET value", 501, "5.5.4"),
    ("Invalid ENVID value", 501, "5.5.4"),
    ("Invalid AUTH value", 501, "5.5.4"),
    ("Invalid NOTIFY value", 501, "5.5.4"),
    ("Invalid ORCPT value", 501, "5.5.4"),
    ("Syntax: BDAT <size> [LAST]", 501, "5.5.4"),
    ("Syntax: AUTH <mechanism> [initial-response]", 501, "5.5.4"),
    ("Invalid xtext escape", 501, "5.5.4"),
    ("Control character in xtext", 501, "5.5.4"),
    ("Invalid character in xtext", 501, "5.5.4"),
)

# The verbs the server parses (RFC 5321 §4.1.1, RFC 3207, RFC 3030, RFC 4954).  Verbs are
# case-insensitive (§2.4); these are their canonical spellings, as Command.verb holds them.
VERBS: Final = (
    # Most frequent first: the compiled parser looks a verb up in this order.
    "MAIL",
    "RCPT",
    "DATA",
    "RSET",
    "QUIT",
    "NOOP",
    "EHLO",
    "HELO",
    "BDAT",
    "AUTH",
    "VRFY",
    "EXPN",
    "HELP",
    "STARTTLS",
)
# Recognised but not implemented here: 502 (RFC 5321 §4.2.4).  All four letters long.
NOT_IMPLEMENTED: Final = ("SEND", "SOML", "SAML", "TURN", "ETRN", "ATRN", "BURL")
# Verbs that take no argument (501 when one is given) and verbs with a free-text one.
BARE_VERBS: Final = ("DATA", "RSET", "QUIT", "STARTTLS")
FREE_VERBS: Final = ("NOOP", "HELP", "VRFY", "EXPN")

# ESMTP parameters by command: RFC 1870 (SIZE), 6152/3030 (BODY), 6531 (SMTPUTF8),
# 3461 (RET, ENVID, NOTIFY, ORCPT), 4954 (AUTH).
MAIL_PARAMS: Final = ("SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH")
RCPT_PARAMS: Final = ("NOTIFY", "ORCPT")
# Parameters whose value is xtext (RFC 3461 §4); ORCPT's address part is xtext too.
XTEXT_PARAMS: Final = ("ENVID", "AUTH")
BODY_VALUES: Final = ("7BIT", "8BITMIME", "BINARYMIME")
RET_VALUES: Final = ("FULL", "HDRS")
# NOTIFY: NEVER alone, or a set of these (RFC 3461 §4.1).
NOTIFY_NEVER: Final = "NEVER"
NOTIFY_VALUES: Final = ("SUCCESS", "FAILURE", "DELAY")

# Size limits (RFC 5321 §4.5.3.1): local part, path with its angle brackets, domain, label.
MAX_LOCAL: Final = 64
MAX_PATH: Final = 256
MAX_DOMAIN: Final = 255
MAX_LABEL: Final = 63
# ENVID at most 100 octets as sent (RFC 3461 §4.4); SIZE 1*20DIGIT (RFC 1870 §3); a SASL
# mechanism name at most 20 characters (RFC 4422 §3.1); a BDAT size that fits 64 bits.
MAX_ENVID: Final = 100
MAX_SIZE_DIGITS: Final = 20
MAX_MECHANISM: Final = 20
MAX_BDAT_DIGITS: Final = 18

# --- reply (ext/reply.pyx, _reply_py.py) ---------------------------------------------------

# ReplyError texts (the error's own code is 421 4.5.0).
REPLY_MALFORMED: Final = "Malformed reply line"
REPLY_MISMATCH: Final = "Reply code mismatch in multi-line reply"
REPLY_TOO_LONG: Final = "Reply line too long"
REPLY_TOO_MANY: Final = "Too many reply lines"
# Default caps: longest reply line without its ending, most lines in one reply.
REPLY_MAX_LINE: Final = 2048
REPLY_MAX_LINES: Final = 100

# --- wire (ext/wire.pyx, _wire_py.py) ------------------------------------------------------

#: Bare CR / bare LF policy: refuse the message (the body is dropped, 554 after the end).
BARE_REJECT: Final = "reject"
#: Bare CR / bare LF policy: write each one as CRLF and accept the message.
BARE_NORMALIZE: Final = "normalize"
# LineTooLong's text, and the default command line limit with its CRLF (§4.5.3.1.4).
LINE_TOO_LONG: Final = "Line too long"
COMMAND_LINE_LIMIT: Final = 512

# --- headers (ext/headers.pyx, engine/message/_headers_py.py) -------------------------------

# The fields a HeaderScan remembers, lower-cased, in the order of their kinds (kind = index
# + 1; 0 is "not tracked"): RFC 5322 §3.6.1-§3.6.7, RFC 6376 §3.5 for DKIM-Signature.
# Both scanners look each kind up here by its name, never by position.
HEADER_FIELDS: Final = (
    b"received",
    b"message-id",
    b"from",
    b"to",
    b"subject",
    b"date",
    b"dkim-signature",
)
