"""A join that finds nobody is tried again: after ``rejoin_delay``, doubling up to
``rejoin_max``, at a jittered moment; it stops once the table holds a contact.

When a thousand nodes join at once, the bootstrap node's socket drops what it cannot
queue (Linux's default receive buffer is 208 KiB) and a quarter of the joiners found
nobody; they stayed alone, and every value put through them was lost (the real-process
mass join, ``bench/churn.py --mode massjoin``, found 53-74% of its values).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.events import Bootstrapped, OperationFailed
from dhtsignal.dht.node import Node
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import RecordType
from dhtsignal.errors import PutFailed
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

WALL = 1.7e9
A: Addr = ("10.0.0.1", 4000)
BOOT: Addr = ("10.0.0.2", 4000)
A_ID = bytes(20)
CFG = NodeConfig(rpc_timeout=0.4, rpc_retries=1, rejoin_delay=1.0, rejoin_max=8.0)


def _node(addr: Addr, cfg: NodeConfig = CFG) -> Node:
    n = Node(os.urandom(20), cfg, wallclock=lambda: WALL)
    n.start(addr, 0.0)
    return n


def _pings_to(node: Node, addr: Addr) -> int:
    """Take the node's datagrams; how many were pings to ``addr``."""
    count = 0
    for data, to in node.datagrams_to_send(0.0):
        msg = codec.decode(data)
        if isinstance(msg, codec.Request) and msg.name == "ds_ping" and to == addr:
            count += 1
    return count


def _run_until(node: Node, until: float, on_ping: list[float]) -> None:
    """Run the node's timers up to ``until``, dropping everything it sends; note the
    moment of each first ping to BOOT (a new bootstrap, not a retry)."""
    for _ in range(10_000):
        at = node.get_timer()
        if at is None or at > until:
            return
        before = node.stats["rpc-retry"]
        node.handle_timer(at)
        pings = _pings_to(node, BOOT)
        if pings and node.stats["rpc-retry"] == before:
            on_ping.append(at)
    raise AssertionError("timers did not settle")


def test_a_join_that_found_nobody_is_tried_again_with_growing_jittered_waits() -> None:
    node = _node(A)
    op = node.start_bootstrap([BOOT], 0.0)
    assert _pings_to(node, BOOT) == 1
    starts: list[float] = []
    _run_until(node, 60.0, starts)
    ended = [e for e in iter(node.next_event, None) if isinstance(e, Bootstrapped)]
    assert ended and ended[0].op_id == op and ended[0].contacts == 0
    # Each try fails after 0.4 + 0.8 s; the next starts in the second half of its wait.
    assert len(starts) >= 5, starts
    fail = 1.2
    for i, at in enumerate(starts[:5]):
        wait = min(8.0, 1.0 * 2**i)
        assert fail + wait / 2 - 1e-9 <= at <= fail + wait + 1e-9, (i, at, starts)
        fail = at + 1.2
    # Capped: no two tries further apart than rejoin_max plus one failed try.
    assert all(b - a <= 8.0 + 1.2 + 1e-9 for a, b in itertools.pairwise(starts))
    assert node.stats["rejoin"] == len(starts)


def test_the_tries_stop_once_a_node_answers() -> None:
    node = _node(A)
    boot = _node(BOOT)
    node.start_bootstrap([BOOT], 0.0)
    node.datagrams_to_send(0.0)  # the first try is lost
    starts: list[float] = []
    _run_until(node, 3.0, starts)
    assert starts, "no second try within 3 s"
    # The boot node is up now: run both nodes' timers and relay datagrams both ways.
    joined_at = _relay({A: node, BOOT: boot}, 3.0, 30.0, lambda: len(node.table) > 0)
    assert joined_at is not None and len(node.table) == 1
    tries = node.stats["rejoin"]
    assert tries >= 1
    # Two minutes more with the boot node answering: no try again.
    _relay({A: node, BOOT: boot}, joined_at, joined_at + 120.0, lambda: False)
    assert node.stats["rejoin"] == tries
    assert len(node.table) == 1


