"""Issue 10 items 1 and 5 on real sockets: no amplification, no push to an address that did
not ask, no contact admitted on a request's word, contact addresses IP literals only.

Distinct 127.x.y.z source addresses stand in for distinct hosts. A *spoofed* request is
one sent from a socket bound to the victim's address: the node cannot tell it from a
forged source address, and the socket counts every byte the victim then receives.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kademlia.network import Server

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.events import Event, RequestFailed
from dhtsignal.dht.params import DEFAULT_NETWORK, NodeConfig
from dhtsignal.dht.records import RecordType
from dhtsignal.dht.replies import ping_reply
from dhtsignal.dht.routing import DIALECT_DS, DIALECT_STOCK, Contact
from dhtsignal.dht.rpc import FLAG_CLIENT, parse_contact
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, is_ip_literal

NET = DEFAULT_NETWORK
WAIT = 5.0
FAST = NodeConfig(rpc_timeout=0.1, rpc_retries=1, peer_timeout=0.05)
_hosts = itertools.count(1)


class Host(asyncio.DatagramProtocol):
    """A socket on its own 127.x.y.z address that counts the bytes it sends and receives."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.inbox: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.id = os.urandom(20)
        self.sent = 0
        self.received = 0
        self.datagrams: list[codec.Request | codec.Response] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += len(data)
        self.datagrams.append(codec.decode(data))
        self.inbox.put_nowait((data, (addr[0], addr[1])))

    @property
    def addr(self) -> Addr:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes, dst: Addr) -> None:
        assert self.transport is not None
        self.sent += len(data)
        self.transport.sendto(data, dst)

    def request(self, dst: Addr, name: str, args: list[Any]) -> bytes:
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        self.send(codec.encode_request(msg_id, name, args), dst)
        return msg_id

    async def next_message(self) -> tuple[codec.Request | codec.Response, Addr]:
        data, src = await asyncio.wait_for(self.inbox.get(), WAIT)
        return codec.decode(data), src

    async def call(self, dst: Addr, name: str, args: list[Any]) -> Any:
        """Send a request, wait for its response; answer the node's pings meanwhile
        only if ``self.answers``."""
        msg_id = self.request(dst, name, args)
        for _ in range(1000):
            msg, src = await self.next_message()
            if isinstance(msg, codec.Response) and msg.msg_id == msg_id:
                return msg.result
            if isinstance(msg, codec.Request) and self.answers:
                self.answer_ping(msg, src)
        raise AssertionError("no answer")

    answers = False

    def answer_ping(self, msg: codec.Request, src: Addr) -> None:
        if msg.name == "ds_ping":
            self.send(codec.encode_response(msg.msg_id, [self.id, list(src)]), src)
        elif msg.name == "ping":
            self.send(codec.encode_response(msg.msg_id, self.id), src)
        elif msg.name == "ds_notify":
            self.send(codec.encode_response(msg.msg_id, True), src)

    def requests(self, name: str) -> list[codec.Request]:
        return [m for m in self.datagrams if isinstance(m, codec.Request) and m.name == name]


OpenHost = Callable[..., Awaitable[Host]]


@pytest.fixture
async def open_host() -> AsyncIterator[OpenHost]:
    """Sockets each on a distinct 127.x.y.z address; closed in teardown."""
    hosts: list[Host] = []

    async def make(answers: bool = False) -> Host:
        i = next(_hosts)
        ip = f"127.{40 + os.getpid() % 100}.{i // 250}.{i % 250 + 1}"
        loop = asyncio.get_running_loop()
        _, h = await loop.create_datagram_endpoint(Host, local_addr=(ip, 0))
        h.answers = answers
        hosts.append(h)
        return h

    try:
        yield make
    finally:
        for h in hosts:
            if h.transport is not None:
                h.transport.close()


@pytest.fixture
async def node() -> AsyncIterator[DhtNode]:
    """A node whose table holds 20 good contacts (so find replies are large)."""
    n = DhtNode(os.urandom(20), FAST)
    await n.listen_udp("127.0.0.1")
    now = asyncio.get_running_loop().time()
    for i in range(20):
        n.table.add_contact(Contact(os.urandom(20), f"10.9.0.{i + 1}", 4000 + i, DIALECT_DS), now)
    try:
        yield n
    finally:
        await n.close()


def at(n: DhtNode) -> Addr:
    assert n.address is not None
    return n.address


def ds(h: Host, *rest: Any, flags: int = 0) -> list[Any]:
    return [NET, h.id, flags, *rest]


async def barrier(n: DhtNode, h: Host) -> None:
    """Every datagram ``h`` sent before has been handled (and its replies sent)."""
    await h.call(at(n), "ds_ping", ds(h, flags=FLAG_CLIENT))


def _record(key: bytes, payload: bytes = b"v" * 300, who: Identity | None = None) -> bytes:
    who = who or Identity.generate()
    return records.sign(who, RecordType.DATA, key, payload, seq=1, expires=time.time() + 600).raw


