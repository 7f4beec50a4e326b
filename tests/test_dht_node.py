"""The sans-I/O DHT node (:class:`dhtsignal.dht.node.Node`), driven with bytes and times only.

No sockets, no event loop, no sleeps: a manual clock, datagrams taken from the node and
answers written by the test (``Script``), or two nodes wired to each other (``pair``).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dhtsignal.dht import records
from dhtsignal.dht.node import (
    LookupFinished,
    Node,
    OperationFailed,
    RecordsReceived,
    RequestAnswered,
    RequestFailed,
    SubscriptionRenewed,
)
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import RecordType
from dhtsignal.dht.routing import DIALECT_DS, Contact
from dhtsignal.errors import StoreLimitExceeded
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

WALL = 1.7e9
ME: Addr = ("10.0.0.1", 4000)


def _node(config: NodeConfig | None = None, node_id: bytes | None = None) -> Node:
    n = Node(node_id or os.urandom(20), config, wallclock=lambda: WALL)
    n.start(ME, 0.0)
    return n


def _requests(node: Node) -> list[tuple[codec.Request, Addr]]:
    out = []
    for data, addr in node.datagrams_to_send(0.0):
        msg = codec.decode(data)
        assert isinstance(msg, codec.Request)
        out.append((msg, addr))
    return out


def _answer(node: Node, req: codec.Request, addr: Addr, result: Any, now: float) -> None:
    assert node.receive_datagram(codec.encode_response(req.msg_id, result), addr, now) is None


def _contact(i: int) -> Contact:
    return Contact(os.urandom(20), f"10.1.0.{i}", 5000 + i, DIALECT_DS)


def _run_timers(node: Node, until: float) -> list[tuple[float, str]]:
    """Fire the node's timers up to ``until``; (time, RPC name) of every datagram sent."""
    sent: list[tuple[float, str]] = []
    for _ in range(1000):
        at = node.get_timer()
        if at is None or at > until:
            break
        node.handle_timer(at)
        sent += [(round(at, 6), req.name) for req, _ in _requests(node)]
    return sent


def test_rpc_retries_on_time_then_fails() -> None:
    """First retry after ``rpc_timeout``, the n-th try waiting ``n * rpc_timeout``; after
    ``rpc_retries`` retries the request fails, typed, naming its target."""
    node = _node(NodeConfig(rpc_timeout=0.4, rpc_retries=2, maintenance_interval=1e6))
    silent: Addr = ("10.9.9.9", 9)
    rid = node.send_request(silent, "ds_ping", node.ds_args(), 0.0)
    assert [r.name for r, _ in _requests(node)] == ["ds_ping"]
    assert _run_timers(node, 10.0) == [(0.4, "ds_ping"), (1.2, "ds_ping")]
    (ev,) = node.events
    assert isinstance(ev, RequestFailed) and ev.request_id == rid
    assert ev.error.addr == silent
    assert node.stats["rpc-retry"] == 2 and node.stats["rpc-timeout"] == 1
    assert node.outstanding() == 0


def test_first_tries_share_a_timer_and_answers_cost_none() -> None:
    node = _node(NodeConfig(rpc_timeout=0.4, rpc_retries=1, maintenance_interval=1e6))
    a: Addr = ("10.0.0.2", 1)
    b: Addr = ("10.0.0.3", 1)
    node.send_request(a, "ds_ping", node.ds_args(), 0.0)
    node.send_request(b, "ds_ping", node.ds_args(), 0.1)
    _, (req_b, _) = _requests(node)
    _answer(node, req_b, b, 1, 0.15)
    assert isinstance(node.events[-1], RequestAnswered)
    # Only the unanswered one is retried, at 0.4; it fails at 0.4 + 0.8.
    assert _run_timers(node, 5.0) == [(0.4, "ds_ping")]
    assert isinstance(node.events[-1], RequestFailed)


def test_answer_from_another_address_is_refused() -> None:
    node = _node()
    node.send_request(("10.0.0.2", 1), "ds_ping", node.ds_args(), 0.0)
    ((req, _),) = _requests(node)
    _answer(node, req, ("10.0.0.66", 1), 1, 0.1)
    assert node.stats["drop:response-from-wrong-address"] == 1
    assert node.outstanding() == 1


