"""A real node on 127.0.0.1 under hostile datagrams from a raw UDP socket.

Each batch of hostile datagrams is followed by a ``ds_ping`` from the same
socket; on loopback the node handles datagrams from one socket in order, so the
ping's reply is the barrier after which the node's counters can be compared
with what was sent. The guarantees checked: every refusal is counted under its
reason, nothing raises (no ``drop:internal``, nothing reaches the loop's
exception handler), the node keeps answering both RPC families, and it owns
every task it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import virtual_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.node import Event, RequestFailed
from dhtsignal.dht.params import DEFAULT_NETWORK, NodeConfig
from dhtsignal.dht.records import RecordType, node_key
from dhtsignal.dht.routing import DIALECT_DS, Contact, RoutingTable
from dhtsignal.dht.rpc import FLAG_CLIENT, RequestHandler
from dhtsignal.dht.storage import LegacyStore, RecordStore, StorageLimits, Subscriptions
from dhtsignal.errors import RpcTimeout
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

NET = DEFAULT_NETWORK
WAIT = 5.0  # generous bound on any one reply over loopback


class RawPeer(asyncio.DatagramProtocol):
    """A raw UDP socket: sends any bytes, collects whatever comes back."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.inbox: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.id = os.urandom(20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait((data, (addr[0], addr[1])))

    @property
    def addr(self) -> Addr:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes, dst: Addr) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dst)

    async def next_message(self) -> tuple[codec.Request | codec.Response, Addr]:
        data, src = await asyncio.wait_for(self.inbox.get(), WAIT)
        return codec.decode(data), src

    async def call(self, dst: Addr, name: str, args: list[Any]) -> Any:
        """Send a request and wait for the response with its message id."""
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        self.send(codec.encode_request(msg_id, name, args), dst)
        while True:
            msg, _ = await self.next_message()
            if isinstance(msg, codec.Response) and msg.msg_id == msg_id:
                return msg.result

    async def barrier(self, dst: Addr) -> None:
        reply = await self.call(dst, "ds_ping", [NET, self.id, FLAG_CLIENT])
        assert reply[1] == list(self.addr)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Everything that reaches the event loop's exception handler during the test."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


@pytest.fixture
async def node(loop_errors: list[dict[str, Any]]) -> AsyncIterator[DhtNode]:
    n = DhtNode(os.urandom(20))
    await n.listen_udp()
    try:
        yield n
    finally:
        await n.close()


@pytest.fixture
async def open_peer() -> AsyncIterator[Callable[[], Awaitable[RawPeer]]]:
    peers: list[RawPeer] = []

    async def make() -> RawPeer:
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_datagram_endpoint(RawPeer, local_addr=("127.0.0.1", 0))
        peers.append(peer)
        return peer

    try:
        yield make
    finally:
        for p in peers:
            if p.transport is not None:
                p.transport.close()


def _unowned_tasks(n: DhtNode) -> set[asyncio.Task[Any]]:
    me = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not me and not t.done()} - n.tasks


def _refusals(stats: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in stats.items() if k.startswith(("drop:", "refused:")) and v})


def _req(name: Any, args: Any) -> bytes:
    return b"\x00" + os.urandom(20) + codec.pack([name, args])


def _ds(name: str, *rest: Any, net: str = NET, nid: Any = None, flags: Any = FLAG_CLIENT) -> bytes:
    return _req(name, [net, os.urandom(20) if nid is None else nid, flags, *rest])


def _exactly(size: int) -> bytes:
    """A stock ``ping`` whose (wrong) argument pads the datagram to ``size`` bytes."""
    pad = size - len(_req("ping", [b""]))
    for extra in range(3):  # the bin header grows with the length
        d = _req("ping", [b"x" * (pad - extra)])
        if len(d) == size:
            return d
    raise AssertionError(size)


def _store(*raws: Any) -> bytes:
    return _ds("ds_store", list(raws))


