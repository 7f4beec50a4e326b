"""The lookup state machine against simulated networks, on a manual clock.

A "network" is a population of random IDs and a rule for what each node answers
to a FIND for a target. The driver plays the part of ``DhtNode._run_lookup``:
it sends what :meth:`Lookup.next` asks for, delivers answers after random
latencies (slow peers always answer after the soft peer timeout), reports
silent peers as failed after an RPC timeout, and advances the clock only to the
next event or to the ``Wait.until`` the lookup asked for.

A lookup does not wait for a peer past the soft timeout, so its result is
compared with the brute-force k closest of the live peers that had answered by
the time it finished.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.lookup import MAX_CANDIDATES_FACTOR, Finished, Lookup, Query, Wait
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.routing import Contact, RoutingTable

PEER_TIMEOUT = 0.15
RPC_TIMEOUT = 1.0

Answer = Callable[[bytes, int], list[bytes]]


def _dist(a: bytes, target: int) -> int:
    return int.from_bytes(a, "big") ^ target


def _contact(nid: bytes) -> Contact:
    # A fresh object every time: the lookup must deduplicate by ID, not by identity.
    return Contact(nid, "10.0.0.1", 1 + int.from_bytes(nid[:2], "big"))


@dataclass
class Trace:
    """What the driver observed while running one lookup."""

    sent: list[bytes] = field(default_factory=list)
    unanswered: set[bytes] = field(default_factory=set)  # queried, no answer when it finished
    steps: int = 0
    max_active: int = 0
    result: Finished | None = None


def drive(
    lk: Lookup,
    answer: Answer,
    failed: set[bytes],
    rng: random.Random,
    *,
    k: int,
    alpha: int,
    slow: set[bytes] = frozenset(),  # type: ignore[assignment]
) -> Trace:
    """Run ``lk`` to completion, checking the in-flight bound at every query.

    :param answer: ``answer(node, target)`` -> the IDs ``node`` names.
    :param failed: nodes that never answer; they are reported failed after RPC_TIMEOUT.
    :param slow: nodes that answer only after the soft peer timeout.
    """
    now = 0.0
    events: list[tuple[float, int, bytes]] = []  # (time, seq, node)
    sent_at: dict[bytes, float] = {}
    pending: set[bytes] = set()
    trace = Trace()
    seq = 0
    after_query: float | None = None
    while True:
        trace.steps += 1
        step = lk.next(now)
        if after_query is not None:
            # What a Query said the very next call would answer (drivers rely on it).
            assert step == Wait(after_query), f"{step} after a Query promising {after_query}"
            after_query = None
        if isinstance(step, Finished):
            trace.result = step
            trace.unanswered = set(pending)
            return trace
        if isinstance(step, Query):
            assert step.contacts, "a Query must name someone"
            for c in step.contacts:
                assert c.id not in sent_at, "queried twice"
                sent_at[c.id] = now
                pending.add(c.id)
                trace.sent.append(c.id)
                if c.id in failed:
                    at = now + RPC_TIMEOUT
                elif c.id in slow:
                    at = now + PEER_TIMEOUT + rng.uniform(0.001, 0.5)
                else:
                    at = now + rng.uniform(0.001, PEER_TIMEOUT * 0.9)
                seq += 1
                heapq.heappush(events, (at, seq, c.id))
            # In flight = sent, not answered, and not yet past the soft timeout.
            active = sum(1 for n in pending if sent_at[n] + PEER_TIMEOUT > now)
            limit = k if lk.stalled else alpha
            assert active <= limit, f"{active} queries in flight, limit {limit}"
            trace.max_active = max(trace.max_active, active)
            assert step.until is not None, "with a positive peer_timeout, a Query has an until"
            after_query = step.until
            continue
        assert isinstance(step, Wait)
        assert events, "the lookup waits for an answer nobody will send"
        if step.until is not None:
            assert step.until > now, "Wait.until must be in the future"
            if step.until < events[0][0]:
                now = step.until  # a soft timeout expires before the next answer
                continue
        at, _, nid = heapq.heappop(events)
        now = max(now, at)
        pending.discard(nid)
        if nid in failed:
            lk.on_failure(_contact(nid))
        else:
            lk.on_success(_contact(nid), [_contact(x) for x in answer(nid, lk.target)])


def _population(rng: random.Random, n: int) -> list[bytes]:
    ids = {rng.randbytes(20) for _ in range(n)}
    return sorted(ids)


def _k_closest(ids: list[bytes] | set[bytes], target: int, k: int) -> list[bytes]:
    return heapq.nsmallest(k, ids, key=lambda i: _dist(i, target))


def _step_bound(population: int) -> int:
    # Each step sends at least one new query, delivers one answer, or passes one
    # soft timeout; each of those happens at most once per node.
    return 3 * population + 2


lookup_params = {
    "seed": st.integers(0, 2**32 - 1),
    "n": st.integers(1, 150),
    "k": st.integers(1, 20),
    "alpha": st.integers(1, 5),
    "n_initial": st.integers(1, 25),
    "slow_ratio": st.sampled_from([0.0, 0.0, 0.1, 0.3]),
}


def _split(
    rng: random.Random, population: list[bytes], fail_ratio: float, slow_ratio: float
) -> tuple[set[bytes], set[bytes]]:
    """Pick the silent nodes and, among the others, the slow ones."""
    failed = {i for i in population if rng.random() < fail_ratio}
    slow = {i for i in population if i not in failed and rng.random() < slow_ratio}
    return failed, slow


@settings(max_examples=150, deadline=None)
@given(**lookup_params, fail_ratio=st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.6]))
def test_lookup_in_a_well_informed_world_returns_the_k_closest_live_nodes(
    seed: int, n: int, k: int, alpha: int, n_initial: int, slow_ratio: float, fail_ratio: float
) -> None:
    """Every node knows the whole population. It names the k closest nodes that answer
    in time, plus every silent or slow node closer than the farthest of those (as a
    real node that has not noticed yet would). The lookup must return exactly the
    brute-force k closest of the live nodes that had answered when it finished.
    """
    rng = random.Random(seed)
    ids = _population(rng, n + 1)
    own, population = ids[0], ids[1:]
    failed, slow = _split(rng, population, fail_ratio, slow_ratio)
    prompt = [i for i in population if i not in failed and i not in slow]
    target_b = rng.randbytes(20)
    target = int.from_bytes(target_b, "big")
    best_prompt = _k_closest(prompt, target, k)
    bound = _dist(best_prompt[-1], target) if len(best_prompt) == k else 1 << 160
    extras = [i for i in population if i in failed | slow and _dist(i, target) <= bound]

    def answer(node: bytes, t: int) -> list[bytes]:
        assert t == target
        named = best_prompt + extras
        if rng.random() < 0.5:
            named.append(own)  # our own ID comes back: it must never become a candidate
        if rng.random() < 0.3 and named:
            named.append(named[0])  # duplicates too
        rng.shuffle(named)
        return named

    # At most as many starting contacts as the lookup keeps candidates (see the next test).
    n_start = min(n_initial, len(population), k * MAX_CANDIDATES_FACTOR)
    initial = [_contact(i) for i in rng.sample(population, n_start)]
    lk = Lookup(target_b, initial, k=k, alpha=alpha, peer_timeout=PEER_TIMEOUT, own_id=own)
    trace = drive(lk, answer, failed, rng, k=k, alpha=alpha, slow=slow)

    assert trace.result is not None
    assert trace.steps <= _step_bound(n)
    assert own not in trace.sent
    assert len(trace.sent) == len(set(trace.sent)) == trace.result.queried
    got = [c.id for c in trace.result.closest]
    assert not set(got) & (failed | trace.unanswered)
    assert got == sorted(got, key=lambda i: _dist(i, target))
    answered_in_time = [i for i in population if i not in failed and i not in trace.unanswered]
    within_bound = len(extras) < (MAX_CANDIDATES_FACTOR - 1) * k
    if any(c.id in prompt for c in initial) and within_bound:
        assert got == _k_closest(answered_in_time, target, k)
        assert trace.result.hops >= 1
        if not slow:
            assert got == best_prompt  # the true k closest live nodes
    elif not any(c.id not in failed for c in initial):
        assert got == []  # every starting contact was silent: nothing to learn from


def _kademlia_world(
    rng: random.Random, population: list[bytes], ksize: int
) -> dict[bytes, RoutingTable]:
    """Each node's real routing table (k-buckets) after hearing of everyone, in random order."""
    tables: dict[bytes, RoutingTable] = {}
    for nid in population:
        table = RoutingTable(nid, ksize=ksize)
        others = list(population)
        rng.shuffle(others)
        for o in others:
            table.add_contact(_contact(o))
        tables[nid] = table
    return tables