async def test_spoofed_listens_then_stores_push_nothing_to_the_victim(
    node: DhtNode, open_host: OpenHost
) -> None:
    """The measured attack: 64 spoofed ``ds_listen`` register a victim, then 10
    ``ds_store`` batches. Today 222x the attacker's bytes; now at most 3x the bytes the
    victim's address sent, and not one push. A host that never sent anything gets 0."""
    victim, attacker, bystander = await open_host(), await open_host(), await open_host()
    keys = [records.data_key(f"k{i}") for i in range(10)]
    for i in range(64):
        victim.request(at(node), "ds_listen", ds(victim, keys[i % 10], 600))
    for key in keys:
        attacker.request(at(node), "ds_store", ds(attacker, [_record(key)]))
    await barrier(node, attacker)
    await barrier(node, victim)
    assert node.stats["refused:unvalidated"] == 64
    assert victim.requests("ds_notify") == []
    # Replies and the validation ping (no retries), all at most 3x what it sent.
    assert victim.received <= 3 * victim.sent
    assert node.outstanding(victim.addr) <= 1
    assert bystander.received == 0 and node.outstanding(bystander.addr) == 0


STOCK_FIND = "find_node"


def _rpcs(h: Host, key: bytes, raw: bytes) -> list[tuple[str, list[Any]]]:
    return [
        ("ping", [h.id]),
        ("stun", []),
        ("store", [h.id, key, b"x" * 40]),
        ("find_node", [h.id, key]),
        ("find_value", [h.id, key]),
        ("ds_ping", ds(h)),
        ("ds_find_node", ds(h, key)),
        ("ds_find_value", ds(h, key, 0)),
        ("ds_find_value", ds(h, key, 1)),
        ("ds_store", ds(h, [raw])),
        ("ds_store_find", ds(h, key, [raw])),
        ("ds_listen", ds(h, key, 60)),
        ("ds_unlisten", ds(h, key)),
        ("ds_notify", ds(h, key, [])),
        ("ds_leave", ds(h)),
    ]


async def test_every_reply_to_an_unvalidated_address_is_at_most_3x(
    node: DhtNode, open_host: OpenHost
) -> None:
    """Every RPC, from a spoofed address that never answers: the key holds records and a
    large stock value, so the full replies would be 8-14x the request."""
    key = records.data_key("amplified")
    core = node.core
    wall = time.time()
    for _ in range(6):
        rec = records.decode(_record(key))
        core.store.put(rec, ("10.9.9.9", 1), wall)
    core.legacy.put(key, b"L" * 1000, wall)
    for name, args in _rpcs(await open_host(), key, _record(key)):
        victim = await open_host()
        args = [victim.id, *args[1:]] if args and args[0] != NET else args
        if args and args[0] == NET:
            args = [NET, victim.id, *args[2:]]
        for _ in range(3):
            victim.request(at(node), name, args)
        await barrier(node, victim)
        assert victim.received <= 3 * victim.sent, name
    assert node.stats["reply-cut"] > 0


async def test_a_validated_address_gets_full_replies(node: DhtNode, open_host: OpenHost) -> None:
    """A host that answers the node's ping is validated: then its find gets all 20."""
    h = await open_host(answers=True)
    key = os.urandom(20)
    first = await h.call(at(node), "ds_find_node", ds(h, key))
    assert len(first) < 20  # cut to fit 3x the request
    await barrier(node, h)  # the validation ping was answered meanwhile
    assert node.core.addrs.is_validated(h.addr)
    full = await h.call(at(node), "ds_find_node", ds(h, key))
    assert len(full) == 20
    assert len(codec.pack(full)) > 3 * len(codec.encode_request(b"\0" * 20, "x", ds(h, key)))
    # And it entered the routing table with the ID it answered with.
    assert node.table.get(h.id) is not None


async def test_spoofed_requests_add_nothing_to_the_routing_table(
    node: DhtNode, open_host: OpenHost
) -> None:
    before = {c.id for c in node.table.contacts()}
    claimed: list[bytes] = []
    for _ in range(40):
        h = await open_host()
        for name, args in (
            ("ds_ping", ds(h)),
            ("ds_find_node", ds(h, os.urandom(20))),
            ("ping", [h.id]),
            ("find_node", [h.id, os.urandom(20)]),
        ):
            h.request(at(node), name, args)
        claimed.append(h.id)
        await barrier(node, h)
    assert {c.id for c in node.table.contacts()} == before
    assert node.stats["validation-ping"] >= 40
    # One that answers the ping enters under the ID it answered with, not the claimed one.
    honest = await open_host(answers=True)
    claim = honest.id
    honest.id = os.urandom(20)
    await honest.call(at(node), "ds_find_node", [NET, claim, 0, os.urandom(20)])
    await barrier(node, honest)
    assert node.table.get(honest.id) is not None and node.table.get(claim) is None


