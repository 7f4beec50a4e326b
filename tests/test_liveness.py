"""Contact liveness (BEP 5), ``ds_leave``, recently-failed contacts and strict lookups, in
the sans-I/O core: a manual clock, datagrams taken from the node and answered by the test.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.events import RecordsFound
from dhtsignal.dht.lookup import Finished, Lookup, Query, Wait
from dhtsignal.dht.node import Node
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import RecordType
from dhtsignal.dht.routing import DIALECT_DS, DIALECT_STOCK, Contact, RoutingTable
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

WALL = 1.7e9
ME: Addr = ("10.0.0.1", 4000)
ASKER: Addr = ("10.7.0.1", 7000)
#: Short bounds: good for 60 s, maintenance every 5 s, pings every 0.5 s.
CFG = NodeConfig(
    good_for=60.0, maintenance_interval=5.0, liveness_interval=0.5, rpc_timeout=0.4, rpc_retries=1
)


def _node(config: NodeConfig = CFG) -> Node:
    n = Node(os.urandom(20), config, wallclock=lambda: WALL)
    n.start(ME, 0.0)
    n.addrs.validate(ASKER)  # the test's asker answered us before: no validation ping
    return n


def _sent(node: Node) -> list[tuple[codec.Request, Addr]]:
    out = []
    for data, addr in node.datagrams_to_send(0.0):
        msg = codec.decode(data)
        assert isinstance(msg, codec.Request)
        out.append((msg, addr))
    return out


def _contact(i: int) -> Contact:
    return Contact(os.urandom(20), f"10.1.{i // 250}.{i % 250 + 1}", 5000 + i, DIALECT_DS)


def _request(node: Node, src: Addr, name: str, args: list[Any], now: float) -> Any:
    """Send ``node`` a request from ``src``; returns the decoded reply (None: none)."""
    raw = node.receive_datagram(codec.encode_request(os.urandom(20), name, args), src, now)
    if raw is None:
        return None
    msg = codec.decode(raw)
    assert isinstance(msg, codec.Response)
    return msg.result


def _find_node_ids(node: Node, target: bytes, now: float) -> set[bytes]:
    """IDs named by the node's ``ds_find_node`` reply to a client-mode asker."""
    reply = _request(node, ASKER, "ds_find_node", ["dhtsignal/1", os.urandom(20), 1, target], now)
    return {item[0] for item in reply}


def _stock_find_node_ids(node: Node, target: bytes, now: float) -> set[bytes]:
    reply = _request(node, ASKER, "find_node", [os.urandom(20), target], now)
    return {item[0] for item in reply}


def _fire(node: Node, until: float) -> list[tuple[codec.Request, Addr]]:
    """Run the node's timers up to ``until``; every request it sent."""
    sent: list[tuple[codec.Request, Addr]] = []
    for _ in range(10_000):
        at = node.get_timer()
        if at is None or at > until:
            break
        node.handle_timer(at)
        sent += _sent(node)
    return sent


def _answer(node: Node, req: codec.Request, addr: Addr, result: Any, now: float) -> None:
    assert node.receive_datagram(codec.encode_response(req.msg_id, result), addr, now) is None


def test_find_replies_name_only_contacts_heard_from_within_the_bound() -> None:
    """A contact silent for longer than ``good_for`` is questionable: neither our find reply
    nor the stock one names it; it is pinged; answering makes it good again."""
    node = _node()
    fresh, stale = _contact(1), _contact(2)
    node.table.add_contact(stale, 0.0)
    node.table.add_contact(fresh, 50.0)
    now = 70.0  # stale: heard 70 s ago; fresh: 20 s ago
    assert _find_node_ids(node, stale.id, now) == {fresh.id}
    assert _stock_find_node_ids(node, stale.id, now) == {fresh.id}
    # Passed over, it waits for a liveness ping, sent at once (the reply queued it).
    pings = [(r, a) for r, a in _fire(node, now) if r.name == "ds_ping"]
    assert [a for _, a in pings] == [stale.addr]
    _answer(node, pings[0][0], stale.addr, [stale.id, list(ME)], now + 0.01)
    assert _find_node_ids(node, stale.id, now + 0.02) == {fresh.id, stale.id}


