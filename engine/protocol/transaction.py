"""Sans-I/O outbound mail transaction: MAIL → RCPT… → DATA → body → final reply (or replies).

Theory of operation.  The delivery glue in ``engine/client/`` owns the socket and the
timers; :class:`engine.protocol.client.ClientConnection` turns commands into bytes and
bytes into replies; this module owns the order of one transaction and what each reply
means for each recipient:

- ``Transaction(conn, envelope, indexes, body, lmtp=…, rset=…)`` on a connection whose
  EHLO/LHLO is done; ``start()`` returns the bytes to write first: RSET when the previous
  transaction did not end cleanly, MAIL with the parameters the next hop offers
  (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 RET/ENVID/NOTIFY/ORCPT), then
  with PIPELINING (RFC 2920) every RCPT and DATA in the same write; without it, one
  command per reply;
- ``receive(reply)`` takes the reply to the oldest command still due and returns the
  bytes to write now (the next command, or after the 354 the dot-stuffed body, or the
  next transaction's commands), ``b""`` when there is nothing to write;
- ``phase`` names the reply awaited (the glue's timeout per RFC 5321 §4.5.3.2), ``done``
  says that no reply is due any more, ``lost()`` says that none will come;
- ``outcome(reason)`` gives one :class:`engine.client.api.RcptResult` per recipient: the
  answer it got, or DEFERRED with ``reason`` when it got none (RFC 5321 §6.1: the fate of
  a message without a final answer is unknown, so it is tried again, never dropped).

A message the next hop cannot take (over its SIZE, 8-bit data or SMTPUTF8 it does not
offer, an address with a control character) is refused by ``start()`` before any command
is written, so the connection stays clean for the next message.

Per-recipient rules: a 2xx to RCPT and a 2xx to the body → DELIVERED, 4xx → DEFERRED,
5xx → FAILED; a refused MAIL answers for every recipient, a refused DATA for every
accepted one.  LMTP answers the body once per accepted recipient, in RCPT order (RFC 2033
§4.2).  A 452 to RCPT (or a 552 5.5.3, RFC 5321 §4.5.3.1.10) means "too many recipients":
once the message is accepted for the others, those recipients go in a next transaction on
the same connection; when no recipient got through the 452 stands (DEFERRED).  A 421
anywhere ends the transaction: the server is closing (RFC 5321 §3.8), every recipient
without a final answer is DEFERRED with it, and ``keep`` is False.  A 1xx or 3xx where
none belongs puts the session out of step: ``keep`` is False.

It must never import asyncio, socket, ssl or logging, never wait, and never put a raw CR,
LF or NUL from the wire into a result.
"""

from __future__ import annotations

from typing import Final

from engine.client.api import Peer, RcptResult
from engine.protocol.client import ClientConnection, ClientProtocolError
from engine.protocol.command import Command
from engine.protocol.reply import Reply
from engine.queue.records import Envelope, RcptState

#: Reply texts in results are capped (they go to logs, DSNs and the queue record).
MAX_RESULT_TEXT: Final = 512

#: The reply awaited (``Transaction.phase``); the names are the glue's timeout keys.
RSET: Final = "RSET"
MAIL: Final = "MAIL"
RCPT: Final = "RCPT"
DATA: Final = "DATA"
END_OF_DATA: Final = "end of data"
DONE: Final = "done"

_DATA_COMMAND: Final = Command("DATA")
_RSET_COMMAND: Final = Command("RSET")
_DELIVERED, _DEFERRED, _FAILED = RcptState.DELIVERED, RcptState.DEFERRED, RcptState.FAILED


def cap_text(text: str) -> str:
    """``text`` on one printable line (controls "?", TAB a space), at most
    ``MAX_RESULT_TEXT`` characters."""
    if not text.isprintable():  # most replies are: skip the walk over every character
        text = "".join(c if c >= " " and c != "\x7f" else " " if c == "\t" else "?"
                       for c in text)
    return text if len(text) <= MAX_RESULT_TEXT else text[: MAX_RESULT_TEXT - 3] + "..."


def reply_text(reply: Reply) -> str:
    """One line: "550 5.1.1 text text", controls already "?" (the parser), TAB a space."""
    head = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    text = " ".join(line.strip() for line in reply.lines if line.strip())
    return cap_text(f"{head} {text}" if text else head)