async def _expect(
    n: DhtNode, peer: RawPeer, datagrams: list[bytes], expected: dict[str, int]
) -> list[Any]:
    """Send ``datagrams``, pass the barrier, check the refusal counters moved by ``expected``.

    :returns: the replies that came back before the barrier.
    """
    before = _refusals(n.stats)
    for d in datagrams:
        peer.send(d, n.address)  # type: ignore[arg-type]
    msg_id = os.urandom(20)
    peer.send(codec.encode_request(msg_id, "ds_ping", [NET, peer.id, FLAG_CLIENT]), n.address)  # type: ignore[arg-type]
    replies: list[Any] = []
    while True:
        msg, _ = await peer.next_message()
        if isinstance(msg, codec.Response) and msg.msg_id == msg_id:
            break
        if isinstance(msg, codec.Request) and msg.name == "ds_ping":
            continue  # the node validating our address (issue 10): not a reply
        replies.append(msg.result if isinstance(msg, codec.Response) else msg)
    delta = _refusals(n.stats)
    delta.subtract(before)
    assert +delta == Counter(expected)
    return replies


#: A STUN Allocate request: the node answers only Binding requests (tests/test_stun.py).
STUN_ALLOCATE = bytes.fromhex("0003 0000 2112a442") + os.urandom(12)