def test_maintenance_pings_silent_contacts_and_evicts_the_dead_for_a_replacement() -> None:
    """Nobody asks for it, yet a contact that went silent is pinged by maintenance; after
    ``max_failures`` failed pings it is evicted and the freshest replacement takes its place.
    The pings are bounded per round."""
    cfg = NodeConfig(
        ksize=2,
        good_for=30.0,
        maintenance_interval=5.0,
        liveness_interval=1.0,
        liveness_pings=2,
        max_failures=2,
        rpc_timeout=0.4,
        rpc_retries=0,
    )
    node = _node(cfg)
    table = node.table
    # Fill a far bucket (the half of the ID space without our ID), then one waits.
    far = 1 - (node.id[0] >> 7)
    # dead and alive share exactly 5 leading bits: a bucket of depth 5 does not split.
    ids = [bytes([far << 7 | b]) + os.urandom(19) for b in (0b000, 0b100, 0b1000)]
    dead, alive, spare = (Contact(i, f"10.2.0.{n}", 6000 + n) for n, i in enumerate(ids))
    table.add_contact(dead, 0.0)
    table.add_contact(alive, 0.0)
    # A bucket holding our own ID splits; this one is full, so ``spare`` waits.
    assert table.add_contact(spare, 0.0) is dead
    pinged: list[Addr] = []
    for _ in range(200):
        at = node.get_timer()
        assert at is not None
        if at > 100.0:
            break
        node.handle_timer(at)
        for req, addr in _sent(node):
            if req.name != "ds_ping":
                continue
            pinged.append(addr)
            for c in (alive, spare):
                if addr == c.addr:
                    _answer(node, req, addr, [c.id, list(ME)], at + 0.01)
    assert table.get(dead.id) is None, "the silent contact stayed"
    assert table.get(spare.id) is spare and table.get(alive.id) is alive
    assert pinged.count(dead.addr) == cfg.max_failures
    # Pinged again only once questionable again (every good_for), not every round.
    assert 1 <= pinged.count(alive.addr) <= 100.0 / cfg.good_for + 1


def test_leave_notice_is_confirmed_by_one_ping_before_eviction() -> None:
    node = _node()
    leaver, other = _contact(1), _contact(2)
    node.table.add_contact(leaver, 10.0)
    node.table.add_contact(other, 10.0)
    args = ["dhtsignal/1", leaver.id, 0]
    assert _request(node, leaver.addr, "ds_leave", args, 11.0) is None  # no reply
    # Not handed out any more, at once.
    assert _find_node_ids(node, leaver.id, 11.0) == {other.id}
    sent = _sent(node)
    assert [(r.name, a) for r, a in sent] == [("ds_ping", leaver.addr)]
    assert node.table.get(leaver.id) is leaver  # not evicted on the notice alone
    # One retry (leave_confirm_retries): fails 0.4 + 0.8 s later.
    _fire(node, 11.0 + 3 * CFG.rpc_timeout + 0.01)
    assert node.table.get(leaver.id) is None
    assert node.stats["left"] == 1


def test_forged_leave_notice_evicts_nobody() -> None:
    """From another address the notice is ignored; from the contact's own (spoofed)
    address it only costs a ping, which the live contact answers."""
    node = _node()
    victim = _contact(1)
    node.table.add_contact(victim, 10.0)
    args = ["dhtsignal/1", victim.id, 0]
    _request(node, ("10.66.0.1", 666), "ds_leave", args, 11.0)
    assert _sent(node) == []
    assert _find_node_ids(node, victim.id, 11.0) == {victim.id}
    _request(node, victim.addr, "ds_leave", args, 12.0)
    ((ping, addr),) = _sent(node)
    assert addr == victim.addr
    _answer(node, ping, victim.addr, [victim.id, list(ME)], 12.05)
    _fire(node, 20.0)
    assert node.table.get(victim.id) is victim
    assert _find_node_ids(node, victim.id, 20.0) == {victim.id}