def test_contact_addresses_are_ip_literals() -> None:
    nid = os.urandom(20)
    for bad in ("localhost", "example.org", "", "1.2.3", "fe80::1%eth0", "x" * 64, "[::1]"):
        assert not is_ip_literal(bad)
        assert parse_contact([nid, bad, 4000, DIALECT_DS]) is None
        assert parse_contact([nid, bad, 4000]) is None  # the stock form
        assert ping_reply([nid, [bad, 4000]]) == (nid, None)
    for good in ("127.0.0.1", "10.1.2.3", "::1", "2001:db8::7"):
        c = parse_contact([nid, good, 4000])
        assert c is not None and c.dialect == DIALECT_STOCK
        assert ping_reply([nid, [good, 4000]]) == (nid, (good, 4000))


async def test_a_lookup_takes_no_host_name_from_a_reply(open_host: OpenHost) -> None:
    """Our ``ds_find_node`` and the stock ``find_node`` replies naming host names: the
    lookup takes only the IP literals."""
    n = DhtNode(os.urandom(20), FAST)
    await n.listen_udp("127.0.0.1")
    try:
        p, q = await open_host(answers=True), await open_host(answers=True)
        ping = asyncio.ensure_future(n.ping(p.addr))
        msg, src = await p.next_message()
        assert isinstance(msg, codec.Request)
        p.answer_ping(msg, src)
        assert await asyncio.wait_for(ping, WAIT) == p.id
        target = os.urandom(20)
        look = asyncio.ensure_future(n.find_nodes(target))
        msg, src = await p.next_message()
        assert isinstance(msg, codec.Request) and msg.name == "ds_find_node"
        named = [
            [os.urandom(20), "localhost", 4000, DIALECT_DS],
            [os.urandom(20), "evil.example", 4000, DIALECT_STOCK],
            [os.urandom(20), "evil.example", 4000],
            [q.id, q.addr[0], q.addr[1]],  # stock form, an IP literal
        ]
        p.send(codec.encode_response(msg.msg_id, named), src)
        msg, src = await q.next_message()  # only q is asked, the stock way
        assert isinstance(msg, codec.Request) and msg.name == "find_node"
        q.send(codec.encode_response(msg.msg_id, [[os.urandom(20), "evil.example", 1]]), src)
        res = await asyncio.wait_for(look, WAIT)
        assert {c.id for c in res.closest} == {p.id, q.id}
        assert all(is_ip_literal(c.ip) for c in n.table.contacts())
    finally:
        await n.close()


async def test_pushes_to_a_listener_that_stops_answering_stop(
    node: DhtNode, open_host: OpenHost
) -> None:
    listener, writer = await open_host(answers=True), await open_host()
    key = records.data_key("pushed")
    await listener.call(at(node), "ds_ping", ds(listener))  # validated by the node's ping
    await barrier(node, listener)
    assert await listener.call(at(node), "ds_listen", ds(listener, key, 60)) == 60
    await writer.call(at(node), "ds_store", ds(writer, [_record(key)]))
    await barrier(node, listener)  # answered the push
    assert len(listener.requests("ds_notify")) == 1
    # Now it stops answering: the next push and its one retry time out...
    listener.answers = False
    failed = asyncio.Event()

    def seen(ev: Event) -> None:
        if isinstance(ev, RequestFailed) and ev.error.addr == listener.addr:
            failed.set()

    node.observe(seen)
    await writer.call(at(node), "ds_store", ds(writer, [_record(key)]))
    await asyncio.wait_for(failed.wait(), WAIT)
    pushes = len(listener.requests("ds_notify"))
    assert pushes == 1 + 1 + FAST.rpc_retries
    # ...and no further push goes there.
    for _ in range(5):
        await writer.call(at(node), "ds_store", ds(writer, [_record(key)]))
    await barrier(node, writer)
    assert len(listener.requests("ds_notify")) == pushes
    assert node.outstanding(listener.addr) == 0
    assert not node.core.addrs.is_validated(listener.addr)


async def test_a_stock_node_joins_and_routes_through_ours() -> None:
    """A stock ``kademlia`` node's first request gets a short reply and a ping from us;
    it answers, and from then on it is a contact with full replies: two stock nodes joined
    through ours store and find a value."""
    n = DhtNode(os.urandom(20), NodeConfig(rpc_timeout=0.5, rpc_retries=1, peer_timeout=2.0))
    await n.listen_udp("127.0.0.1")
    stocks: list[Server] = []
    try:
        for _ in range(2):
            s = Server(node_id=os.urandom(20))
            stocks.append(s)
            await s.listen(0, interface="127.0.0.1")
            assert await asyncio.wait_for(s.bootstrap([at(n)]), 20.0)
        s1, s2 = stocks
        assert n.table.get(s1.node.id) is not None and n.table.get(s2.node.id) is not None
        assert n.core.addrs.is_validated(s1.transport.get_extra_info("sockname")[:2])
        assert await asyncio.wait_for(s1.set("stock-key", "stock-value"), 20.0)
        assert await asyncio.wait_for(s2.get("stock-key"), 20.0) == "stock-value"
    finally:
        for s in stocks:
            s.stop()
        await n.close()
