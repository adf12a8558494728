"""TLS-RPT (RFC 8460): aggregate reports of the TLS sessions to domains with a policy.

:class:`TlsReports` counts, per recipient domain and the policy applied (MTA-STS, DANE
TLSA, or none found), the sessions that got the TLS the policy asks for and those that
did not, with the failures' details (§4.3 result types).  Every ``interval`` seconds it
looks up each counted domain's ``_smtp._tls`` TXT record (§3: ``v=TLSRPTv1; rua=...``)
and POSTs the report (§4.4 JSON, gzip, ``application/tlsrpt+gzip``, §5.3) to its
``https:`` addresses; ``mailto:`` addresses are not served yet (logged).  Counts live in
memory only: a restart loses the period's counts, never mail.

It must never decide delivery (it is told what happened) and never block the loop.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import itertools
import json
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import dns.exception
import dns.rdatatype

from engine.routing.api import RouteError
from engine.routing.mx import MxResolver

log = logging.getLogger(__name__)

#: RFC 8460 §4.3 result types, chosen from a failure's reason text.
_RESULTS: Final = (
    ("does not offer STARTTLS", "starttls-not-supported"),
    ("Hostname mismatch", "certificate-host-mismatch"),
    ("hostname mismatch", "certificate-host-mismatch"),
    ("not valid for", "certificate-host-mismatch"),
    ("certificate has expired", "certificate-expired"),
    ("self-signed", "certificate-not-trusted"),
    ("self signed", "certificate-not-trusted"),
    ("unable to get local issuer", "certificate-not-trusted"),
    ("TLSA lookup", "dnssec-invalid"),
    ("DNSSEC-validated TLSA", "dane-required"),
    ("DANE", "validation-failure"),
    ("not an MX host listed", "validation-failure"),
)
_IDS = itertools.count(1)


def result_type(reason: str) -> str:
    """The RFC 8460 §4.3 result type of a failure's reason."""
    for needle, kind in _RESULTS:
        if needle in reason:
            return kind
    return "validation-failure"


def parse_rua(records: list[str]) -> tuple[str, ...]:
    """The report addresses of a domain's ``_smtp._tls`` TXT strings (RFC 8460 §3):
    exactly one record starting "v=TLSRPTv1"; () for none or a broken one."""
    found = [r for r in records if r.startswith("v=TLSRPTv1")]
    if len(found) != 1:
        return ()
    for part in found[0].split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key == "rua":
            return tuple(u.strip() for u in value.split(",") if u.strip())
    return ()


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy of a session, as a report names it (§4.4 "policy")."""

    kind: str  # "sts", "tlsa" or "no-policy-found"
    domain: str
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


@dataclass(slots=True)
class _Counts:
    success: int = 0
    failure: int = 0
    #: (result type, receiving MX host name, receiving IP) → failed sessions.
    details: dict[tuple[str, str, str], int] = field(default_factory=dict)


class TlsReports:
    """Counts sessions per policy and sends the reports every ``interval`` seconds."""

    def __init__(self, mx: MxResolver, *, organization: str, contact: str, interval: float,
                 ca_file: str | None, timeout: float = 30.0) -> None:
        self._mx = mx
        self.organization = organization
        self.contact = contact
        self.interval = interval
        self.ca_file = ca_file
        self.timeout = timeout
        #: What a reload compares to tell whether these counts can go on.
        self.settings = (mx, organization, contact, interval, ca_file)
        self._counts: dict[ReportPolicy, _Counts] = {}
        self._start = time.time()
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[int]] = set()
        #: Reports delivered so far (tests and metrics).
        self.sent = 0

    # --- counting (called by the SMTP client) ---------------------------------------------

    def success(self, policy: ReportPolicy) -> None:
        self._counts_of(policy).success += 1

    def failure(self, policy: ReportPolicy, reason: str, host: str, address: str) -> None:
        counts = self._counts_of(policy)
        counts.failure += 1
        key = (result_type(reason), host, address)
        counts.details[key] = counts.details.get(key, 0) + 1

    def _counts_of(self, policy: ReportPolicy) -> _Counts:
        counts = self._counts.get(policy)
        if counts is None:
            counts = self._counts[policy] = _Counts()
            if self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.interval, self._due)
        return counts

    def _due(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self.send_now())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # --- reporting ------------------------------------------------------------------------

    def reports(self, end: float | None = None) -> dict[str, dict[str, Any]]:
        """The period's reports per policy domain (RFC 8460 §4.4), and a new period."""
        end = time.time() if end is None else end
        counts, self._counts = self._counts, {}
        start, self._start = self._start, end
        by_domain: dict[str, list[dict[str, Any]]] = {}
        for policy, c in counts.items():
            entry: dict[str, Any] = {
                "policy": {"policy-type": policy.kind, "policy-string": list(policy.strings),
                           "policy-domain": policy.domain, "mx-host": list(policy.mx)},
                "summary": {"total-successful-session-count": c.success,
                            "total-failure-session-count": c.failure}}
            if c.details:
                entry["failure-details"] = [
                    {"result-type": kind, "receiving-mx-hostname": host,
                     "receiving-ip": address, "failed-session-count": n}
                    for (kind, host, address), n in sorted(c.details.items())]
            by_domain.setdefault(policy.domain, []).append(entry)
        return {domain: {
            "organization-name": self.organization,
            "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
            "contact-info": self.contact,
            "report-id": f"{_iso(end)}_{domain}_{next(_IDS)}",
            "policies": policies} for domain, policies in by_domain.items()}

    async def send_now(self) -> int:
        """Send the period's reports now; how many were delivered."""
        sent = 0
        for domain, report in self.reports().items():
            try:
                addresses = await self._rua(domain)
            except (dns.exception.DNSException, RouteError) as exc:
                log.info("TLS-RPT: no report for %s: %s", domain, exc)
                continue
            body = gzip.compress(json.dumps(report).encode())
            for address in addresses:
                if not address.startswith("https://"):
                    log.info("TLS-RPT: %s for %s not served (only https: reports)", address,
                             domain)
                    continue
                if await self._post(address, body):
                    sent += 1
        self.sent += sent
        return sent

    async def _rua(self, domain: str) -> tuple[str, ...]:
        answer = await self._mx.query(f"_smtp._tls.{domain}", dns.rdatatype.TXT)
        if isinstance(answer, float) or answer.rrset is None:
            return ()
        return parse_rua([b"".join(rd.strings).decode("utf-8", "replace")
                          for rd in answer.rrset])

    async def _post(self, url: str, body: bytes) -> bool:
        """POST one report (RFC 8460 §5.3); a 2xx is delivered."""
        context = ssl.create_default_context(cafile=self.ca_file)
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                    session.post(url, data=body, ssl=context, allow_redirects=False,
                                 headers={"Content-Type": "application/tlsrpt+gzip"}) as r:
                if 200 <= r.status < 300:
                    return True
                log.warning("TLS-RPT: %s answered HTTP %d", url, r.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("TLS-RPT: report to %s not delivered: %s", url, exc)
        return False

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