def test_leave_tells_a_bounded_number_of_our_contacts_only() -> None:
    node = _node(NodeConfig(leave_notices=10))
    for i in range(40):
        node.table.add_contact(_contact(i), float(i))
    stock = Contact(os.urandom(20), "10.3.0.1", 7001, DIALECT_STOCK)
    node.table.add_contact(stock, 100.0)
    assert node.leave(101.0) <= 10
    sent = _sent(node)
    assert 0 < len(sent) <= 10
    assert all(r.name == "ds_leave" for r, _ in sent)
    assert stock.addr not in {a for _, a in sent}  # stock nodes do not speak ds_leave
    client = _node(NodeConfig(client_mode=True))
    client.table.add_contact(_contact(1), 0.0)
    assert client.leave(1.0) == 0


def test_a_contact_that_failed_one_lookup_is_not_asked_by_the_next() -> None:
    node = _node(NodeConfig(rpc_timeout=0.4, rpc_retries=1, peer_timeout=0.3))
    contacts = [_contact(i) for i in range(4)]
    for c in contacts:
        node.table.add_contact(c, 0.0)
    silent = contacts[0]
    node.start_lookup(silent.id, 1.0, remember=False)  # the silent one is asked first
    first = _sent(node)
    assert silent.addr in {a for _, a in first}
    # Everyone but the silent one answers (with no one new).
    for req, addr in first:
        if addr != silent.addr:
            _answer(node, req, addr, [], 1.01)
    _fire(node, 1.5)  # the silent one's first try is unanswered: retried at 1.4
    assert node.avoided(silent.id, 1.5)
    node.start_lookup(os.urandom(20), 1.5, remember=False)
    second = [(r, a) for r, a in _sent(node) if r.name == "ds_find_node"]
    assert second and silent.addr not in {a for _, a in second}
    # Nor when another node names it.
    node.start_lookup(os.urandom(20), 1.6, remember=False)
    req, addr = next((r, a) for r, a in _sent(node) if r.name == "ds_find_node")
    _answer(node, req, addr, [silent.wire()], 1.61)
    assert silent.addr not in {a for _, a in _sent(node)}


def test_a_contact_past_a_lookups_soft_timeout_is_avoided_until_it_answers() -> None:
    """Not only once its RPC's first try times out (0.4 s): right after a SIGKILL, every
    lookup of those 0.4 s asked the same dead nodes and waited out its own soft timeout
    on each (issue 9's presence proof at full scale: 92 queries to killed nodes in one
    round of 10 lookups)."""
    node = _node(NodeConfig(rpc_timeout=0.4, rpc_retries=1, peer_timeout=0.1))
    contacts = [_contact(i) for i in range(4)]
    for c in contacts:
        node.table.add_contact(c, 0.0)
    slow = contacts[0]
    node.start_lookup(slow.id, 1.0, remember=False, want_value=True)  # strict: a get
    first = _sent(node)
    slow_req = next(r for r, a in first if a == slow.addr)
    _fire(node, 1.15)  # past the soft timeout (0.1 s), before the first try's 0.4 s
    assert node.avoided(slow.id, 1.15)
    node.start_lookup(os.urandom(20), 1.15, remember=False)
    second = [a for r, a in _sent(node) if r.name == "ds_find_node"]
    assert second and slow.addr not in second
    # A late answer ends the avoidance at once.
    _answer(node, slow_req, slow.addr, [[], 0, []], 1.2)
    assert not node.avoided(slow.id, 1.2)


def _ids(n: int, target: int) -> list[Contact]:
    """``n`` contacts ordered by distance to ``target`` (nearest first)."""
    out = [Contact(os.urandom(20), "10.4.0.1", 6000 + i) for i in range(n)]
    return sorted(out, key=lambda c: c.long_id ^ target)