def test_rate_limit_per_source() -> None:
    """A source gets ``rate_burst`` requests at once, then ``rate_per_source`` a second;
    another source is not affected."""
    node = _node(NodeConfig(rate_per_source=10.0, rate_burst=5.0))
    flood: Addr = ("10.5.0.1", 1)

    def ping(src: Addr, now: float) -> bytes | None:
        req = codec.encode_request(os.urandom(20), "ds_ping", node.ds_args())
        return node.receive_datagram(req, src, now)

    assert sum(ping(flood, 1.0) is not None for _ in range(20)) == 5
    assert node.stats["drop:rate-limited"] == 15
    assert ping(("10.5.0.2", 1), 1.0) is not None
    assert sum(ping(flood, 1.5) is not None for _ in range(20)) == 5  # 0.5 s: 5 tokens


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=200))
def test_rate_limiter_never_admits_more_than_burst_plus_rate(gaps: list[float]) -> None:
    node = _node(NodeConfig(rate_per_source=20.0, rate_burst=4.0))
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        admitted += node.rate.admit(("10.7.0.1", 7), now)
    assert admitted <= 4 + 20.0 * now + 1e-9


def test_lookup_against_scripted_replies() -> None:
    """A lookup asks alpha of its contacts; a malformed answer counts as a failure
    (``drop:bad-reply``) and the contact is not kept; contacts named in good answers
    are asked next; the result is the answering contacts, nearest first."""
    cfg = NodeConfig(alpha=3, ksize=4, maintenance_interval=1e6)
    node = _node(cfg)
    first = [_contact(i) for i in range(3)]
    for c in first:
        node.table.add_contact(c, 0.0)
    named = _contact(10)
    target = os.urandom(20)
    op = node.start_lookup(target, 0.0, k=4, remember=False)
    asked = _requests(node)
    assert sorted(a for _, a in asked) == sorted(c.addr for c in first)
    by_addr = {c.addr: c for c in first}
    bad = None
    for i, (req, addr) in enumerate(asked):
        assert req.name == "ds_find_node" and req.args[3] == target
        if i == 0:
            bad = by_addr[addr]
            _answer(node, req, addr, "not a list of contacts", 0.01)
        else:
            _answer(node, req, addr, [named.wire()] if i == 1 else [], 0.01)
    assert node.stats["drop:bad-reply"] == 1
    ((req, addr),) = _requests(node)
    assert addr == named.addr
    _answer(node, req, addr, [], 0.02)
    (ev,) = [e for e in node.events if isinstance(e, LookupFinished)]
    assert ev.op_id == op
    answered = {c.id for c in first if c is not bad} | {named.id}
    assert {c.id for c in ev.result.closest} == answered
    k = int.from_bytes(target, "big")
    dists = [c.long_id ^ k for c in ev.result.closest]
    assert dists == sorted(dists)


def test_put_refused_for_a_limit_names_it() -> None:
    """Every storing node refuses for its per-source quota: the put fails with
    :class:`StoreLimitExceeded` naming ``quota``."""
    node = _node(NodeConfig(client_mode=True, replicas=2, maintenance_interval=1e6))
    for i in range(2):
        node.table.add_contact(_contact(i), 0.0)
    who = Identity.generate()
    rec = records.sign(who, RecordType.DATA, records.data_key("x"), b"v", seq=1, expires=WALL + 60)
    op = node.start_put([rec], 0.0)
    for req, addr in _requests(node):
        assert req.name == "ds_store_find"
        _answer(node, req, addr, [["quota"], []], 0.01)
    (ev,) = [e for e in node.events if isinstance(e, OperationFailed)]
    assert ev.op_id == op
    assert isinstance(ev.error, StoreLimitExceeded) and ev.error.limit == "quota"