@settings(max_examples=50, deadline=None)
@given(**{**lookup_params, "n": st.integers(1, 60)}, fail_ratio=st.sampled_from([0.0, 0.2, 0.5]))
def test_lookup_in_a_kademlia_world_terminates_and_stays_consistent(
    seed: int, n: int, k: int, alpha: int, n_initial: int, slow_ratio: float, fail_ratio: float
) -> None:
    """Nodes answer from real k-bucket tables (they know only part of the world).

    Whatever the answers, the lookup terminates within the step bound, never
    queries twice or itself, respects the in-flight bound (checked by the
    driver), and its result is nearest first, all of it answered, none of it
    failed, and (within the candidate bound) exactly the brute-force k closest
    of the nodes it learned of that had answered when it finished.
    """
    rng = random.Random(seed)
    ids = _population(rng, n + 1)
    own, population = ids[0], ids[1:]
    tables = _kademlia_world(rng, ids, ksize=k)
    failed, slow = _split(rng, population, fail_ratio, slow_ratio)
    target_b = rng.randbytes(20)
    target = int.from_bytes(target_b, "big")
    learned: set[bytes] = set()

    def answer(node: bytes, t: int) -> list[bytes]:
        # As a real node does, leave the asker out of the reply (else k=1 names only it).
        named = [c.id for c in tables[node].closest(t, k, exclude=(own,))]
        learned.update(named)
        return named

    initial = list(tables[own].closest(target_b, max(k, n_initial)))
    learned.update(c.id for c in initial)
    lk = Lookup(target_b, initial, k=k, alpha=alpha, peer_timeout=PEER_TIMEOUT, own_id=own)
    trace = drive(lk, answer, failed, rng, k=k, alpha=alpha, slow=slow)

    assert trace.result is not None
    assert trace.steps <= _step_bound(n)
    assert own not in trace.sent
    assert len(trace.sent) == len(set(trace.sent)) == trace.result.queried
    got = [c.id for c in trace.result.closest]
    assert not set(got) & (failed | trace.unanswered)
    assert set(got) <= set(trace.sent)
    assert got == sorted(got, key=lambda i: _dist(i, target))
    usable = learned - failed - trace.unanswered - {own}
    if len(failed | slow) < (MAX_CANDIDATES_FACTOR - 1) * k:
        # The lookup keeps the k * MAX_CANDIDATES_FACTOR closest candidates it heard
        # of; with fewer bad peers than that margin, the k closest usable ones are kept.
        assert got == _k_closest(usable, target, k)
    else:
        assert len(got) <= k
    if not failed and not slow:
        # With everyone answering promptly, k-bucket tables lead to the true k closest.
        assert got == _k_closest(population, target, k)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 20), alpha=st.integers(1, 4))