def reply_state(code: int) -> RcptState:
    """2xx → DELIVERED, 5xx → FAILED, anything else → DEFERRED."""
    if 200 <= code < 300:
        return _DELIVERED
    return _FAILED if 500 <= code < 600 else _DEFERRED


def _too_many(reply: Reply) -> bool:
    """RFC 5321 §4.5.3.1.10: 452 is "too many recipients"; a 552 saying so (RFC 3463
    5.5.3) is to be treated as the same temporary condition."""
    return reply.code == 452 or (reply.code == 552 and reply.enhanced == "5.5.3")


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


class Transaction:
    """One message to some of an envelope's recipients, over one connection."""

    __slots__ = ("_accepted", "_answered", "_body", "_dsn", "_eight_bit", "_envelope",
                 "_expected", "_mail_ok", "_pipelining", "_rcpts", "_replied", "_retry",
                 "_round", "_rset", "clean", "conn", "done", "indexes", "keep", "lmtp",
                 "peer", "phase", "remote", "results")

    def __init__(self, conn: ClientConnection, envelope: Envelope, indexes: list[int],
                 body: bytes, *, lmtp: bool = False, rset: bool = False,
                 remote: str = "", peer: Peer | None = None) -> None:
        ext = conn.extensions
        if ext is None:
            raise ClientProtocolError("a transaction before a successful EHLO/HELO/LHLO")
        self.conn = conn
        self.indexes = indexes
        self.lmtp = lmtp
        #: Names the next hop in results ("mx.example[192.0.2.1]").
        self.remote = remote
        #: The connection's peer, carried by the results for the tracking log.
        self.peer = peer
        #: What each recipient got so far, by envelope index.
        self.results: dict[int, RcptResult] = {}
        #: The connection may carry another transaction after this one.
        self.keep = True
        #: The server is outside any transaction afterwards (no RSET needed first).
        self.clean = not rset
        self.done = False
        self.phase = MAIL
        self._envelope = envelope
        self._body = body
        self._dsn = "DSN" in ext
        self._pipelining = "PIPELINING" in ext
        self._eight_bit = (envelope.body_type.upper() in ("8BITMIME", "BINARYMIME")
                           or not body.isascii())
        self._rset = rset
        # The current round (a next one only after 452s): its recipients, their RCPTs
        # still to send (without PIPELINING), the RCPT replies so far, the recipients
        # accepted and those to try again, and the replies still due after the body.
        self._round = indexes
        self._rcpts: list[Command] = []
        self._replied = 0
        self._mail_ok = False
        self._accepted: list[int] = []
        self._retry: list[int] = []
        self._expected = 0
        self._answered = 0

    # --- the caller's side -------------------------------------------------------------

    @property
    def accepted(self) -> list[int]:
        """The recipients the server accepted in the current round."""
        return self._accepted

    @property
    def more(self) -> bool:
        """Recipients wait for a next round (452): nothing else may follow this body."""
        return bool(self._retry)

    @property
    def pipelining(self) -> bool:
        """The next hop offers PIPELINING (RFC 2920): commands go out in groups."""
        return self._pipelining

    def start(self) -> bytes:
        """The first bytes to write; ``b""`` and ``done`` when the next hop cannot take
        the message at all (every recipient FAILED, nothing sent)."""
        refusal = self._refusal()
        if refusal is not None:
            for i in self.indexes:
                self.results[i] = RcptResult(i, _FAILED, refusal, peer=self.peer)
            self._finish()
            return b""
        return self._begin()

    def receive(self, reply: Reply) -> bytes:
        """The reply to the oldest command due; the bytes to write now (maybe ``b""``)."""
        phase = self.phase
        if reply.code == 421:
            return self._closing(reply)
        if phase is RCPT:
            return self._rcpt(reply)
        if phase is END_OF_DATA:
            return self._final(reply)
        if phase is MAIL:
            return self._mail(reply)
        if phase is DATA:
            return self._data(reply)
        if phase is RSET:
            if reply.code != 250:
                # The session is in no known state: nothing of this message was taken.
                self._answer_all(self.indexes, reply, _DEFERRED)
                self.keep = False
                self._finish()
                return b""
            self.phase = MAIL
            return b"" if self._pipelining else self._send_mail()
        raise ClientProtocolError(f"a reply after the transaction ended ({reply.code})")

    def lost(self) -> None:
        """No more replies will come (the connection broke or timed out)."""
        self.keep = False
        self._finish()

    def outcome(self, reason: str) -> list[RcptResult]:
        """One result per recipient, in ``indexes`` order: its answer, or DEFERRED with
        ``reason`` when it has none."""
        results = self.results
        out: list[RcptResult] = []
        for i in self.indexes:
            result = results.get(i)
            out.append(result if result is not None else
                       RcptResult(i, _DEFERRED, reason, self.remote, self._dsn,
                                  self.peer))
        return out

    # --- the rounds -------------------------------------------------------------------

    def _refusal(self) -> str | None:
        """Why the message cannot go to this next hop at all (a permanent failure).

        What the next hop can take (RFC 1870, RFC 6152, RFC 6531) is decided before any
        command, so the connection stays clean for the next message."""
        ext = self.conn.extensions
        assert ext is not None
        envelope, body = self._envelope, self._body
        limit = ext.size
        if limit and len(body) > limit:
            return cap_text(f"552 5.3.4 Message size {len(body)} exceeds the limit {limit} "
                            f"of {self.remote}")
        if envelope.body_type.upper() == "BINARYMIME" or (
                self._eight_bit and "8BITMIME" not in ext):
            return cap_text(f"554 5.6.3 Conversion to 7bit required but not supported "
                            f"({self.remote} does not offer 8BITMIME)")
        if envelope.smtputf8 and "SMTPUTF8" not in ext:
            return cap_text(f"553 5.6.7 {self.remote} does not support SMTPUTF8 (RFC 6531)")
        # No control character (CR, LF, NUL above all) may reach the wire inside a command.
        recipients = envelope.recipients
        if not envelope.sender.isprintable() or not all(
                recipients[i].address.isprintable() for i in self.indexes):
            return "553 5.1.3 Address cannot be sent"
        return None

    def _begin(self) -> bytes:
        """The first write of a round: [RSET] MAIL, and with PIPELINING the RCPTs and
        DATA too (RFC 2920 §3.1: RSET, MAIL and RCPT may appear anywhere in a group)."""
        conn = self.conn
        self._rcpts = self._rcpt_commands(self._round)
        self.clean = False  # until the transaction ends well
        if self._rset:
            self._rset = False
            self.phase = RSET
            data = conn.send(_RSET_COMMAND)
            return data + self._send_mail() if self._pipelining else data
        self.phase = MAIL
        return self._send_mail()

    def _send_mail(self) -> bytes:
        conn = self.conn
        data = conn.send(self._mail_command())
        if self._pipelining:
            rcpts, self._rcpts = self._rcpts, []
            data += b"".join([conn.send(c) for c in rcpts]) + conn.send(_DATA_COMMAND)
        return data

    def _mail_command(self) -> Command:
        """MAIL with the parameters the next hop offers (RFC 1870, 6152, 6531, 3461)."""
        ext = self.conn.extensions
        assert ext is not None
        envelope = self._envelope
        params: dict[str, str | None] = {}
        if "SIZE" in ext:
            params["SIZE"] = str(len(self._body))
        if self._eight_bit:
            params["BODY"] = "8BITMIME"
        if envelope.smtputf8:
            params["SMTPUTF8"] = None
        if self._dsn and envelope.ret:
            params["RET"] = envelope.ret
        if self._dsn and envelope.envid:
            params["ENVID"] = envelope.envid
        local, domain = _split(envelope.sender)
        return Command("MAIL", local=local, domain=domain, params=params)

    def _rcpt_commands(self, indexes: list[int]) -> list[Command]:
        dsn = self._dsn
        recipients = self._envelope.recipients
        rcpts: list[Command] = []
        for i in indexes:
            r = recipients[i]
            params: dict[str, str | None] = {}
            if dsn and r.notify:
                params["NOTIFY"] = ",".join(r.notify)
            if dsn and r.orcpt:
                params["ORCPT"] = r.orcpt
            local, domain = _split(r.address)
            rcpts.append(Command("RCPT", local=local, domain=domain, params=params))
        if not self._pipelining:
            rcpts.reverse()  # popped from the end, one per reply
        return rcpts

    def _mail(self, reply: Reply) -> bytes:
        code = reply.code
        self.phase = RCPT
        if code // 100 == 2:
            self._mail_ok = True
        else:
            if code // 100 not in (4, 5):
                self.keep = False  # a 1xx or 3xx to MAIL: out of step
            self._answer_all(self._round, reply, reply_state(code))
            if not self._pipelining:
                return self._end_round(progress=False)
        if self._pipelining:
            return b""
        return self.conn.send(self._rcpts.pop())

    def _rcpt(self, reply: Reply) -> bytes:
        i = self._round[self._replied]
        self._replied += 1
        if self._mail_ok:
            code = reply.code
            if code // 100 == 2:
                self._accepted.append(i)
            elif code // 100 not in (4, 5):
                # A 1xx or 3xx to RCPT: out of step, so no answer for this recipient (it
                # is DEFERRED with the reason the session ends with).
                self.keep = False
            else:
                if _too_many(reply):
                    self._retry.append(i)
                    # Stands if no next round comes (DEFERRED, not FAILED, even for 552).
                    self.results[i] = RcptResult(i, _DEFERRED, reply_text(reply), self.remote,
                                                 self._dsn, self.peer)
                else:
                    self.results[i] = RcptResult(i, reply_state(code), reply_text(reply),
                                                 self.remote, self._dsn, self.peer)
        if self._replied < len(self._round):
            return b"" if self._pipelining else self.conn.send(self._rcpts.pop())
        self.phase = DATA
        if self._pipelining:
            return b""
        if not self._accepted:
            return self._end_round(progress=False)  # nobody to send DATA for
        return self.conn.send(_DATA_COMMAND)

    def _data(self, reply: Reply) -> bytes:
        accepted = self._accepted
        if reply.code == 354:
            # RFC 2920 §3.1: a 354 though no recipient was accepted (the DATA went in the
            # same write): send an empty message and let the server refuse it.
            self._expected = len(accepted) if self.lmtp and accepted else 1
            self.phase = END_OF_DATA
            return self.conn.send_message(self._body if accepted else b"", self._expected)
        state = reply_state(reply.code)
        if reply.code // 100 not in (4, 5):
            # A 2xx (or 1xx, 3xx) without the 354: out of step, and the body was never
            # sent, so it is no delivery (RFC 5321 §4.1.1.4: only the reply after the
            # body is final); those recipients are tried again.
            self.keep = False
            state = _DEFERRED
        self._answer_all(accepted, reply, state)
        return self._end_round(progress=False)

    def _final(self, reply: Reply) -> bytes:
        accepted = self._accepted
        n = self._answered
        self._answered = n + 1
        if reply.code // 100 not in (2, 4, 5):
            self.keep = False  # a 1xx or 3xx after the body: out of step
        if self.lmtp and accepted:
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order.
            i = accepted[n]
            self.results[i] = RcptResult(i, reply_state(reply.code), reply_text(reply),
                                         self.remote, self._dsn, self.peer)
        else:
            self._answer_all(accepted, reply, reply_state(reply.code))
        if self._answered < self._expected:
            return b""
        results = self.results
        delivered = [results[i].state is _DELIVERED for i in accepted]
        clean = bool(accepted) and all(delivered)
        self._rset = not clean
        data = self._end_round(progress=any(delivered))
        if not data:
            self.clean = clean
        return data

    def _end_round(self, progress: bool) -> bytes:
        """The round is over: a next one for the recipients refused with 452 when this
        one got the message through (RFC 5321 §4.5.3.1.10), else the end."""
        retry = self._retry
        if retry and progress and self.keep:
            results = self.results
            for i in retry:
                del results[i]  # the 452 stood only in case no next round came
            self._round, self._retry = retry, []
            self._replied = self._answered = self._expected = 0
            self._mail_ok = False
            self._accepted = []
            return self._begin()
        self._finish()
        return b""

    def _finish(self) -> None:
        self.done = True
        self.phase = DONE

    def _closing(self, reply: Reply) -> bytes:
        """A 421: the server is closing the connection (RFC 5321 §3.8)."""
        results = self.results
        # Those refused before keep their answer (a 452 stays a 452: no next round).
        self._answer_all([i for i in self.indexes if i not in results], reply, _DEFERRED)
        self.keep = False
        self._finish()
        return b""

    def _answer_all(self, indexes: list[int], reply: Reply, state: RcptState) -> None:
        if not indexes:
            return
        text = reply_text(reply)
        results = self.results
        remote, dsn, peer = self.remote, self._dsn, self.peer
        for i in indexes:
            results[i] = RcptResult(i, state, text, remote, dsn, peer)