def _relay(nodes: dict[Addr, Node], now: float, until: float, done: Any) -> float | None:
    """Run the nodes' timers every 50 ms from ``now`` and deliver their datagrams to
    each other; the moment ``done()`` first holds (None: not by ``until``)."""
    while now <= until:
        for src, n in nodes.items():
            at = n.get_timer()
            if at is not None and at <= now:
                n.handle_timer(now)
            for data, to in n.datagrams_to_send(now):
                dst = nodes.get(to)
                reply = dst.receive_datagram(data, src, now) if dst is not None else None
                if reply is not None:
                    n.receive_datagram(reply, to, now)
        if done():
            return now
        now += 0.05
    return None


def test_no_tries_again_when_switched_off() -> None:
    node = _node(A, NodeConfig(rpc_timeout=0.4, rpc_retries=1, rejoin_delay=0.0))
    node.start_bootstrap([BOOT], 0.0)
    node.datagrams_to_send(0.0)
    starts: list[float] = []
    _run_until(node, 120.0, starts)
    assert starts == []
    assert node.stats["rejoin"] == 0


async def _until(cond: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        if loop.time() > end:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _alone_then_boot(cfg: NodeConfig) -> AsyncIterator[tuple[DhtNode, DhtNode]]:
    """A node whose join found nobody (its bootstrap address held by a socket that never
    answers), then a DHT node bound to that address: (the lone node, the new one)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    lone = DhtNode(os.urandom(20), cfg)
    boot: DhtNode | None = None
    try:
        await lone.listen_udp("127.0.0.1", 0)
        assert await lone.bootstrap([("127.0.0.1", port)]) == 0
        silent.close()
        boot = DhtNode(os.urandom(20), cfg)
        await boot.listen_udp("127.0.0.1", port)
        yield lone, boot
    finally:
        silent.close()
        await lone.close()
        if boot is not None:
            await boot.close()


def _record(name: str) -> records.Record:
    return records.sign(
        Identity.generate(),
        RecordType.DATA,
        records.data_key(name),
        b"v",
        seq=1,
        expires=time.time() + 600,
    )


@pytest.mark.asyncio
async def test_a_node_alone_joins_once_its_bootstrap_node_comes_up() -> None:
    """Real sockets: the lone node joins by itself within a few seconds once a node
    answers at its bootstrap address: a value it puts is found from the other side."""
    cfg = NodeConfig(rpc_timeout=0.2, rpc_retries=1, rejoin_delay=0.5, rejoin_max=2.0)
    async with _alone_then_boot(cfg) as (lone, boot):
        await _until(lambda: len(lone.core.table) > 0 and len(boot.core.table) > 0, 10.0)
        assert lone.stats["rejoin"] >= 1
        await lone.put([_record("after-rejoin")])
        got = await boot.get(records.data_key("after-rejoin"))
        assert [r.payload for r in got] == [b"v"]


@pytest.mark.asyncio
async def test_a_put_on_a_lone_node_joins_first() -> None:
    """Real sockets: the lone node, asked to put as soon as its bootstrap node is up
    (before its own re-join timer fires: 60 s here), joins first and stores the value
    there instead of only in its own store."""
    cfg = NodeConfig(rpc_timeout=0.2, rpc_retries=1, rejoin_delay=60.0, rejoin_max=60.0)
    async with _alone_then_boot(cfg) as (lone, boot), asyncio.timeout(10):
        res = await lone.put([_record("joined-first")])
        assert lone.stats["rejoin:lookup"] == 1
        assert res.stored >= 2  # its own store and the boot node's
        assert boot.core.store.get(records.data_key("joined-first"), time.time())


def test_lookups_on_an_empty_table_wait_for_the_same_joins() -> None:
    """Sans-I/O: three lookups on a node whose table is empty start one join (one ping
    to the bootstrap address), tried again for ``join_first_wait`` seconds; all three go
    on once that ends."""
    cfg = NodeConfig(rpc_timeout=0.4, rpc_retries=0, rejoin_delay=60.0, join_first_wait=3.0)
    node = _node(A, cfg)
    node.start_bootstrap([BOOT], 0.0)
    node.datagrams_to_send(0.0)
    _run_until(node, 5.0, [])  # the join fails: alone
    assert len(node.table) == 0
    node.next_event()
    for i in range(3):
        node.start_lookup(bytes([i]) * 20, 5.0)
    assert _pings_to(node, BOOT) == 1
    tries: list[float] = []
    _run_until(node, 9.0, tries)
    assert node.stats["rejoin:lookup"] == 1
    # A try every 0.4 s (its ping timing out) plus a 0.25-0.5 s pause, for 3 s.
    assert 3 <= len(tries) <= 5, tries
    assert all(5.0 + 0.65 - 1e-9 <= t <= 8.0 + 0.9 for t in tries), tries
    done = [e for e in iter(node.next_event, None) if type(e).__name__ == "LookupFinished"]
    assert len(done) == 3


def test_a_put_from_a_node_that_cannot_join_fails_naming_its_bootstrap_nodes() -> None:
    """Sans-I/O: it used to store the record in its own store only and report it
    stored."""
    cfg = NodeConfig(rpc_timeout=0.4, rpc_retries=0, rejoin_delay=60.0, join_first_wait=1.0)
    node = _node(A, cfg)
    node.start_bootstrap([BOOT], 0.0)
    _run_until(node, 1.0, [])
    node.next_event()
    rec = records.sign(
        Identity.generate(), RecordType.DATA, records.data_key("x"), b"v", seq=1, expires=WALL + 60
    )
    op = node.start_put([rec], 1.0)
    _run_until(node, 10.0, [])
    failed = [e for e in iter(node.next_event, None) if isinstance(e, OperationFailed)]
    assert [e.op_id for e in failed] == [op]
    assert isinstance(failed[0].error, PutFailed)
    assert "not joined (no bootstrap node answered: 10.0.0.2:4000)" in str(failed[0].error)


def test_a_ping_of_another_network_is_answered_with_ours_and_nothing_else() -> None:
    """The answer names our network, is never larger than the ping (a spoofed one
    amplifies nothing), and the sender becomes no contact and gets no validation ping."""
    node = _node(A)
    stranger: Addr = ("10.9.0.1", 5000)
    for net in ("x", "lab-2", "n" * 64):
        req = codec.encode_request(os.urandom(20), "ds_ping", [net, os.urandom(20), 0])
        raw = node.receive_datagram(req, stranger, 1.0)
        assert raw is not None and len(raw) <= len(req)
        msg = codec.decode(raw)
        assert isinstance(msg, codec.Response)
        assert msg.result == ["wrong-network", CFG.network]
    assert node.stats["drop:wrong-network"] == 3
    assert len(node.table) == 0 and node.datagrams_to_send(1.0) == []
    # Other RPCs of another network stay unanswered.
    req = codec.encode_request(os.urandom(20), "ds_find_node", ["x", os.urandom(20), 0, A_ID])
    assert node.receive_datagram(req, stranger, 1.0) is None


def test_a_join_through_a_node_of_another_network_says_so() -> None:
    ours = _node(A, NodeConfig(network="lab-2", rpc_timeout=0.4, rpc_retries=0))
    boot = _node(BOOT)
    ours.start_bootstrap([BOOT], 0.0)
    _relay({A: ours, BOOT: boot}, 0.0, 1.0, lambda: False)
    ended = [e for e in iter(ours.next_event, None) if isinstance(e, Bootstrapped)]
    assert ended and ended[0].contacts == 0
    err = ours.all_other_network()
    assert err is not None
    assert str(err) == (
        f"10.0.0.2:4000 serves network {CFG.network!r}, not 'lab-2' (give both the same --network)"
    )
    assert ours.why_unanswered([BOOT]) == f"; {err}"