async def test_malformed_datagrams_are_counted_by_reason(
    node: DhtNode, open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    peer = await open_peer()
    await peer.barrier(node.address)  # type: ignore[arg-type]
    await _expect(
        node,
        peer,
        [
            _req("ping", [b"x" * 1500]),
            _exactly(codec.MAX_DATAGRAM + 1),  # one byte over is as bad as 60 KB
            os.urandom(9000),
            os.urandom(60_000),
            _exactly(codec.MAX_DATAGRAM),  # the limit itself is fine (then: not an ID)
        ],
        {"drop:oversized": 4, "drop:bad-args": 1},
    )
    await _expect(
        node,
        peer,
        [b"\x00", b"\x00" * 21, b"\x01" + os.urandom(20)],
        {"drop:short": 3},
    )
    # asyncio transports never send an empty datagram: use a plain socket for that one.
    before = node.stats["drop:short"]
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        assert node.address is not None
        sock.sendto(b"", node.address)
        msg_id = os.urandom(20)
        sock.sendto(
            codec.encode_request(msg_id, "ds_ping", [NET, peer.id, FLAG_CLIENT]), node.address
        )
        reply = codec.decode(await asyncio.wait_for(loop.sock_recv(sock, 2048), WAIT))
        assert isinstance(reply, codec.Response) and reply.msg_id == msg_id
    assert node.stats["drop:short"] == before + 1
    await _expect(
        node,
        peer,
        [
            b"\x00" + os.urandom(20) + b"\xc1",  # a byte msgpack never uses
            b"\x00" + os.urandom(20) + b"\x92\xa4pi",  # truncated
            # trailing bytes other than padding (zero bytes: issue 10's padded requests)
            b"\x00" + os.urandom(20) + codec.pack(["ping", []]) + b"\x00\x01",
            b"\x00" + os.urandom(20) + b"\xc7\x01\x05x",  # ext type
            b"\x00" + os.urandom(20) + b"\x91" * 1200,  # nested deeper than the decoder allows
            b"\x01" + os.urandom(20) + b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GB
        ],
        {"drop:undecodable": 6},
    )
    await _expect(
        node,
        peer,
        [
            b"\x00" + os.urandom(20) + codec.pack("ping"),
            b"\x00" + os.urandom(20) + codec.pack(["ping"]),
            b"\x00" + os.urandom(20) + codec.pack(["ping", [], 3]),
            b"\x00" + os.urandom(20) + codec.pack([7, []]),
            b"\x00" + os.urandom(20) + codec.pack(["ping", "args"]),
            b"\x00" + os.urandom(20) + codec.pack([b"ping", [b"x" * 20]]),
            b"\x05" + os.urandom(20) + codec.pack(["ping", []]),
            STUN_ALLOCATE,
        ],
        {"drop:bad-shape": 6, "drop:bad-kind": 1, "drop:stun": 1},
    )
    assert node.stats["drop:internal"] == 0
    assert loop_errors == []
    assert not _unowned_tasks(node)


async def test_bad_rpcs_are_counted_by_reason(
    node: DhtNode, open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    peer = await open_peer()
    nid = os.urandom(20)
    await _expect(
        node,
        peer,
        [
            _ds("ds_ping", "extra"),
            _ds("ds_find_node"),
            _ds("ds_store", [], []),
            _req("ds_ping", []),
            _req("ping", []),
            _req("ping", [nid, nid]),
            _req("find_node", [nid]),
            _req("store", [nid, nid]),
            _req("stun", [nid]),
        ],
        {"drop:arity": 9},
    )
    await _expect(
        node,
        peer,
        [
            _req(name, [nid])
            for name in ("rpc_ping", "__init__", "transport", "_accept_request", "PING", "", "ds_")
        ],
        {"drop:unknown-rpc": 7},
    )
    await _expect(
        node,
        peer,
        [
            _ds("ds_ping", net="other"),
            _ds("ds_ping", net=""),
            _ds("ds_find_node", nid, net="dhtsignal/2"),
            _ds("ds_ping", net=None),  # type: ignore[arg-type]
            _ds("ds_store", [b"x"], net=NET.encode()),  # type: ignore[arg-type]
        ],
        {"drop:wrong-network": 5},
    )
    before_table = len(node.table)
    await _expect(
        node,
        peer,
        [
            _ds("ds_ping", nid=b"short", flags=0),
            _ds("ds_ping", nid="x" * 20, flags=0),
            _ds("ds_ping", flags="0"),
            _ds("ds_ping", flags=None),
            _ds("ds_find_node", "not an id"),
            _ds("ds_find_node", b"\x00" * 19),
            _ds("ds_find_value", nid, -1),
            _ds("ds_find_value", nid, "0"),
            _ds("ds_store", "not a list"),
            _ds("ds_store", []),
            _ds("ds_store", [b"r"] * 5),
            _ds("ds_store_find", b"k", [b"r"]),
            _ds("ds_store_find", nid, "not a list"),
            _ds("ds_store_find", nid, [b"r"] * 5),
            _ds("ds_listen", nid, "60"),
            _ds("ds_listen", b"k", 60),
            _ds("ds_notify", nid, [b"r"] * 5),
            _ds("ds_notify", b"k", []),
            _req("ping", [b"short"]),
            _req("ping", [12345]),
            _req("store", ["not an id", nid, 1]),
        ],
        {"drop:bad-args": 21},
    )
    assert len(node.table) == before_table  # no contact was made of any of them
    await _expect(
        node,
        peer,
        [_req("find_node", [nid, b"short"]), _req("find_value", [nid, None])],
        {"drop:bad-args": 2},
    )
    replies = await _expect(
        node,
        peer,
        [
            _req("store", [nid, b"short key", b"v"]),
            _req("store", [nid, nid, [1, 2]]),
            _req("store", [nid, nid, b"v" * 1100]),
        ],
        {"refused:bad-legacy": 3},
    )
    assert replies == [False, False, False]
    await _expect(
        node,
        peer,
        [b"\x01" + os.urandom(20) + codec.pack(x) for x in (True, None, [1, 2], {"value": 1})],
        {"drop:unexpected-response": 4},
    )
    assert node.stats["drop:internal"] == 0
    assert loop_errors == []
    assert not _unowned_tasks(node)


async def test_forged_replayed_and_stale_records_are_refused(
    node: DhtNode, open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    peer = await open_peer()
    alice, mallory = Identity.generate(), Identity.generate()
    now = time.time()
    key = records.data_key("hostile")

    def rec(who: Identity, seq: int, payload: bytes = b"v", ttl: float = 60.0) -> records.Record:
        return records.sign(who, RecordType.DATA, key, payload, seq=seq, expires=now + ttl)

    v5 = rec(alice, 5, b"five")
    replies = await _expect(node, peer, [_store(v5.raw)], {})
    assert replies == [["ok"]]

    # Forged: payload changed after signing; signer swapped; signature of another record.
    body = codec.unpack(v5.raw)
    forged_payload = codec.pack([*body[:8], b"FIVE", body[9]])
    forged_signer = codec.pack([*body[:4], mallory.public_key, *body[5:]])
    other_sig = codec.pack([*body[:9], rec(alice, 6).signature])
    # Replayed or stale: the same record again is a harmless repeat; older or equal-seq
    # different content is stale; an expired one is refused before storage.
    v4 = rec(alice, 4, b"four")
    v5b = rec(alice, 5, b"FIVE")
    old = records.sign(alice, RecordType.DATA, key, b"old", seq=9, expires=now - 1)
    too_long = records.sign(alice, RecordType.DATA, key, b"x", seq=9, expires=now + 10 * 86400)
    squatter = records.sign(
        mallory,
        RecordType.CLAIM,
        node_key("alice"),
        codec.pack({"id": "bob"}),
        seq=1,
        expires=now + 60,
    )
    # A record signed for another network; a version 1 record (no network id).
    other_net = records.sign(
        alice, RecordType.DATA, key, b"v", seq=7, expires=now + 60, network="other-net"
    )
    v1_fields = [1, int(RecordType.DATA), key, alice.public_key, b"", 7, now + 60, b"v"]
    v1_sig = alice.sign(b"dhtsignal/record/v1\x00" + codec.pack(v1_fields))
    version_1 = codec.pack([*v1_fields, v1_sig])
    replies = await _expect(
        node,
        peer,
        [
            _store(forged_payload, forged_signer, other_sig),
            _store(v5.raw, v4.raw, v5b.raw),
            _store(old.raw, too_long.raw, squatter.raw),
            _store(b"\x00" * (records.MAX_RECORD + 1)),
            _store(42, b"", v5.raw[:-1]),
            _store(other_net.raw, version_1),
        ],
        {
            "refused:bad-signature": 3,
            "refused:stale-seq": 2,
            "refused:expired": 1,
            "refused:ttl-too-long": 1,
            "refused:wrong-key": 1,
            "refused:oversized": 1,
            "refused:malformed": 3,
            "refused:wrong-network": 1,
            "refused:bad-version": 1,
        },
    )
    assert replies == [
        ["bad-signature"] * 3,
        ["ok", "stale-seq", "stale-seq"],
        ["expired", "ttl-too-long", "wrong-key"],
        ["oversized"],
        ["malformed", "malformed", "malformed"],
        ["wrong-network", "bad-version"],
    ]
    assert [r.raw for r in node.store.get(key, time.time())] == [v5.raw]
    assert len(node.store) == 1

    # First live claim wins over the network too.
    mine = records.sign(
        alice,
        RecordType.CLAIM,
        node_key("alice"),
        codec.pack({"id": "alice"}),
        seq=1,
        expires=now + 60,
    )
    theirs = records.sign(
        mallory,
        RecordType.PRESENCE,
        node_key("alice"),
        codec.pack({"id": "alice"}),
        seq=1,
        expires=now + 60,
    )
    replies = await _expect(
        node, peer, [_store(mine.raw), _store(theirs.raw)], {"refused:id-taken": 1}
    )
    assert replies == [["ok"], ["id-taken"]]
    # Notifications are checked the same way.
    replies = await _expect(
        node,
        peer,
        [_ds("ds_notify", key, [forged_payload, old.raw])],
        {"refused:bad-signature": 1, "refused:expired": 1},
    )
    assert replies == [False]  # nobody here listens on that key
    assert node.stats["drop:internal"] == 0
    assert loop_errors == []
    assert not _unowned_tasks(node)


async def test_node_still_answers_both_families(
    node: DhtNode, open_peer: Callable[[], Awaitable[RawPeer]]
) -> None:
    peer = await open_peer()
    for junk in (os.urandom(40), _req("nope", []), os.urandom(3000)):
        peer.send(junk, node.address)  # type: ignore[arg-type]
    assert await peer.call(node.address, "ping", [peer.id]) == node.id  # type: ignore[arg-type]
    reply = await peer.call(node.address, "ds_ping", [NET, peer.id, FLAG_CLIENT])  # type: ignore[arg-type]
    assert reply == [node.id, list(peer.addr)]
    assert await peer.call(node.address, "stun", []) == list(peer.addr)  # type: ignore[arg-type]


# -- generated garbage ------------------------------------------------------------------------


def _containers_of(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and maps of ``inner`` (the recursive step; a named function, since hypothesis
    reads a lambda's source to check it recurses, and that reading is not reliable)."""
    return st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=True),
        st.text(max_size=30),
        st.binary(max_size=40),
        st.sampled_from([NET, "other"]),
        st.binary(min_size=20, max_size=20),
    ),
    _containers_of,
    max_leaves=25,
)
DS_NAMES = [
    "ds_ping",
    "ds_find_node",
    "ds_find_value",
    "ds_store",
    "ds_store_find",
    "ds_listen",
    "ds_unlisten",
    "ds_notify",
]
rpc_names = st.one_of(
    st.sampled_from(["ping", "stun", "store", "find_node", "find_value", *DS_NAMES]),
    st.text(max_size=12),
)


@st.composite
def hostile_datagram(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 4))
    msg_id = draw(st.binary(min_size=20, max_size=20))
    if kind == 0:
        return draw(st.binary(max_size=1500))
    if kind == 1:  # a request of a real or random name with random arguments
        args = draw(st.lists(msgpack_values, max_size=6))
        return b"\x00" + msg_id + codec.pack([draw(rpc_names), args])
    if kind == 2:  # one of ours with the right header and random arguments
        name = draw(st.sampled_from(DS_NAMES))
        rest = draw(st.lists(msgpack_values, max_size=3))
        flags = draw(st.sampled_from([0, 1, 2, 3]))
        return (
            b"\x00"
            + msg_id
            + codec.pack([name, [NET, draw(st.binary(min_size=20, max_size=20)), flags, *rest]])
        )
    if kind == 3:  # a response nobody asked for
        return b"\x01" + msg_id + codec.pack(draw(msgpack_values))
    return bytes([draw(st.integers(0, 255))]) + msg_id + codec.pack(draw(msgpack_values))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=st.lists(hostile_datagram(), min_size=1, max_size=25))
