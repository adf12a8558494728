"""MTA-STS (RFC 8461): the TXT record, the policy fetched over HTTPS, its cache.

A policy domain publishes ``_mta-sts.<domain> TXT "v=STSv1; id=..."`` (§3.1) and serves
its policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.3) with a
certificate valid for that name, no redirects, a 200 and ``text/plain``.  The policy
(§3.2) is parsed strictly: ``version: STSv1``, ``mode`` (enforce, testing, none),
``max_age`` (0 to 31557600) and, unless the mode is none, at least one ``mx`` pattern;
anything else is no policy.

:class:`StsCache` keeps each domain's policy for its ``max_age`` and looks at the TXT
record again when that record's TTL has run out: a new id means a new fetch (§5.1); a
missing TXT record or a failed fetch leaves a policy still within its ``max_age`` in
force (§5.1, "continue using the cached policy"), which is the point of MTA-STS against
an attacker who strips the record.  A delivery waits for DNS only at the first contact
with a domain, and then not long: the MX resolver starts the TXT lookup beside the MX
lookup (``prefetch``); later looks run in the background while the policy held stays in
force.  The cache is kept in the spool
(``mta-sts.json``) so that a restart keeps what it learned; the file is written in a
thread.

It must never decide how to deliver (engine.tlspolicy.policy does) and never block the
event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
import dns.exception
import dns.rdatatype

from engine.routing.api import RouteError
from engine.routing.mx import MxResolver, settle

log = logging.getLogger(__name__)

#: RFC 8461 §3.2: max_age is at most 31557600 (about a year).
MAX_AGE: Final = 31_557_600
#: The TXT record is looked at again after its TTL, within these bounds (seconds).
MIN_RECHECK: Final = 1.0
MAX_RECHECK: Final = 3600.0
#: After a failed TXT lookup or fetch, ask again this soon.
RETRY_AFTER: Final = 300.0
#: Domains remembered at most; past that, those without a policy are forgotten first.
MAX_ENTRIES: Final = 100_000
#: The file in the spool that keeps the policies across restarts.
STS_FILE: Final = "mta-sts.json"

_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MX_PATTERN = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
                         r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class StsError(ValueError):
    """A TXT record or policy that breaks RFC 8461 §3."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """One domain's policy: ``mode`` "enforce" or "testing" ("none" is no policy)."""

    domain: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: ``host`` matches an ``mx`` pattern ("*." stands for exactly one
        leftmost label)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                head, _, tail = host.partition(".")
                if head and tail == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt(records: list[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT strings, None for no valid record.

    RFC 8461 §3.1: records not starting with "v=STSv1" are not STS records; more than one
    STS record, or one without a valid id, is no record."""
    found = [r for r in records if r.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            return None
        fields.setdefault(key, value)
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(domain: str, text: str, policy_id: str = "") -> StsPolicy | None:
    """The policy in ``text`` (RFC 8461 §3.2); None for mode "none".  Raises StsError."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        if not raw.strip():
            continue
        key, colon, value = raw.partition(":")
        if not colon:
            raise StsError(f"line without a colon: {raw[:60]!r}")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(pattern):
                raise StsError(f"bad mx pattern {value[:60]!r}")
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            if key in fields:
                raise StsError(f"{key} given twice")
            fields[key] = value
        # other keys: RFC 8461 §3.2 says to ignore them (extensions)
    if fields.get("version") != "STSv1":
        raise StsError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise StsError(f"mode must be enforce, testing or none (got {mode[:20]!r})")
    age = fields.get("max_age", "")
    if not (age.isdigit() and len(age) <= 10 and int(age) <= MAX_AGE):
        raise StsError(f"max_age must be 0 to {MAX_AGE} (got {age[:20]!r})")
    if mode == "none":
        return None
    if not mx:
        raise StsError("no mx pattern")
    return StsPolicy(domain, mode, tuple(mx), int(age), policy_id)


@dataclass(slots=True)
class _Entry:
    policy: StsPolicy | None
    #: The policy's id, its text (kept in the file) and when it expires (epoch seconds).
    id: str = ""
    text: str = ""
    expires: float = 0.0
    #: When to look at the TXT record again (monotonic).
    recheck: float = 0.0


class StsCache:
    """Policies per domain, fetched on demand, kept for ``max_age`` (in ``path``)."""

    def __init__(self, mx: MxResolver, *,
                 ca_file: str | None, timeout: float, max_size: int, port: int = 443,
                 path: Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self._mx = mx
        self.ca_file = ca_file
        self.timeout = timeout
        self.max_size = max_size
        self.port = port
        self.path = path
        self._clock = clock
        #: What a reload compares to tell whether this cache can stay.
        self.settings = (mx, ca_file, timeout, max_size, port)
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[StsPolicy | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        self._writing: asyncio.Task[None] | None = None
        #: Fetches made (tests tell a cached policy from a fresh one).
        self.fetches = 0
        self._load()

    # --- the file ------------------------------------------------------------------------

    def _load(self) -> None:
        """Read the policies kept by the last run (at start: before the loop serves)."""
        if self.path is None or not self.path.exists():
            return
        try:
            kept = json.loads(self.path.read_text(encoding="utf-8"))
            now = self._clock()
            for domain, item in kept.items():
                expires = float(item["expires"])
                if expires > now:
                    policy = parse_policy(domain, item["text"], item["id"])
                    self._entries[domain] = _Entry(policy, item["id"], item["text"], expires)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("MTA-STS policies in %s not used: %s", self.path, exc)

    def _save(self) -> None:
        if self.path is None:
            return
        kept = {d: {"id": e.id, "text": e.text, "expires": e.expires}
                for d, e in self._entries.items() if e.text}
        path = self.path

        def write() -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(kept), encoding="utf-8")
            os.replace(tmp, path)

        async def run() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, write)
            except OSError as exc:
                log.warning("MTA-STS policies not kept in %s: %s", path, exc)

        self._writing = asyncio.get_running_loop().create_task(run())

    # --- lookups -------------------------------------------------------------------------

    def cached(self, domain: str, now: float) -> tuple[StsPolicy | None, float] | None:
        """(policy, when to ask again, monotonic) without waiting; None for a domain not
        looked at yet (or still being looked at for the first time).

        A domain whose TXT record is due for a look keeps its policy meanwhile (§5.1:
        a cached policy holds for its max_age): the look runs in the background and the
        caller asks again in a second, so a delivery waits for DNS only on the first
        contact with a domain."""
        entry = self._entries.get(domain)
        if entry is None or (not entry.recheck and domain in self._inflight):
            return None
        recheck = entry.recheck
        if recheck <= now:
            self._start(domain)
            recheck = now + 1.0
        policy = entry.policy if entry.expires > self._clock() else None
        return policy, recheck

    def prefetch(self, domain: str) -> None:
        """Start looking at a domain not seen yet, without waiting (the MX resolver calls
        it when it starts an MX lookup: the TXT lookup runs beside it, not after it)."""
        if domain not in self._entries:
            self._start(domain)

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy in force for ``domain`` (looks and fetches when due)."""
        return await asyncio.shield(self._start(domain))

    def _start(self, domain: str) -> asyncio.Future[StsPolicy | None]:
        """The look at ``domain`` in flight, started now when none is."""
        future = self._inflight.get(domain)
        if future is None:
            future = asyncio.ensure_future(self._refresh(domain))
            self._inflight[domain] = future
            future.add_done_callback(lambda f: settle(self._inflight, domain, f))
        return future

    async def _refresh(self, domain: str) -> StsPolicy | None:
        now, mono = self._clock(), time.monotonic()
        entries = self._entries
        if domain not in entries and len(entries) >= MAX_ENTRIES:
            self._entries = entries = {d: e for d, e in entries.items()
                                       if e.policy is not None and e.expires > now}
            while len(entries) >= MAX_ENTRIES:
                del entries[next(iter(entries))]
        entry = entries.setdefault(domain, _Entry(None))
        alive = entry.policy if entry.expires > now else None
        # entry.recheck is set only when the look is over: until then a first look is
        # "in flight" for cached() (a delivery waits for it).
        try:
            policy_id, ttl = await self._txt(domain)
        except (dns.exception.DNSException, RouteError) as exc:
            log.info("MTA-STS TXT lookup for %s failed: %s", domain, exc)
            entry.recheck = mono + RETRY_AFTER
            return alive
        recheck = mono + min(max(ttl, MIN_RECHECK), MAX_RECHECK)
        if policy_id is None or (policy_id == entry.id and entry.expires > now):
            entry.recheck = recheck
            return alive  # §5.1: no record (an attacker may strip it) or the same policy
        try:
            text = await self._fetch(domain)
            policy = parse_policy(domain, text, policy_id)
        except (StsError, aiohttp.ClientError, OSError, TimeoutError, RouteError,
                UnicodeDecodeError) as exc:
            log.warning("MTA-STS policy of %s not fetched: %s", domain, exc)
            entry.recheck = min(mono + RETRY_AFTER, recheck)
            return alive
        age = policy.max_age if policy is not None else 0
        self._entries[domain] = _Entry(policy, policy_id, text, now + age, recheck)
        self._save()
        return policy

    async def _txt(self, domain: str) -> tuple[str | None, float]:
        """The id of the domain's STS record (None: none) and how long that answer holds."""
        # Through the MX resolver: its bound on queries in flight (dns_max_queries) holds
        # for these too, and a burst of new domains does not flood the resolver.
        answer = await self._mx.query(f"_mta-sts.{domain}", dns.rdatatype.TXT)
        if isinstance(answer, float):  # NXDOMAIN, with its negative TTL
            return None, answer or RETRY_AFTER
        if answer.rrset is None:
            return None, float(answer.chaining_result.minimum_ttl) or RETRY_AFTER
        texts = [b"".join(rd.strings).decode("utf-8", "replace") for rd in answer.rrset]
        return parse_txt(texts), float(answer.chaining_result.minimum_ttl)

    async def _fetch(self, domain: str) -> str:
        """The policy text from the domain's policy host (RFC 8461 §3.3)."""
        name = f"mta-sts.{domain}"
        hosts = await self._mx.addresses(name, self.port)
        if self._session is None:
            context = ssl.create_default_context(cafile=self.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context, limit=100),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.fetches += 1
        address = hosts[0].address
        shown = f"[{address}]" if ":" in address else address
        async with self._session.get(
                f"https://{shown}:{self.port}/.well-known/mta-sts.txt",
                headers={"Host": name}, server_hostname=name,
                allow_redirects=False) as response:  # §3.3: redirects are not followed
            if response.status != 200:
                raise StsError(f"{name} answered HTTP {response.status}")
            if response.content_type != "text/plain":
                raise StsError(f"{name} served {response.content_type}, not text/plain")
            body = await response.content.read(self.max_size + 1)
            if len(body) > self.max_size:
                raise StsError(f"{name}: policy larger than {self.max_size} bytes")
            return body.decode("utf-8")

    async def close(self) -> None:
        """Stop the looks in flight (background refreshes included) and the HTTP client."""
        pending = list(self._inflight.values())
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
