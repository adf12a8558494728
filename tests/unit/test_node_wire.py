"""The node coordinator's request lines (engine.cluster.node): any line is answered, or
is refused with ValueError (the connection is then closed), never another exception; and
the counts it keeps stay whole (no key below zero, nothing left after every lease is
given back)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cluster.node import NodeCoordinator, _Peer

VERBS = [b"A", b"R", b"K", b"G", b"C", b"N", b"X", b""]
FIELD = st.one_of(st.integers(-5, 10).map(lambda n: str(n).encode()),
                  st.sampled_from([b"nan", b"inf", b"1e999", b"0.5", b"site", b"a b"]),
                  st.binary(max_size=12))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(VERBS), st.lists(FIELD, max_size=4)),
                max_size=12))
def test_any_line_is_answered_or_refused(requests: list[tuple[bytes, list[bytes]]]) -> None:
    async def main() -> None:
        coordinator = NodeCoordinator(Path("/nonexistent/limits.sock"))
        peer = _Peer(coordinator)
        for verb, fields in requests:
            line = b" ".join([verb, *fields]).replace(b"\n", b"")
            try:
                answer = coordinator._request(peer, line)
            except ValueError:
                continue
            assert answer is None or answer.endswith(b"\n")
        assert all(n > 0 for n in coordinator.leases.values())
        assert sum(coordinator.leases.values()) == sum(len(m) for m in peer.leases.values())
        coordinator._peers.add(peer)
        coordinator._closed(peer)  # the worker's connection ends: everything returns
        assert coordinator.leases == {}

    asyncio.run(main())


#: Requests of two workers and the coordinator's answers, in order (the state carries on).
TABLE: list[tuple[int, bytes, bytes | None]] = [
    (0, b"A 1 2 site", b"1\n"),
    (1, b"A 1 2 site", b"1\n"),  # members are per worker: worker 1's "1" is its own
    (0, b"A 2 2 site", b"0\n"),  # the limit of 2 is taken
    (0, b"A 3 3 site", b"1\n"),  # the limit each request names counts (a reload raised it)
    (1, b"A 2 1 other site", b"1\n"),  # a key is the rest of the line
    (0, b"R 1 site", None),
    (0, b"R 9 site", None),  # not held: ignored
    (1, b"A 3 3 site", b"1\n"),
    (0, b"C 20000 1 site", b"1\n"),
    (1, b"C 20000 1 site", b"0\n"),  # one cap for the node
    (1, b"N 20000 5 other", None),
    (1, b"C 20000 5 other", b"0\n"),  # 5 counted while the coordinator was away
    (1, b"C 20001 5 other", b"1\n"),  # a new UTC day
]


def test_requests_of_two_workers_in_order() -> None:
    coordinator = NodeCoordinator(Path("/nonexistent/limits.sock"))
    peers = [_Peer(coordinator), _Peer(coordinator)]
    for worker, line, answer in TABLE:
        assert coordinator._request(peers[worker], line) == answer, line
    assert coordinator.leases == {"site": 3, "other site": 1}
    coordinator._peers.update(peers)
    coordinator._closed(peers[1])
    assert coordinator.leases == {"site": 1}