async def test_random_streams_never_break_the_node(
    node: DhtNode,
    open_peer: Callable[[], Awaitable[RawPeer]],
    loop_errors: list[dict[str, Any]],
    stream: list[bytes],
) -> None:
    peer = await open_peer()  # one socket per example: its own rate-limit bucket
    try:
        for d in stream:
            peer.send(d, node.address)  # type: ignore[arg-type]
        await peer.barrier(node.address)  # type: ignore[arg-type]
        assert await peer.call(node.address, "ping", [peer.id]) == node.id  # type: ignore[arg-type]
    finally:
        assert peer.transport is not None
        peer.transport.close()
    assert node.stats["drop:internal"] == 0
    assert node.stats["task-error"] == 0
    assert loop_errors == []
    assert not _unowned_tasks(node)
    assert node.outstanding() <= node.config.max_inflight // 2 + 1


# -- the client side: retries, lost replies, eviction -------------------------------------------


FAST = NodeConfig(rpc_timeout=0.1, rpc_retries=1, peer_timeout=0.05, max_failures=3)


async def _answer_ds_ping(peer: RawPeer, msg: codec.Request, src: Addr) -> None:
    peer.send(codec.encode_response(msg.msg_id, [peer.id, list(src)]), src)


async def test_a_reply_to_the_second_try_counts_as_success(
    open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    n = DhtNode(os.urandom(20), FAST)
    await n.listen_udp()
    try:
        peer = await open_peer()
        ping = asyncio.create_task(n.ping(peer.addr))
        try:
            first, src = await peer.next_message()
            second, src2 = await peer.next_message()  # the retry: same message, same id
            assert isinstance(first, codec.Request) and isinstance(second, codec.Request)
            assert (first.name, first.msg_id, src) == (second.name, second.msg_id, src2)
            assert first.name == "ds_ping"
            await _answer_ds_ping(peer, second, src2)
            assert await asyncio.wait_for(ping, WAIT) == peer.id
        finally:
            ping.cancel()
        assert n.stats["rpc-retry"] == 1
        assert n.stats["rpc-timeout"] == 0
        c = n.table.get(peer.id)
        assert c is not None and c.failures == 0 and c.dialect == DIALECT_DS
        assert loop_errors == []
    finally:
        await n.close()


async def test_response_from_another_address_is_ignored(
    open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    n = DhtNode(os.urandom(20), FAST)
    await n.listen_udp()
    try:
        peer, impostor = await open_peer(), await open_peer()
        ping = asyncio.create_task(n.ping(peer.addr))
        try:
            req, src = await peer.next_message()
            assert isinstance(req, codec.Request)
            impostor.send(codec.encode_response(req.msg_id, [impostor.id, list(src)]), src)
            await impostor.barrier(src)  # the forged reply has been handled by now
            assert n.stats["drop:response-from-wrong-address"] == 1
            assert not ping.done()
            await _answer_ds_ping(peer, req, src)
            assert await asyncio.wait_for(ping, WAIT) == peer.id
        finally:
            ping.cancel()
        assert n.table.get(impostor.id) is None
    finally:
        await n.close()


async def _learn(n: DhtNode, peer: RawPeer) -> None:
    """Make ``peer`` a contact of ``n``: n pings it, it answers."""
    ping = asyncio.create_task(n.ping(peer.addr))
    try:
        req, src = await peer.next_message()
        assert isinstance(req, codec.Request)
        await _answer_ds_ping(peer, req, src)
        assert await asyncio.wait_for(ping, WAIT) == peer.id
    finally:
        ping.cancel()


async def _newcomer_asks(n: DhtNode, newcomer: RawPeer) -> None:
    """``newcomer`` sends a request, then answers the ping by which the node validates it
    (a request alone admits no contact: issue 10 item 5)."""
    confirmed = n.core.addrs.touch(newcomer.addr)[1] == newcomer.id
    reply = await newcomer.call(n.address, "ds_ping", [NET, newcomer.id, 0])  # type: ignore[arg-type]
    assert reply[0] == n.id
    if confirmed:  # it answered from this address with this ID before: no ping needed
        await newcomer.barrier(n.address)  # type: ignore[arg-type]
        return
    ping, src = await newcomer.next_message()
    assert isinstance(ping, codec.Request) and ping.name == "ds_ping"
    await _answer_ds_ping(newcomer, ping, src)
    await newcomer.barrier(n.address)  # type: ignore[arg-type]


class Failures:
    """The RPCs of a node to ``addr`` that ran out of tries, in order (watched through
    :meth:`DhtNode.observe`; the node has done its own bookkeeping when one is reported)."""

    def __init__(self, node: DhtNode, addr: Addr) -> None:
        self._queue: asyncio.Queue[RpcTimeout] = asyncio.Queue()

        def seen(ev: Event) -> None:
            if isinstance(ev, RequestFailed) and ev.error.addr == addr:
                self._queue.put_nowait(ev.error)

        node.observe(seen)

    async def next(self) -> RpcTimeout:
        return await self._queue.get()


@contextlib.asynccontextmanager
async def _full_far_bucket(
    open_peer: Callable[[], Awaitable[RawPeer]],
) -> AsyncIterator[tuple[DhtNode, RawPeer, RawPeer]]:
    """A node with k=1 whose far bucket (which cannot split) holds ``silent``, and a
    ``newcomer`` of that bucket: yields ``(node, silent, newcomer)``; closes the node."""
    n = DhtNode(b"\x00" * 20, dataclasses.replace(FAST, ksize=1))
    await n.listen_udp()
    try:
        silent, newcomer = await open_peer(), await open_peer()
        silent.id = b"\xff" * 20
        newcomer.id = b"\xfe" + b"\xff" * 19
        await _learn(n, silent)
        yield n, silent, newcomer
    finally:
        await n.close()


async def test_one_failed_ping_does_not_evict_max_failures_do(
    open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    """With k=1, a newcomer to the silent contact's bucket makes the node ping it (the
    bucket head); each unanswered ping is one failure, and only the third evicts it."""
    async with _full_far_bucket(open_peer) as (n, silent, newcomer):
        failures = Failures(n, silent.addr)
        for round_ in range(1, n.config.max_failures + 1):
            await _newcomer_asks(n, newcomer)
            head_ping, _ = await silent.next_message()  # the node checks the bucket head
            assert isinstance(head_ping, codec.Request) and head_ping.name == "ds_ping"
            # The node's own bookkeeping runs before the failure is reported.
            assert isinstance(await asyncio.wait_for(failures.next(), WAIT), RpcTimeout)
            c = n.table.get(silent.id)
            if round_ < n.config.max_failures:
                assert c is not None and c.failures == round_, "one lost reply must not evict"
                assert n.table.get(newcomer.id) is None
            else:
                assert c is None
                assert n.table.get(newcomer.id) is not None  # the newcomer took its place
        assert n.stats["rpc-timeout"] == n.config.max_failures
        assert loop_errors == []


async def test_one_outstanding_ping_per_bucket_head(
    open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    """Every request from a contact waiting for a full bucket's place names the head to
    ping; however many arrive, the head has one ping in flight (it was one per request)."""
    async with _full_far_bucket(open_peer) as (n, silent, newcomer):
        failures = Failures(n, silent.addr)
        for _ in range(5):
            await _newcomer_asks(n, newcomer)
        # Each reply was sent after the node decided about the head: all decisions are made.
        assert n.outstanding(silent.addr) == 1
        head_ping, _ = await silent.next_message()
        assert isinstance(head_ping, codec.Request) and head_ping.name == "ds_ping"
        assert isinstance(await asyncio.wait_for(failures.next(), WAIT), RpcTimeout)
        # Once that ping is over, the next newcomer request may ping the head again.
        await _newcomer_asks(n, newcomer)
        assert n.outstanding(silent.addr) == 1
        assert loop_errors == []


async def test_lookups_count_a_silent_contact_and_evict_it_only_after_max_failures(
    open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    """A lookup stops waiting for a silent peer at the soft timeout, but its RPC runs on
    through the retries; when it fails, that is one failure, and only the last evicts."""
    n = DhtNode(os.urandom(20), FAST)
    await n.listen_udp()
    try:
        silent = await open_peer()
        await _learn(n, silent)
        failures = Failures(n, silent.addr)
        for round_ in range(1, FAST.max_failures + 1):
            res = await asyncio.wait_for(n.find_nodes(os.urandom(20)), WAIT)
            assert res.closest == []
            # The unanswered RPC outlives the lookup: wait for it to fail (the node's own
            # callback, registered first, has run when this await returns).
            for _ in range(n.outstanding(silent.addr)):
                assert isinstance(await asyncio.wait_for(failures.next(), WAIT), RpcTimeout)
            c = n.table.get(silent.id)
            if round_ < FAST.max_failures:
                assert c is not None and c.failures == round_, "one lost reply must not evict"
            else:
                assert c is None
        assert n.stats["rpc-timeout"] == FAST.max_failures
        assert loop_errors == []
    finally:
        await n.close()


async def test_rpc_timeout_is_typed_and_names_its_target(
    open_peer: Callable[[], Awaitable[RawPeer]],
) -> None:
    n = DhtNode(os.urandom(20), NodeConfig(rpc_timeout=0.05, rpc_retries=1))
    await n.listen_udp()
    try:
        peer = await open_peer()
        with pytest.raises(RpcTimeout) as info:
            await asyncio.wait_for(n.ping(peer.addr), WAIT)
        assert info.value.addr == peer.addr
        assert n.outstanding() == 0
    finally:
        await n.close()


async def test_a_forged_id_does_not_redirect_a_contact(
    node: DhtNode, open_peer: Callable[[], Awaitable[RawPeer]], loop_errors: list[dict[str, Any]]
) -> None:
    """A request claiming a known contact's ID from another address leaves the contact
    where it is; the node checks the known address with a ping instead."""
    peer, impostor = await open_peer(), await open_peer()
    await _learn(node, peer)
    assert node.address is not None
    await impostor.call(node.address, "ds_ping", [NET, peer.id, 0])
    check, _ = await peer.next_message()
    assert isinstance(check, codec.Request) and check.name == "ds_ping"
    await impostor.call(node.address, "ping", [peer.id])
    c = node.table.get(peer.id)
    assert c is not None and c.addr == peer.addr
    assert loop_errors == []


def test_a_stock_request_claiming_a_known_id_does_not_refresh_it() -> None:
    """It used to: anyone could keep a dead contact in every table by naming its ID.
    Now the known contact is handed back to be pinged, as for our own RPCs."""
    own, victim = os.urandom(20), os.urandom(20)
    table = RoutingTable(own, max_failures=3)
    table.add_contact(Contact(victim, "10.0.0.1", 4000), now=1.0)
    table.failed(victim)
    table.failed(victim)
    lim = StorageLimits()
    handler = RequestHandler(
        own, NET, table, RecordStore(lim), LegacyStore(lim), Subscriptions(lim), time.time
    )
    out = handler.handle(codec.Request(os.urandom(20), "ping", [victim]), ("10.6.6.6", 666), 50.0)
    assert out.reply == own  # it is answered, as a stock node would be
    c = table.get(victim)
    assert c is not None
    assert (c.failures, c.last_seen) == (2, 1.0)
    assert out.ping is c


def test_rate_limiter_keeps_only_sources_it_is_limiting() -> None:
    """A refilled token bucket carries no information (a new source starts full), so the
    table holds sources under pressure, not every address ever seen; a flooding source
    stays limited however many others come and go."""
    cfg = dataclasses.replace(FAST, rate_per_source=10.0, rate_burst=5.0)
    rate = DhtNode(os.urandom(20), cfg).core.rate  # the node's own limiter
    flooder = ("10.0.0.1", 1)
    now = 100.0
    admitted = sum(rate.admit(flooder, now) for _ in range(20))
    assert admitted == 5 and not rate.admit(flooder, now)
    # Cycling ports does not help: the bucket is the host's.
    assert not any(rate.admit(("10.0.0.1", port), now) for port in range(2, 2000))
    for i in range(1000):  # one request each from many hosts, 1 s apart
        now += 1.0
        assert rate.admit((f"10.1.{i // 200}.{i % 200 + 1}", 1000 + i), now)
        assert len(rate) <= 4  # hosts and prefixes being limited
    # The flooder's entry went once it refilled; flooding again hits the burst again.
    assert sum(rate.admit(flooder, now) for _ in range(20)) == 5
    # Within a burst of new sources nothing is refilled yet, so all are kept...
    for i in range(50):
        rate.admit((f"10.2.0.{i}", i), now)
        rate.admit((f"10.2.0.{i}", i), now)
    assert len(rate) >= 50
    # ... until the maintenance round drops the refilled ones: the flooder, still
    # limited at that moment, stays.
    rate.admit(flooder, now + 0.45)
    rate.prune(now + 0.5)
    assert rate.sources() == [flooder[0]]  # hosts, not ports


class _Recorder(asyncio.DatagramTransport):
    """A transport that records when each datagram was sent (virtual time)."""

    def __init__(self) -> None:
        super().__init__({"sockname": ("10.9.9.9", 9)})
        self.sent: list[tuple[float, bytes]] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((asyncio.get_running_loop().time(), bytes(data)))

    def close(self) -> None:
        pass


def test_each_try_of_each_rpc_is_resent_on_time() -> None:
    """First tries share one timer (they all wait ``rpc_timeout``), later tries have
    their own: on a virtual clock every resend happens exactly when it used to."""
    cfg = NodeConfig(rpc_timeout=0.4, rpc_retries=2)

    async def main() -> tuple[list[tuple[float, bytes]], list[float], int]:
        node = DhtNode(os.urandom(20), cfg)
        rec = _Recorder()
        node.connection_made(rec)
        loop = asyncio.get_running_loop()
        futs = []
        for i in range(3):  # sent at 0.0, 0.1, 0.2; the second is answered at 0.15
            futs.append(node.request(("10.0.0.1", 1000 + i), "ds_ping", node.ds_args()))
            if i == 1:
                await asyncio.sleep(0.05)
                msg_id = rec.sent[-1][1][1:21]
                node.datagram_received(codec.encode_response(msg_id, 1), ("10.0.0.1", 1001))
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(0.1)
        failed_at: list[float] = []
        for f in (futs[0], futs[2]):
            with pytest.raises(RpcTimeout):
                await f
            failed_at.append(loop.time())
        assert await futs[1] == 1
        await node.close()
        return rec.sent, failed_at, node.stats["rpc-retry"]

    sent, failed_at, retries = virtual_time.run(main())
    times = [round(t, 6) for t, _ in sent]
    # Tries at +0, +0.4, +0.4+0.8 for the first and third RPCs; the second answered.
    assert times == [0.0, 0.1, 0.2, 0.4, 0.6, 1.2, 1.4]
    assert [round(t, 6) for t in failed_at] == [2.4, 2.6]  # + 1.2 after the last try
    assert retries == 4


def test_retries_and_timeouts_on_uvloop() -> None:
    """The same on uvloop, whose timers have millisecond resolution (a timer due in under
    half a millisecond runs at once): every try is sent, then the RPC fails, typed."""
    uvloop = pytest.importorskip("uvloop")
    cfg = NodeConfig(rpc_timeout=0.02, rpc_retries=2)

    async def main() -> tuple[int, int, int]:
        node = DhtNode(os.urandom(20), cfg)
        await node.listen_udp()
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        silent.setblocking(False)
        try:
            addr = silent.getsockname()
            futs = [node.request(addr, "ds_ping", node.ds_args()) for _ in range(5)]
            results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), WAIT)
            assert all(isinstance(r, RpcTimeout) for r in results)
            received = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    silent.recv(2048)
                    received += 1
            return received, node.stats["rpc-retry"], node.stats["rpc-timeout"]
        finally:
            silent.close()
            await node.close()

    received, retries, timeouts = uvloop.run(main())
    assert (received, retries, timeouts) == (15, 10, 5)
