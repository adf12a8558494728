"""Anti-spam with rspamd: the "rspamd" agent, at the end of data.

Owns one exchange of rspamd's HTTP protocol (https://rspamd.com/doc/architecture/protocol.html)
per message: the message is POSTed to ``/checkv2`` with the envelope in request headers (IP,
Helo, From, one Rcpt per recipient, User, MTA-Name, the TLS parameters), and the JSON
answer's ``action`` becomes the verdict:

==================  ===========================================================
rspamd's action     verdict
==================  ===========================================================
reject              ``reject_action``: 550 5.7.1 (rspamd's smtp_message), hold or tag
soft reject         ``soft_reject_action``: 451 4.7.1, hold or tag
greylist            ``greylist_action``: 451 4.7.1 greylisted, tag, or accept
rewrite subject     accept, Subject replaced by rspamd's, tagged as spam
add header          accept, tagged as spam
no action           accept
==================  ===========================================================

The client's host name (rspamd's Hostname) is its forward-confirmed reverse DNS name: a PTR
name of its address whose A or AAAA records hold that address again, looked up on the
agents' shared, cached DNS.  None confirmed (or the DNS cannot say): no Hostname, which
rspamd reads as an unknown client, as it does a Postfix client without one.

Every scanned message gets the result field (``header``: the score, the required score and
the symbols, folded) and, when tagged, ``spam_header: Yes``; fields of those names that
arrived with the message are replaced or removed, so a sender cannot pass its own verdict.
A message larger than ``max_size`` is not sent (accepted with a log line, fields of those
names removed).

The body is written in 64 KiB views of the session's buffer (:class:`MessagePayload`, never
copied here), with its Content-Length; the answer is read up to :data:`MAX_ANSWER`.  An
answer that is not 200 with a JSON object, or no answer, raises :class:`RspamdError`: the
chain's ``timeout`` and ``fail`` decide what that means (open: accept, closed: 451).  The
agent never catches what it does not expect.

Must never write to the SMTP socket or the queue, and never block the loop.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Final

import aiohttp
import aiohttp.abc
import aiohttp.payload
from multidict import CIMultiDict

from engine.agents.api import (
    Action,
    Agent,
    HeaderChange,
    Message,
    Session,
    Transaction,
    Verdict,
    reject,
    tempfail,
)
from engine.agents.dns import DnsError, Lookup, RecordType
from engine.agents.scan import ScannerContext, chunks, printable
from engine.config import RspamdAgentConfig

__all__ = ["MAX_ANSWER", "MessagePayload", "RspamdAgent", "RspamdError", "build_rspamd"]

log = logging.getLogger("ferry.agents.rspamd")

#: Most bytes of rspamd's answer read: a JSON object of a few KiB, even with many symbols.
MAX_ANSWER: Final = 1 << 20
#: Most symbols written into the result field, and options shown per symbol.
MAX_SYMBOLS: Final = 100
MAX_OPTIONS: Final = 5
#: PTR names of a client tried for a forward match (SPF's "ptr" stops at 10, RFC 7208
#: §4.6.4; fewer here, inside one scan's time budget).
MAX_PTR_NAMES: Final = 3
#: Longest rewritten Subject kept (folded into lines of at most 78 characters).
MAX_SUBJECT: Final = 2000

#: rspamd's actions that mean "this is spam" when the message is let through.
_SPAM_ACTIONS: Final = frozenset({"reject", "rewrite subject", "add header"})


class RspamdError(Exception):
    """rspamd did not give a usable answer."""


class RspamdAgent(Agent):
    """The rspamd agent; ``config`` is its [agents.rspamd] table, ``hostname`` this
    server's name (rspamd's MTA-Name), ``lookup`` the DNS the client's name is confirmed
    on (None: no Hostname is sent)."""

    name = "rspamd"

    def __init__(self, config: RspamdAgentConfig, hostname: str,
                 lookup: Lookup | None = None) -> None:
        super().__init__(timeout=config.timeout, fail_open=config.fail == "open")
        self.config = config
        self.hostname = hostname
        self.url = config.url.rstrip("/") + "/checkv2"
        # The operator's mapping of the three actions that refuse (the others have none).
        self._mapping: dict[str, str] = {"reject": config.reject_action,
                                         "soft reject": config.soft_reject_action,
                                         "greylist": config.greylist_action}
        self._header, self._spam_header = config.header, config.spam_header
        self._password = config.password
        self._unscanned = Verdict(headers=tuple(
            HeaderChange("remove", name) for name in (config.header, config.spam_header)
            if name))
        #: rspamd down and failing open: the sender's copies of our fields go all the same.
        self.fail_headers = self._unscanned.headers
        self._lookup = lookup
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # The chain bounds each call by ``timeout``; the client's own bound is the same, so
        # a call the chain did not wrap still ends.  No proxy from the environment.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), trust_env=False)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def data(self, session: Session, tx: Transaction,
             message: Message) -> Verdict | Awaitable[Verdict]:
        if message.size > self.config.max_size:
            log.info("%s: not scanned by rspamd: %d bytes, over max_size %d",
                     session.session_id, message.size, self.config.max_size)
            # Unscanned: a verdict the sender wrote in our fields must not pass for ours.
            return self._unscanned
        return self._check(session, tx, message)

    def request_headers(self, session: Session, tx: Transaction,
                        client_name: str | None = None) -> CIMultiDict[str]:
        """The envelope as rspamd's protocol takes it (§ "HTTP request")."""
        headers: CIMultiDict[str] = CIMultiDict()
        headers["IP"] = str(session.client_ip)
        if client_name:
            headers["Hostname"] = _value(client_name)
        if session.helo:
            headers["Helo"] = _value(session.helo)
        # The null reverse path is "<>" (RFC 5321 §4.5.5): rspamd reads it as a bounce.
        headers["From"] = _value(tx.sender) if tx.sender else "<>"
        for rcpt in tx.recipients:
            headers.add("Rcpt", _value(rcpt.mailbox))
        if session.auth_user:
            headers["User"] = _value(session.auth_user)
        headers["MTA-Name"] = _value(self.hostname)
        if session.tls:
            tls = dict(part.partition("=")[::2] for part in session.tls_info.split())
            if tls.get("version"):
                headers["TLS-Version"] = _value(tls["version"])
            if tls.get("cipher"):
                headers["TLS-Cipher"] = _value(tls["cipher"])
        if self._password:
            headers["Password"] = self._password
        return headers

    async def _check(self, session: Session, tx: Transaction, message: Message) -> Verdict:
        if self._http is None:
            raise RspamdError("the rspamd agent was not started")
        client_name = await self.client_name(session.client_ip)
        headers = self.request_headers(session, tx, client_name)
        async with self._http.post(self.url, data=MessagePayload(message.data),
                                   headers=headers) as answer:
            body = await answer.content.read(MAX_ANSWER + 1)
            if answer.status != 200:
                raise RspamdError(f"{self.url} answered HTTP {answer.status}: "
                                  f"{printable(body.decode('utf-8', 'replace'), 200)}")
        if len(body) > MAX_ANSWER:
            raise RspamdError(f"{self.url} answered more than {MAX_ANSWER} bytes")
        try:
            result = json.loads(body)
        except ValueError as err:
            raise RspamdError(f"{self.url} answered no JSON: {err}") from None
        if not isinstance(result, dict) or not isinstance(result.get("action"), str):
            raise RspamdError(f"{self.url} answered no action")
        verdict = self.verdict(result)
        log.debug("%s: rspamd %s, score %s: %s", session.session_id, result["action"],
                  result.get("score"), verdict.action.value)
        return verdict

    async def client_name(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        """The client's forward-confirmed reverse DNS name, or None."""
        if self._lookup is None:
            return None
        try:
            names = (await self._lookup.ptr(str(ip))).records
            forward: RecordType = "A" if ip.version == 4 else "AAAA"
            for name in names[:MAX_PTR_NAMES]:
                for address in (await self._lookup.query(name, forward)).records:
                    if ipaddress.ip_address(address) == ip:
                        return name
        except DnsError as err:
            log.debug("rspamd: no host name for %s: %s", ip, err)
        return None

    def verdict(self, result: Mapping[str, Any]) -> Verdict:
        """The verdict for rspamd's answer ``result`` (the decoded /checkv2 JSON)."""
        action = str(result["action"])
        score, required = _number(result.get("score")), _number(result.get("required_score"))
        messages = result.get("messages")
        smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
        text = printable(smtp_message, 200) if isinstance(smtp_message, str) else ""
        reason = f"{action} (score {score:.2f} / {required:.2f})"

        mapping = self._mapping.get(action)
        if mapping == "reject":
            return reject(text or "Spam message rejected", 550, "5.7.1", reason=reason)
        if mapping == "tempfail":
            default = ("Greylisted, try again later" if action == "greylist"
                       else "Try again later")
            return tempfail(text or default, 451, "4.7.1", reason=reason)
        if mapping is None and action not in _SPAM_ACTIONS and action != "no action":
            log.warning("rspamd answered an unknown action %r: taken as no action",
                        printable(action, 40))
        spam = action in _SPAM_ACTIONS or mapping in ("tag", "hold")
        changes = self._header_changes(result, spam, score, required)
        if action == "rewrite subject" and isinstance(result.get("subject"), str):
            # rspamd encodes a non-ASCII subject itself (RFC 2047 encoded words).
            changes.append(HeaderChange("replace", "Subject",
                                        _fold(printable(result["subject"], MAX_SUBJECT))))
        if mapping == "hold":
            return Verdict(Action.HOLD, headers=tuple(changes), reason=reason)
        return Verdict(headers=tuple(changes), reason=reason if spam else "")

    def _header_changes(self, result: Mapping[str, Any], spam: bool, score: float,
                        required: float) -> list[HeaderChange]:
        changes: list[HeaderChange] = []
        if self._header:
            changes.append(HeaderChange("replace", self._header,
                                        result_field(result, spam, score, required)))
        if self._spam_header:
            changes.append(HeaderChange("replace", self._spam_header, "Yes") if spam
                           else HeaderChange("remove", self._spam_header))
        return changes


class MessagePayload(aiohttp.payload.Payload):
    """The message as a request body with its Content-Length: written in chunks that are
    views of the session's buffer, each drained before the next (aiohttp's BytesPayload
    would hand the whole buffer to the transport at once)."""

    _autoclose = True

    def __init__(self, data: bytes) -> None:
        super().__init__(data, content_type="message/rfc822")
        self._size = len(data)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter,
                                content_length: int | None) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        for chunk in chunks(view):
            await writer.write(chunk)