def test_strict_lookup_waits_for_a_slow_one_among_the_k_closest() -> None:
    """Past the soft timeout a slow contact frees its slot in both modes; a plain lookup
    ends without it, a strict one waits for it up to ``strict_wait``."""
    target = os.urandom(20)
    t = int.from_bytes(target, "big")
    contacts = _ids(3, t)
    for strict in (0.0, 1.0):
        lk = Lookup(target, contacts, k=3, alpha=3, peer_timeout=0.3, strict_wait=strict)
        step = lk.next(0.0)
        assert isinstance(step, Query) and len(step.contacts) == 3
        lk.on_success(contacts[1], [])
        lk.on_success(contacts[2], [])
        later = lk.next(0.5)  # contacts[0] is past the soft timeout
        if not strict:
            assert isinstance(later, Finished) and len(later.closest) == 2
            continue
        assert isinstance(later, Wait) and later.until == 1.0
        lk.on_success(contacts[0], [])
        done = lk.next(0.6)
        assert isinstance(done, Finished) and done.closest == contacts
    # And past strict_wait it ends without it.
    lk = Lookup(target, contacts, k=3, alpha=3, peer_timeout=0.3, strict_wait=1.0)
    lk.next(0.0)
    lk.on_success(contacts[1], [])
    lk.on_success(contacts[2], [])
    assert isinstance(lk.next(1.0), Finished)


def test_never_more_than_alpha_stalled_contacts_hold_a_lookup_up() -> None:
    """Every query past the soft timeout frees its slot: a lookup whose first alpha
    contacts are all dead sends the next alpha at the soft timeout, strict or not."""
    target = os.urandom(20)
    contacts = _ids(12, int.from_bytes(target, "big"))
    for strict in (0.0, 1.0):
        lk = Lookup(target, contacts, k=8, alpha=3, peer_timeout=0.3, strict_wait=strict)
        first = lk.next(0.0)
        assert isinstance(first, Query) and first.contacts == contacts[:3]
        assert isinstance(lk.next(0.1), Wait)
        second = lk.next(0.3)
        assert isinstance(second, Query) and second.contacts == contacts[3:6]


def test_restored_contacts_are_questionable_until_they_answer() -> None:
    node = _node()
    c = _contact(1)
    node.table.add_contact(c, 0.0)
    state = node.snapshot()
    again = _node()
    again.restore(state, 0.0)
    assert _find_node_ids(again, c.id, 0.0) == set()
    pings = [(r, a) for r, a in _fire(again, 0.0) if r.name == "ds_ping"]
    assert [a for _, a in pings] == [c.addr]
    _answer(again, pings[0][0], c.addr, [c.id, list(ME)], 0.1)
    assert _find_node_ids(again, c.id, 0.2) == {c.id}


def test_closest_good_skips_failed_and_stale() -> None:
    table = RoutingTable(os.urandom(20), ksize=4, good_for=10.0)
    cs = [_contact(i) for i in range(4)]
    for c in cs:
        table.add_contact(c, 5.0)
    table.failed(cs[0].id)
    cs[1].last_seen = -100.0
    good = table.closest_good(cs[0].id, 4, 6.0)
    assert {c.id for c in good} == {cs[2].id, cs[3].id}
    assert set(table.suspects) == {cs[0].id, cs[1].id}


def test_a_get_ends_once_half_the_replicas_answered_with_records() -> None:
    """Half of ``replicas`` storing nodes answered with the record: the get ends then,
    without waiting on the silent rest of the closest (under churn one is often dead,
    and each dead one cost a soft timeout); with ``get_ends_at_quorum`` off it waits."""
    for ends in (True, False):
        cfg = NodeConfig(rpc_timeout=0.4, rpc_retries=1, peer_timeout=0.3, replicas=4)
        node = _node(dataclasses.replace(cfg, get_ends_at_quorum=ends))
        rec = records.sign(
            Identity.generate(),
            RecordType.DATA,
            records.data_key("q"),
            b"v",
            seq=1,
            expires=WALL + 60,
        )
        contacts = [_contact(i) for i in range(6)]
        for c in contacts:
            node.table.add_contact(c, 0.0)
        op = node.start_get(rec.key, 1.0)
        answered = 0
        for _ in range(4):  # the first alpha queries, then the next ones as they answer
            for req, addr in _sent(node):
                if req.name == "ds_find_value" and answered < 2:
                    answered += 1
                    _answer(node, req, addr, [[], [rec.raw], None], 1.01)
        assert answered == 2
        events = [e for e in iter(node.next_event, None) if getattr(e, "op_id", None) == op]
        if ends:
            assert len(events) == 1 and isinstance(events[0], RecordsFound)
            assert [r.payload for r in events[0].held.records] == [b"v"]
        else:
            assert not events  # still waiting on the silent ones