def test_no_progress_widens_to_k_and_never_beyond(seed: int, k: int, alpha: int) -> None:
    """Peers that name nobody new stall the lookup: it widens to k in flight, never more."""
    rng = random.Random(seed)
    population = _population(rng, 3 * k + 5)
    own, population = population[0], population[1:]
    target_b = rng.randbytes(20)
    initial = [_contact(i) for i in population]
    lk = Lookup(target_b, initial, k=k, alpha=alpha, peer_timeout=PEER_TIMEOUT, own_id=own)
    trace = drive(lk, lambda node, t: [], set(), rng, k=k, alpha=alpha)
    assert trace.result is not None
    target = int.from_bytes(target_b, "big")
    assert [c.id for c in trace.result.closest] == _k_closest(population, target, k)
    # Only the k closest starting contacts are ever queried.
    assert set(trace.sent) == set(_k_closest(population, target, k))
    if k > 2 * alpha:  # after alpha fruitless answers, more than alpha are left to ask
        assert trace.max_active > alpha  # it did widen
        assert lk.stalled


def test_soft_timeout_frees_the_slot_and_the_lookup_does_not_wait_for_the_slow() -> None:
    rng = random.Random(3)
    ids = _population(rng, 6)
    own, population = ids[0], ids[1:]
    target_b = rng.randbytes(20)
    a, b, c, d, e = _k_closest(population, int.from_bytes(target_b, "big"), 5)
    lk = Lookup(
        target_b,
        [_contact(i) for i in population],
        k=5,
        alpha=2,
        peer_timeout=PEER_TIMEOUT,
        own_id=own,
    )

    def queried(step: object) -> list[bytes]:
        assert isinstance(step, Query)
        return [x.id for x in step.contacts]

    assert queried(lk.next(0.0)) == [a, b]
    assert lk.next(0.01) == Wait(PEER_TIMEOUT)
    # Past the soft timeout A and B no longer hold the two slots ...
    t = PEER_TIMEOUT + 0.001
    assert queried(lk.next(t)) == [c, d]
    assert lk.next(t) == Wait(t + PEER_TIMEOUT)  # E waits for a slot
    # ... A's late answer still counts; C answers in time. Two fruitless answers in a
    # row stall the lookup, which widens: E goes out at once.
    lk.on_success(_contact(a), [])
    lk.on_success(_contact(c), [])
    assert lk.stalled
    assert queried(lk.next(t + 0.01)) == [e]
    lk.on_success(_contact(d), [])
    lk.on_success(_contact(e), [])
    done = lk.next(t + 0.02)
    assert isinstance(done, Finished)
    assert [x.id for x in done.closest] == [a, c, d, e]  # B is left out, not waited for
    assert done.queried == 5
    assert lk.next(t + 10) == done  # finished stays finished