def result_field(result: Mapping[str, Any], spam: bool, score: float,
                 required: float) -> str:
    """The result field's value, as rspamd's own milter_headers writes X-Spamd-Result:
    ``default: True [15.00 / 15.00];`` then one ``SYMBOL(score)[options]`` per folded
    line, the heaviest first."""
    symbols = result.get("symbols")
    rows: list[tuple[float, str, str]] = []
    if isinstance(symbols, dict):
        for name, symbol in symbols.items():
            if not isinstance(symbol, dict):
                continue
            options = symbol.get("options")
            shown = [printable(str(o), 64, drop="[],;") for o in options[:MAX_OPTIONS]] \
                if isinstance(options, list) else []
            weight = _number(symbol.get("score"))
            rows.append((weight, printable(str(name), 64, drop="[]();"), ",".join(shown)))
    rows.sort(key=lambda r: (-abs(r[0]), r[1]))
    lines = [f"default: {spam} [{score:.2f} / {required:.2f}]"]
    lines += [f"{name}({weight:.2f})[{options}]" for weight, name, options in
              rows[:MAX_SYMBOLS]]
    # Folded (RFC 5322 §2.2.3): each line short, one symbol per line.
    return ";\r\n\t".join(lines)


def _fold(text: str, width: int = 76) -> str:
    """``text`` folded at spaces (RFC 5322 §2.2.3) so no line passes ``width`` where a
    space allows it; "Subject: " is counted on the first line."""
    lines: list[str] = []
    line = "Subject:"
    for word in text.split(" "):
        if len(line) + 1 + len(word) > width and line.strip() and line != "Subject:":
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines)[len("Subject: "):]


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else 0.0


def _value(text: str) -> str:
    """An envelope value as a request header: no control characters (aiohttp refuses
    CR and LF; the rest would confuse rspamd's parser)."""
    return "".join("?" if c < " " or c == "\x7f" else c for c in text)


def build_rspamd(ctx: ScannerContext) -> RspamdAgent:
    """The "rspamd" agent from [agents.rspamd]."""
    return RspamdAgent(ctx.config.agents.rspamd, ctx.hostname, ctx.lookup)
