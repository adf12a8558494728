"""The "ratelimit" agent's cost: time per session through the agent chain, and memory per
tracked key at the ``max_keys`` bound.

Time: each session is connect, MAIL, two RCPTs and disconnect through an
engine.agents.chain.Chain holding the ratelimit agent (every per-address limit on, set high
enough never to trip) against the same chain holding an agent that accepts at each of those
stages (the baseline: the chain's own cost).  Clients come from twice ``max_keys``
addresses, so the table is full and every new key evicts.

Memory: tracemalloc's figure for a full table (``max_keys`` keys, all four rates counted)
against a dict of one float per key (the least any per-key state can cost).

    .venv/bin/python benchmarks/bench_ratelimit.py [--sessions N] [--keys N]
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import time
import tracemalloc

from engine.agents.api import ACCEPT, Agent, Session, Stage, Transaction, Verdict
from engine.agents.chain import Chain
from engine.agents.ratelimit import RateLimitAgent
from engine.config import RateLimitAgentConfig
from engine.protocol.command import Command, parse_command
from engine.testing.clock import ManualClock

HIGH = 10**9


class Accepting(Agent):
    """The baseline agent: the same stages, nothing counted."""

    name = "accepting"

    def connect(self, session: Session) -> Verdict:
        return ACCEPT

    def mail(self, session: Session, tx: Transaction) -> Verdict:
        return ACCEPT

    def rcpt(self, session: Session, tx: Transaction, rcpt: Command) -> Verdict:
        return ACCEPT

    def disconnect(self, session: Session) -> None:
        return None


def limited(keys: int, clock: ManualClock | None = None) -> RateLimitAgent:
    return RateLimitAgent(clock=clock or time.monotonic, config=dataclasses.replace(
        RateLimitAgentConfig(), connections_per_minute=HIGH, concurrent_connections=HIGH,
        messages_per_minute=HIGH, recipients_per_minute=HIGH, auth_failures_per_hour=HIGH,
        auth_failure_delay=0, max_keys=keys))


def sessions(n: int, addresses: int) -> list[Session]:
    return [Session(session_id=f"s{i}", connector="bench",
                    client_ip=ipaddress.IPv4Address(0x0A000000 + i % addresses))
            for i in range(n)]


def per_session(chain: Chain, batch: list[Session]) -> float:
    """Best of three passes: seconds per session."""
    tx = Transaction(mail=parse_command(b"MAIL FROM:<a@client.test>"))
    rcpt = parse_command(b"RCPT TO:<b@example.test>")
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for s in batch:
            chain.run(Stage.CONNECT, s)
            chain.run(Stage.MAIL, s, tx)
            chain.run(Stage.RCPT, s, tx, rcpt)
            chain.run(Stage.RCPT, s, tx, rcpt)
            chain.disconnect(s)
        best = min(best, (time.perf_counter() - start) / len(batch))
    return best


def bytes_per_key(keys: int) -> tuple[float, float]:
    batch = sessions(keys, keys)
    # A clock that stands still: no entry goes stale, so the table fills to the bound.
    agent = limited(keys, ManualClock())
    tx = Transaction(mail=parse_command(b"MAIL FROM:<a@client.test>"))
    rcpt = parse_command(b"RCPT TO:<b@example.test>")
    tracemalloc.start()
    for s in batch:
        agent.connect(s)
        agent.mail(s, tx)
        agent.rcpt(s, tx, rcpt)
        agent.auth(s, "x", False)
        agent.disconnect(s)
    assert len(agent.tracker) == keys
    ours = tracemalloc.get_traced_memory()[0] / keys
    tracemalloc.stop()
    tracemalloc.start()
    floor = {str(s.client_ip): float(i) for i, s in enumerate(batch)}
    base = tracemalloc.get_traced_memory()[0] / len(floor)
    tracemalloc.stop()
    return ours, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    batch = sessions(args.sessions, 2 * args.keys)
    agent = limited(args.keys)
    ours = per_session(Chain([agent]), batch)
    base = per_session(Chain([Accepting()]), batch)
    print(f"time per session (connect, MAIL, 2 RCPT, disconnect), {args.sessions} sessions "
          f"from {2 * args.keys} addresses, max_keys {args.keys}:")
    print(f"  ratelimit {ours * 1e6:.2f} us   baseline {base * 1e6:.2f} us   "
          f"ratio {ours / base:.1f}x   (evicted live: {agent.tracker.evicted_live})")
    mem, floor = bytes_per_key(args.keys)
    print(f"memory per key at {args.keys} keys: ratelimit {mem:.0f} B   "
          f"dict of one float {floor:.0f} B   ratio {mem / floor:.1f}x   "
          f"(table: {mem * args.keys / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