def test_listen_falls_back_to_polling_then_resubscribes() -> None:
    """No storing node accepts the subscription: the node polls (a get) at once and
    subscribes again ``poll_interval`` later; polled records come out as events."""
    cfg = NodeConfig(replicas=1, poll_interval=5.0, listen_ttl=60.0, maintenance_interval=1e6)
    node = _node(cfg)
    holder = _contact(1)
    node.table.add_contact(holder, 0.0)
    key = records.data_key("listened")
    rec = records.sign(Identity.generate(), RecordType.DATA, key, b"v", seq=1, expires=WALL + 60)
    node.listen(key, 0.0)
    ((req, addr),) = _requests(node)
    assert req.name == "ds_find_node"
    _answer(node, req, addr, [], 0.01)
    ((req, addr),) = _requests(node)
    assert req.name == "ds_listen" and req.args[4] == cfg.listen_ttl
    _answer(node, req, addr, "listen-full", 0.02)
    assert SubscriptionRenewed(key, 0) in node.events
    assert node.stats["listen-fallback-poll"] == 1
    ((req, addr),) = _requests(node)
    assert req.name == "ds_find_value"
    _answer(node, req, addr, [[], [rec.raw], None], 0.03)
    (got,) = [e for e in node.events if isinstance(e, RecordsReceived)]
    assert [r.raw for r in got.records] == [rec.raw] and not got.pushed
    # Next subscription attempt: poll_interval after the poll ended.
    assert _run_timers(node, 5.0) == []
    assert _run_timers(node, 5.03) == [(5.03, "ds_find_node")]
    # The last listener leaving stops the cycle.
    node.unlisten(key, 5.04)
    assert node.listening(key) == 0


def test_listen_refreshes_at_half_ttl_when_accepted() -> None:
    cfg = NodeConfig(replicas=1, listen_ttl=60.0, maintenance_interval=1e6)
    node = _node(cfg)
    node.table.add_contact(_contact(1), 0.0)
    key = records.data_key("refreshed")
    node.listen(key, 0.0)
    ((req, addr),) = _requests(node)
    _answer(node, req, addr, [], 0.01)
    ((req, addr),) = _requests(node)
    _answer(node, req, addr, 60.0, 0.02)
    assert SubscriptionRenewed(key, 1) in node.events
    assert _run_timers(node, 30.0) == []
    assert _run_timers(node, 30.02) == [(30.02, "ds_find_node")]


def test_two_nodes_answer_each_other() -> None:
    """Pair helper: a ping across two cores, datagrams carried by the test."""
    a, b = _node(), _node()
    b_addr: Addr = ("10.0.0.2", 4000)
    b.address = b_addr
    op = a.start_ping(b_addr, 0.0)
    ((data, to),) = a.datagrams_to_send(0.0)
    assert to == b_addr
    reply = b.receive_datagram(data, ME, 0.01)
    assert reply is not None
    a.receive_datagram(reply, b_addr, 0.02)
    (ev,) = a.events
    assert getattr(ev, "op_id", None) == op and getattr(ev, "node_id", None) == b.id
    assert a.table.get(b.id) is not None
    # b does not take a's word for its ID and address: it pings a, and learns it from
    # the answer (issue 10 item 5).
    assert b.table.get(a.id) is None
    ((ping, to),) = b.datagrams_to_send(0.01)
    assert to == ME
    pong = a.receive_datagram(ping, b_addr, 0.03)
    assert pong is not None
    b.receive_datagram(pong, ME, 0.04)
    assert b.table.get(a.id) is not None and b.addrs.is_validated(ME)


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=3))
def test_snapshot_restore_round_trip(contacts: int, recs: int) -> None:
    node = _node()
    for i in range(contacts):
        node.table.add_contact(_contact(i), 0.0)
    who = Identity.generate()
    for i in range(recs):
        rec = records.sign(
            who, RecordType.DATA, records.data_key(f"k{i}"), b"v", seq=1, expires=WALL + 60
        )
        node.store.put(rec, ("10.3.0.1", 1), WALL)
    state = codec.unpack_file(codec.pack(node.snapshot()))
    fresh = _node(node_id=node.id)
    assert fresh.restore(state, 0.0) == recs
    assert {c.wire()[0] for c in fresh.table.contacts()} == {
        c.wire()[0] for c in node.table.contacts()
    }
    assert fresh.snapshot() == node.snapshot()
