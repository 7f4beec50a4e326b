"""Unmodified ``kademlia.network.Server`` nodes and dhtsignal nodes in one network.

Everything listens on 127.0.0.1 with OS-chosen ports. Stock nodes wait 5 s for
an RPC that gets no answer, so every node stays up until the test ends: stock
nodes only ever talk to live nodes and the tests stay fast.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.routing import DIALECT_STOCK, Contact
from dhtsignal.errors import WrongNetwork
from dhtsignal.wire.addr import Addr

#: Quick to give up on a silent node (only the other-network test meets one).
FAST = NodeConfig(rpc_timeout=0.1, rpc_retries=1)
#: Everyone answers in the mixed network: a soft timeout far above loopback latency
#: keeps a loaded machine from leaving a slow-but-live node out of a lookup's result.
LIVE = NodeConfig(rpc_timeout=0.5, rpc_retries=1, peer_timeout=2.0)
WAIT = 20.0  # bound on any one step; a stock RPC that is never answered takes 5 s


@dataclass
class Mixed:
    """The nodes of one test; all closed by the fixture."""

    ds_nodes: list[DhtNode] = field(default_factory=list)
    stock_nodes: list[Server] = field(default_factory=list)

    async def ds(self, config: NodeConfig = LIVE) -> DhtNode:
        n = DhtNode(os.urandom(20), config)
        self.ds_nodes.append(n)
        await n.listen_udp()
        return n

    async def stock(self) -> tuple[Server, Addr]:
        s = Server(node_id=os.urandom(20))
        self.stock_nodes.append(s)
        await s.listen(0, interface="127.0.0.1")
        host, port = s.transport.get_extra_info("sockname")[:2]
        return s, (host, port)


@pytest.fixture
async def mixed() -> AsyncIterator[Mixed]:
    m = Mixed()
    try:
        yield m
    finally:
        for s in m.stock_nodes:
            s.stop()
        for n in m.ds_nodes:
            await n.close()


def at(node: DhtNode) -> Addr:
    """The bound address of ``node``."""
    assert node.address is not None
    return node.address


def knows(server: Server, node_id: bytes) -> bool:
    """Whether a stock node has ``node_id`` in its routing table."""
    return not server.protocol.router.is_new_node(Node(node_id))


async def join_via_stock(n: DhtNode, addr: Addr, *, lookup: bool = True) -> None:
    """Join through a stock node: stock ``ping``, then (optionally) look up our own ID.

    (``DhtNode.bootstrap`` only speaks ``ds_ping``, which stock nodes ignore; see
    :func:`test_bootstrap_through_a_stock_node`.)
    """
    sid = await asyncio.wait_for(n.request(addr, "ping", [n.id]), WAIT)
    assert type(sid) is bytes and len(sid) == 20
    n.table.add_contact(
        Contact(sid, addr[0], addr[1], DIALECT_STOCK), asyncio.get_running_loop().time()
    )
    if lookup:
        await asyncio.wait_for(n.find_nodes(n.id), WAIT)


async def test_lookups_route_through_both_kinds_of_node(mixed: Mixed) -> None:
    a = await mixed.ds()
    stocks = [await mixed.stock() for _ in range(4)]
    for s, _ in stocks:
        # A stock crawl: learns the other stock nodes from A's find_node replies.
        await asyncio.wait_for(s.bootstrap([at(a)]), WAIT)
    s1, s2, s3, s4 = (s for s, _ in stocks)
    assert knows(s4, s1.node.id) and knows(s4, a.id)  # s1 was known to s4 only through A
    assert a.stats["rpc:find_node"] >= 4
    assert all(a.table.get(s.node.id) is not None for s in (s1, s2, s3, s4))

    # FAR joins by talking to S3 alone: nobody but S3 knows it.
    far = await mixed.ds()
    await join_via_stock(far, stocks[2][1], lookup=False)
    assert knows(s3, far.id)
    assert a.table.get(far.id) is None
    assert not any(knows(s, far.id) for s in (s1, s2, s4))

    # SEEKER knows only A. Its lookup next to FAR must go A (ours) -> stock nodes -> FAR.
    # (Next to, not at: a stock node never names the node whose ID is the target.)
    seeker = await mixed.ds()
    assert await asyncio.wait_for(seeker.ping(at(a)), WAIT) == a.id
    assert [c.id for c in seeker.table.contacts()] == [a.id]
    near_far = far.id[:-1] + bytes([far.id[-1] ^ 1])
    res = await asyncio.wait_for(seeker.find_nodes(near_far), WAIT)
    assert res.closest[0].id == far.id
    assert res.hops == 3  # A at hop 1, the stock nodes at hop 2, FAR at hop 3
    assert a.stats["rpc:ds_find_node"] >= 1  # our RPC between our nodes
    assert far.stats["rpc:find_node"] >= 1  # learned from a stock node: asked the stock way
    ids = {c.id for c in res.closest}
    assert {a.id, s1.node.id, s2.node.id, s3.node.id, s4.node.id, far.id} <= ids
    for n in (a, far, seeker):
        assert n.stats["drop:internal"] == 0
        assert n.stats["drop:bad-reply"] == 0


def _key_closest_to_ours(ds_ids: list[bytes], all_ids: list[bytes]) -> str:
    """A key string whose digest is closer to one of our nodes than to any other node."""
    for i in range(10_000):
        key = f"interop-key-{i}"
        t = int.from_bytes(digest(key), "big")
        best = min(all_ids, key=lambda x: int.from_bytes(x, "big") ^ t)
        if best in ds_ids:
            return key
    raise AssertionError("no key found")


async def test_stock_set_and_get_in_a_mixed_network(mixed: Mixed) -> None:
    a = await mixed.ds()
    stocks = [await mixed.stock() for _ in range(4)]
    for s, _ in stocks:
        await asyncio.wait_for(s.bootstrap([at(a)]), WAIT)
    # More of our nodes join through a stock node, and more through them.
    d2, d3 = await mixed.ds(), await mixed.ds()
    await join_via_stock(d2, stocks[1][1])
    await join_via_stock(d3, stocks[1][1])
    d4, d5 = await mixed.ds(), await mixed.ds()
    for d in (d4, d5):
        assert await asyncio.wait_for(d.bootstrap([d2.address]), WAIT) > 0  # type: ignore[list-item]
    ours = [a, d2, d3, d4, d5]
    servers = [s for s, _ in stocks]
    # The stock nodes that will set and get learn the whole network first.
    for s in (servers[0], servers[3]):
        await asyncio.wait_for(s.bootstrap([d5.address]), WAIT)  # type: ignore[list-item]

    key = _key_closest_to_ours(
        [n.id for n in ours], [n.id for n in ours] + [s.node.id for s in servers]
    )
    dkey = digest(key)
    assert await asyncio.wait_for(servers[0].set(key, "hello"), WAIT) is True
    holders = [n for n in ours if n.legacy.get(dkey, time.time()) == "hello"]
    assert holders, "no dhtsignal node holds the stock value"
    t = int.from_bytes(dkey, "big")
    closest_ours = min(ours, key=lambda n: n.table.own_long ^ t)
    assert closest_ours in holders
    assert await asyncio.wait_for(servers[3].get(key), WAIT) == "hello"

    # Now only our nodes hold it: the stock get must fetch it from one of them.
    for s in servers:
        s.storage.data.pop(dkey, None)
    served_before = sum(n.stats["rpc:find_value"] for n in ours)
    assert await asyncio.wait_for(servers[3].get(key), WAIT) == "hello"
    assert sum(n.stats["rpc:find_value"] for n in ours) > served_before
    for n in ours:
        assert n.stats["drop:internal"] == 0
        assert n.stats["refused:bad-legacy"] == 0


async def test_a_node_of_another_network_is_ignored(mixed: Mixed) -> None:
    a = await mixed.ds(FAST)
    s1, _ = await mixed.stock()
    await asyncio.wait_for(s1.bootstrap([at(a)]), WAIT)
    d2 = await mixed.ds()
    assert await asyncio.wait_for(d2.bootstrap([at(a)]), WAIT) >= 1

    other = await mixed.ds(NodeConfig(network="other", rpc_timeout=0.05, rpc_retries=1))
    before = a.stats["drop:wrong-network"]
    # A ping is answered with the network the node serves, and nothing more.
    with pytest.raises(WrongNetwork, match="serves network 'dhtsignal/1', not 'other'"):
        await asyncio.wait_for(other.ping(a.address), WAIT)  # type: ignore[arg-type]
    assert a.stats["drop:wrong-network"] == before + 1  # answered: no retry
    assert await asyncio.wait_for(other.bootstrap([a.address, d2.address]), WAIT) == 0  # type: ignore[list-item]
    assert a.stats["drop:wrong-network"] >= before + 2
    assert d2.stats["drop:wrong-network"] >= 1
    assert a.table.get(other.id) is None and d2.table.get(other.id) is None
    assert len(other.table) == 0
    assert other.core.all_other_network() is not None
    # And the other way round.
    with pytest.raises(WrongNetwork, match="serves network 'other'"):
        await asyncio.wait_for(a.ping(other.address), WAIT)  # type: ignore[arg-type]
    assert other.stats["drop:wrong-network"] == 1
    assert other.table.get(a.id) is None
    # Our network is unaffected: lookups among ours and the stock node still work.
    res = await asyncio.wait_for(d2.find_nodes(s1.node.id), WAIT)
    assert res.closest[0].id == s1.node.id
    assert other.id not in {c.id for c in res.closest}


async def test_our_nodes_do_not_bootstrap_through_a_stock_node(mixed: Mixed) -> None:
    """Deliberate: stock nodes join through ours, not the other way round. A stock node
    ignores ds_ping; falling back to the stock ping would also admit the nodes of another
    dhtsignal network (they answer stock RPCs, which carry no network id), which the test
    above keeps out. So a join through a stock node only finds nobody, quickly."""
    a = await mixed.ds()
    s1, s1_addr = await mixed.stock()
    await asyncio.wait_for(s1.bootstrap([at(a)]), WAIT)
    d = await mixed.ds(FAST)
    assert await asyncio.wait_for(d.bootstrap([s1_addr]), WAIT) == 0
    assert len(d.table) == 0
    assert d.stats["rpc-retry"] >= 1  # it did ask, and got no answer