def test_empty_start_finishes_at_once() -> None:
    lk = Lookup(b"\x01" * 20, [], k=20, alpha=3)
    step = lk.next(0.0)
    assert isinstance(step, Finished)
    assert (step.closest, step.hops, step.queried) == ([], 0, 0)


def test_a_flood_of_contacts_keeps_candidates_bounded() -> None:
    rng = random.Random(9)
    k = 4
    target_b = rng.randbytes(20)
    first = _contact(rng.randbytes(20))
    lk = Lookup(target_b, [first], k=k, alpha=1, peer_timeout=PEER_TIMEOUT)
    step = lk.next(0.0)
    assert isinstance(step, Query)
    lk.on_success(first, [_contact(rng.randbytes(20)) for _ in range(5_000)])
    queried_or_flying = 1
    assert len(lk._cands) <= k * MAX_CANDIDATES_FACTOR + queried_or_flying
    assert len(lk._order) == len(lk._cands)


# -- the lookup driver of DhtNode on real sockets ---------------------------------------------


@pytest.mark.parametrize("behind", [1, 2, 3, 4])
async def test_a_lookup_learns_every_contact_a_peer_names(behind: int) -> None:
    """SEEKER knows only GATE; GATE knows ``behind`` more nodes, which the lookup must reach.

    Regression: a ds_find_node reply of exactly 3 contacts was read as a ds_find_value
    reply ``[contacts, records, next]`` and the lookup learned none of them.
    """
    cfg = NodeConfig(rpc_timeout=0.5, rpc_retries=1, peer_timeout=2.0)  # everyone answers
    nodes: list[DhtNode] = []
    try:
        for _ in range(behind + 2):
            n = DhtNode(os.urandom(20), cfg)
            nodes.append(n)
            await n.listen_udp()
        seeker, gate, *hidden = nodes
        for h in hidden:
            await asyncio.wait_for(h.ping(gate.address), 5)  # type: ignore[arg-type]
        await asyncio.wait_for(seeker.ping(gate.address), 5)  # type: ignore[arg-type]
        res = await asyncio.wait_for(seeker.find_nodes(os.urandom(20)), 5)
        assert {c.id for c in res.closest} == {gate.id, *(h.id for h in hidden)}
    finally:
        for n in nodes:
            await n.close()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 120), k=st.integers(1, 12))
def test_skip_state_agrees_with_skips(seed: int, n: int, k: int) -> None:
    """The driver filters an answer with :meth:`Lookup.skip_state` computed once; it must
    name exactly the contacts :meth:`Lookup.skips` would, which are exactly those that
    adding would not keep (already candidates, or beyond the bounded candidate list)."""
    rng = random.Random(seed)
    target = rng.randbytes(20)
    lk = Lookup(target, [_contact(rng.randbytes(20)) for _ in range(n)], k=k)
    known, far = lk.skip_state()
    t = int.from_bytes(target, "big")
    probes = [rng.randbytes(20) for _ in range(50)] + [c.contact.id for c in lk._order[:5]]
    for nid in probes:
        fast = nid in known or (far is not None and int.from_bytes(nid, "big") ^ t >= far)
        assert fast == lk.skips(nid)
        if nid not in known:  # a new contact is kept exactly when it is not skipped
            lk2 = Lookup(target, [c.contact for c in lk._order], k=k)
            lk2._add([_contact(nid)], 2)
            assert (nid in lk2._cands) == (not lk.skips(nid))
