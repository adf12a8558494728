"""Index consistency: random operation sequences against a plain model (Hypothesis stateful).

The model is a dict of queue id → recipients [(next hop, state, due)].  After every step
the store's indexes, read through the public API, must say exactly what the model implies:
which messages each next hop has, which recipient states each message has, which
(message, hop) groups are due and when.  Reopening the store in between changes nothing.
Holds and releases (whole-message changes) mix with the outcomes: a held recipient keeps
its state over any outcome but a final one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from engine.queue.api import Change, Outcome
from engine.queue.lmdb_store import LmdbQueue
from engine.queue.records import Envelope, RcptState, Recipient

HOPS = ["a.test", "b.test", "c.test"]
FAR = time.time() + 10 * 365 * 86400
NOT_FINAL = {RcptState.PENDING, RcptState.DEFERRED, RcptState.SUSPENDED, RcptState.HELD,
             RcptState.POISON}
PARKED = {RcptState.HELD, RcptState.POISON}


@dataclass
class R:
    hop: str
    state: RcptState = RcptState.PENDING
    due: float = 0.0


class QueueModel(RuleBasedStateMachine):
    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ferry-model-")
        self.store = LmdbQueue(self.dir, min_free_disk=0, map_size=8 << 20)
        self.model: dict[bytes, list[R]] = {}
        self.bodies: dict[bytes, bytes] = {}

    def teardown(self) -> None:
        self.store.close_sync()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(target=messages, hops=st.lists(st.sampled_from(HOPS), min_size=1, max_size=4),
          body=st.binary(max_size=64))
    def enqueue(self, hops: list[str], body: bytes) -> bytes:
        env = Envelope("s@x.test", [Recipient(f"r{i}@{h}", h) for i, h in enumerate(hops)])
        qid = self.store.enqueue_sync(env, body)
        self.model[qid] = [R(h) for h in hops]
        self.bodies[qid] = body
        return qid

    @rule(qid=messages, index=st.integers(0, 3), state=st.sampled_from(list(RcptState)),
          delay=st.integers(0, 1000))
    def outcome(self, qid: bytes, index: int, state: RcptState, delay: int) -> None:
        due = 1_000_000.0 + delay
        self.store.record_sync([Outcome(qid, index, state, "reply", due=due)])
        rcpts = self.model.get(qid)
        if rcpts is None or index >= len(rcpts) or rcpts[index].state not in NOT_FINAL:
            return
        if rcpts[index].state in PARKED and state in NOT_FINAL:
            return  # a hold outlives an outcome that is not final
        rcpts[index].state = state
        if state is RcptState.DEFERRED:
            rcpts[index].due = due
        if all(r.state not in NOT_FINAL for r in rcpts):
            del self.model[qid]

    @rule(qid=messages, release=st.booleans())
    def hold_or_release(self, qid: bytes, release: bool) -> None:
        now = 2_000_000.0
        self.store.change_sync([Change(qid, "release" if release else "hold", now)])
        for r in self.model.get(qid, []):
            if release and r.state in PARKED:
                r.state, r.due = RcptState.PENDING, now
            elif not release and r.state in NOT_FINAL - PARKED:
                r.state = RcptState.HELD

    @rule()
    def reopen(self) -> None:
        self.store.close_sync()
        self.store = LmdbQueue(self.dir, min_free_disk=0, map_size=8 << 20)

    @invariant()
    def indexes_match_the_model(self) -> None:
        store, model = self.store, self.model
        assert store.count() == len(model)
        for hop in HOPS:
            expected = {q for q, rs in model.items()
                        if any(r.hop == hop and r.state in NOT_FINAL for r in rs)}
            assert set(store.ids_for_hop(hop, 10_000)) == expected, hop
        for state in RcptState:
            expected = {q for q, rs in model.items() if any(r.state is state for r in rs)}
            assert set(store.ids_in_state(state.value, 10_000)) == expected, state
        expected_due: dict[tuple[bytes, str], float] = {}
        for q, rs in model.items():
            for r in rs:
                if r.state in (RcptState.PENDING, RcptState.DEFERRED):
                    key = (q, r.hop)
                    expected_due[key] = min(expected_due.get(key, float("inf")), r.due)
        got = {(e.queue_id, e.next_hop): e.due for e in store.due(FAR, 10_000)}
        assert got == expected_due
        entries = store.due(FAR, 10_000)
        assert [e.key for e in entries] == sorted(e.key for e in entries)
        for q in model:
            assert store.body(q) == self.bodies[q]


QueueModel.TestCase.settings = settings(max_examples=40, stateful_step_count=25,
                                        deadline=None)
TestQueueModel = QueueModel.TestCase
