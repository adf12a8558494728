"""A DNS responder on loopback for tests: answers from zone text, over UDP and TCP.

``DnsResponder(zone_text)`` parses the text with dnspython (master-file format, RFC 1035
§5; many domains in one text) and answers queries for the names in it authoritatively:
the record sets asked for, CNAME chains inside the zone, NODATA (NOERROR, empty answer)
for a name that exists or has names below it but lacks the type asked, NXDOMAIN for a
name that is not in the zone.  Negative answers carry the SOA at ``origin`` when the text
has one (dnspython accepts a SOA at the origin only), else a made-up one whose TTL and
minimum are ``negative_ttl`` (RFC 2308 §3).  No wildcards, no delegations.  Names in
``servfail`` get SERVFAIL; queries for names in ``drop`` get no answer at all (a timeout
for the client); ``set_zone()`` swaps the records between tests.  ``queries`` counts the
questions received, so a test can tell a cached answer from a fresh one.  Lookups are
dictionary lookups, so a zone of thousands of domains answers as fast as one of a single
domain (parsing takes about 0.2 s per thousand records).

``servfail`` and ``drop`` also take a (name, type) pair (``servfail.add(name, "TXT")``), for
a server that fails only some types of a name.  ``set_rrsets()`` replaces the records with
dnspython record sets, for owner names and data that master-file text cannot carry
conveniently (spaces, raw octets: the zones of the RFC 7208 test suite).

``authentic = True`` sets the AD bit (RFC 4035 §3.2.3) on every NOERROR and NXDOMAIN
answer, as a validating resolver does for signed zones, except for the names (or name and
type pairs) in ``insecure``: a lab's stand-in for DNSSEC, for the DANE tests.

Run it in the caller's loop (``await start_async()`` / ``await stop_async()``) or in a
thread of its own (``start()`` / ``stop()``, or ``with DnsResponder(text) as dns:``).
Used by tests and benchmarks only; it must never be imported by the running server, and
it is not a DNS server to expose to a network (no recursion, no zone transfer, no rate
limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Final, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

__all__ = ["DnsResponder"]

#: The largest UDP answer without EDNS (RFC 1035 §4.2.1); a longer one is truncated (TC).
_UDP_PLAIN: Final = 512
_MAX_CNAMES: Final = 8

_Records = dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset]]


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.lower() if text.endswith(".") else text.lower() + ".")


class _NameSet:
    """A set of absolute names that accepts text with or without the final dot; an entry
    with a type ("TXT") stands for that type of the name only."""

    def __init__(self) -> None:
        self._names: set[dns.name.Name] = set()
        self._typed: set[tuple[dns.name.Name, dns.rdatatype.RdataType]] = set()

    def add(self, text: str, rdtype: str | None = None) -> None:
        if rdtype is None:
            self._names.add(_name(text))
        else:
            self._typed.add((_name(text), dns.rdatatype.from_text(rdtype)))

    def discard(self, text: str, rdtype: str | None = None) -> None:
        if rdtype is None:
            self._names.discard(_name(text))
        else:
            self._typed.discard((_name(text), dns.rdatatype.from_text(rdtype)))

    def clear(self) -> None:
        self._names.clear()
        self._typed.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def matches(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> bool:
        return name in self._names or (name, rdtype) in self._typed


class DnsResponder:
    """An authoritative-only DNS server for the records in ``zone_text``.

    ``origin`` completes relative names in the text ("." by default, so names are written
    absolute: ``example.test. 300 IN MX 10 mx.example.test.``).
    """

    def __init__(self, zone_text: str, origin: str = ".", *, negative_ttl: int = 60) -> None:
        self.origin = origin
        self.negative_ttl = negative_ttl
        #: Names answered with SERVFAIL; names whose queries are dropped.
        self.servfail = _NameSet()
        self.drop = _NameSet()
        #: Answer with the AD bit set, except for the names in ``insecure``.
        self.authentic = False
        self.insecure = _NameSet()
        #: (name text, type text) → number of queries received.
        self.queries: Counter[tuple[str, str]] = Counter()
        self._records: _Records = {}
        self._parents: frozenset[dns.name.Name] = frozenset()
        self.set_zone(zone_text)
        self.host = ""
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # --- the records ---------------------------------------------------------------------

    def set_zone(self, zone_text: str) -> None:
        """Replace every record with those of ``zone_text`` (atomic for the server)."""
        # dns.zone rather than dns.zonefile.read_rrsets: the latter is quadratic in the
        # number of record sets (seconds for a few thousand domains).
        zone = dns.zone.from_text(
            zone_text, origin=_name(self.origin), relativize=False, check_origin=False
        )
        self._install({
            name.canonicalize(): {rds.rdtype: rds for rds in node.rdatasets}
            for name, node in zone.nodes.items()
        })

    def set_rrsets(self, rrsets: Iterable[dns.rrset.RRset]) -> None:
        """Replace every record with ``rrsets`` (absolute owner names; record sets of one
        name and type are merged)."""
        merged: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], list[dns.rdata.Rdata]] = {}
        ttls: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], int] = {}
        for rrset in rrsets:
            key = (rrset.name.canonicalize(), rrset.rdtype)
            merged.setdefault(key, []).extend(rrset)
            ttls[key] = rrset.ttl
        records: _Records = {}
        for (owner, rdtype), rdatas in merged.items():
            records.setdefault(owner, {})[rdtype] = dns.rdataset.from_rdata_list(
                ttls[(owner, rdtype)], rdatas)
        self._install(records)

    def _install(self, records: _Records) -> None:
        parents: set[dns.name.Name] = set()
        for owner in records:
            parent = owner
            while parent != dns.name.root:
                parent = parent.parent()
                parents.add(parent)
        # One assignment each: a query running in the server's thread sees either the old
        # zone or the new one.
        self._records, self._parents = records, frozenset(parents)

    def count(self, name: str, rdtype: str) -> int:
        """How many queries for ``name`` and ``rdtype`` arrived."""
        return self.queries[(_name(name).to_text(), rdtype.upper())]

    # --- answering -----------------------------------------------------------------------

    def _soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        records = self._records
        cursor = name
        while True:
            found = records.get(cursor, {}).get(dns.rdatatype.SOA)
            if found is not None:
                return dns.rrset.from_rdata_list(cursor, found.ttl, list(found))
            if cursor == dns.name.root:
                break
            cursor = cursor.parent()
        origin = _name(self.origin)
        return dns.rrset.from_text(
            origin, self.negative_ttl, "IN", "SOA",
            f"ns.invalid. hostmaster.invalid. 1 3600 600 86400 {self.negative_ttl}",
        )  # fmt: skip

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or None to stay silent (a dropped name)."""
        response = dns.message.make_response(query)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        qname = question.name.canonicalize()
        rdtype = question.rdtype
        self.queries[(qname.to_text(), dns.rdatatype.to_text(rdtype))] += 1
        if self.drop.matches(qname, rdtype):
            return None
        if self.servfail.matches(qname, rdtype):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        if self.authentic and not self.insecure.matches(qname, rdtype):
            response.flags |= dns.flags.AD
        records = self._records
        name = qname
        for _ in range(_MAX_CNAMES):
            node = records.get(name)
            if node is None:
                if name not in self._parents:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                response.authority.append(self._soa(name))
                return response
            found = node.get(rdtype)
            if found is None and rdtype == dns.rdatatype.ANY:
                for rds in node.values():
                    response.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
                return response
            if found is not None:
                response.answer.append(dns.rrset.from_rdata_list(name, found.ttl, list(found)))
                return response
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                response.authority.append(self._soa(name))
                return response
            response.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
            name = next(iter(cname)).target
        return response

    def _reply(self, data: bytes, limit: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        response = self.answer(query)
        if response is None:
            return None
        if limit is None:
            return response.to_wire(max_size=65535)
        size = max(_UDP_PLAIN, query.payload) if query.edns >= 0 else _UDP_PLAIN
        try:
            return response.to_wire(max_size=size)
        except dns.exception.TooBig:
            # RFC 2181 §9: set TC and send what fits; the client retries over TCP.
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
            return truncated.to_wire()

    # --- serving -------------------------------------------------------------------------

    async def start_async(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve UDP and TCP on ``host`` and the same port in the running loop."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(host, port)
            )
            bound = transport.get_extra_info("sockname")[1]
            _widen_receive_buffer(transport.get_extra_info("socket"))
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
            except OSError:
                transport.close()
                if port:
                    raise
                continue  # the TCP port of an ephemeral UDP port was taken: try another
            self._udp = transport
            self.host, self.port = host, bound
            return host, bound
        raise OSError("no port free for both UDP and TCP")

    async def stop_async(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # RFC 1035 §4.2.2 / RFC 7766 §8: each message is preceded by its 2-octet length.
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self._reply(await reader.readexactly(length), None)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Serve from a background thread with its own event loop; returns (host, port)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="dns-responder", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            return asyncio.run_coroutine_threadsafe(self.start_async(host, port), loop).result(10)
        except BaseException:
            self._halt()
            raise

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop_async(), loop).result(10)
        finally:
            self._halt()

    def _halt(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(10)
            loop.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __enter__(self) -> DnsResponder:
        if self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Bytes of queries the UDP socket may hold unread: a burst of thousands of queries (a
#: benchmark starting with mail for 1,000 domains) must not be dropped by the kernel
#: while the thread answers (the default, ~200 KiB, holds a few hundred datagrams).
_RECEIVE_BUFFER = 16 << 20


def _widen_receive_buffer(sock: socket.socket | None) -> None:
    if sock is None:
        return
    # SO_RCVBUFFORCE passes net.core.rmem_max (root only); SO_RCVBUF is capped by it.
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _RECEIVE_BUFFER)
            return
        except OSError:
            continue


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, responder: DnsResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.responder._reply(data, _UDP_PLAIN)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.testing.dns ZONE_FILE [--listen HOST:PORT]``: serve the zone
    until SIGTERM or SIGINT, in a process of its own (a benchmark's responder must not
    share a GIL with the benchmark, nor a test lab's with anything).  Prints
    ``listening HOST PORT`` once it serves."""
    import argparse
    import signal

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m engine.testing.dns",
                                     description="a loopback DNS responder for test labs")
    parser.add_argument("zone", help="zone file (master-file format, absolute names)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    with open(args.zone, encoding="utf-8") as f:
        responder = DnsResponder(f.read())

    async def serve() -> None:
        bound = await responder.start_async(host or "127.0.0.1", int(port))
        print("listening", *bound, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await responder.stop_async()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
