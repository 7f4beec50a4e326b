"""Well-formed abuse on real UDP sockets (issue 10): floods that must not lock honest
users out, and replies that must not go to addresses that never asked.

Distinct 127.x.y.z source addresses stand for distinct hosts (Linux routes the whole of
127.0.0.0/8 to loopback): 127.a.b.c and 127.a.b.d are two hosts of one /24 prefix,
127.a.b.c and 127.a.e.c two prefixes. Each attack is scaled down from the bench figures
(``bench/fuzz.py``, ``bench/sybil.py``, the README's "Limits per host and prefix") and
asserts the bound, not a timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import StartDht, StartPeer

from dhtsignal.aio.node import DhtNode, ignore_outcome
from dhtsignal.dht import records
from dhtsignal.dht.params import DEFAULT_NETWORK, NodeConfig
from dhtsignal.dht.records import Record, RecordType, node_key
from dhtsignal.dht.rpc import FLAG_CLIENT
from dhtsignal.dht.storage import StorageLimits
from dhtsignal.identity import Identity
from dhtsignal.peer import PeerEvent, SignalSent
from dhtsignal.presence import Presence, resolve
from dhtsignal.signaling import sdp
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.inbox import ChannelOptions, Inbox
from dhtsignal.testing import fuzz
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

NET = DEFAULT_NETWORK
WAIT = 5.0  # generous bound on any one reply over loopback


class Host(asyncio.DatagramProtocol):
    """One UDP socket on a chosen loopback address; answers ``ds_notify`` if ``acks``."""

    def __init__(self, acks: bool = False) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.inbox: asyncio.Queue[tuple[bytes, Addr]] = asyncio.Queue()
        self.id = os.urandom(20)
        self.acks = acks
        self.received = 0
        self.bytes = 0
        self.notified: list[bytes] = []
        self.got_notify = asyncio.Event()
        #: the node pinged us to validate our address, and we answered (issue 10)
        self.pinged = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        self.bytes += len(data)
        src = (addr[0], addr[1])
        try:
            msg = codec.decode(data)
        except codec.MalformedDatagram:
            return
        if isinstance(msg, codec.Request) and msg.name == "ds_ping":
            # A host that asked answers the ping validating its address.
            self.send(b"\x01" + msg.msg_id + codec.pack([self.id, list(src)]), src)
            self.pinged.set()
        if isinstance(msg, codec.Request) and msg.name == "ds_notify":
            self.notified.extend(r for r in msg.args[4] if type(r) is bytes)
            self.got_notify.set()
            if self.acks:
                self.send(b"\x01" + msg.msg_id + codec.pack(True), src)
            return
        self.inbox.put_nowait((data, src))

    @property
    def addr(self) -> Addr:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (host, port)

    def send(self, data: bytes, dst: Addr) -> None:
        assert self.transport is not None
        self.transport.sendto(data, dst)

    def request(self, dst: Addr, name: str, *rest: Any) -> bytes:
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        self.send(codec.encode_request(msg_id, name, [NET, self.id, FLAG_CLIENT, *rest]), dst)
        return msg_id

    async def call(self, dst: Addr, name: str, *rest: Any) -> Any:
        """Send a request and wait for its response (other datagrams are dropped)."""
        msg_id = self.request(dst, name, *rest)
        while True:
            data, _ = await asyncio.wait_for(self.inbox.get(), WAIT)
            msg = codec.decode(data)
            if isinstance(msg, codec.Response) and msg.msg_id == msg_id:
                return msg.result


Bind = Callable[..., Awaitable[Host]]


@pytest.fixture
async def bind() -> AsyncIterator[Bind]:
    """Opens :class:`Host` sockets on given loopback addresses; closes them all after."""
    opened: list[Host] = []

    async def make(ip: str, acks: bool = False) -> Host:
        loop = asyncio.get_running_loop()
        _, h = await loop.create_datagram_endpoint(lambda: Host(acks), local_addr=(ip, 0))
        opened.append(h)
        return h

    try:
        yield make
    finally:
        for h in opened:
            assert h.transport is not None
            h.transport.close()


@pytest.fixture
async def target() -> AsyncIterator[Callable[[NodeConfig], Awaitable[DhtNode]]]:
    """The node under attack, on 127.0.0.1, closed after the test."""
    started: list[DhtNode] = []

    async def start(cfg: NodeConfig) -> DhtNode:
        n = DhtNode(os.urandom(20), cfg)
        started.append(n)
        await n.listen_udp("127.0.0.1", 0)
        return n

    try:
        yield start
    finally:
        for n in started:
            await n.close()


def _data(who: Identity, name: str, seq: int = 1, payload: bytes = b"v") -> Record:
    return records.sign(
        who, RecordType.DATA, records.data_key(name), payload, seq=seq, expires=time.time() + 600
    )


async def _validated(h: Host, target: Addr) -> None:
    """Have the target validate ``h``'s address (it pings it; ``h`` answers): only then
    does it grant ``h`` a subscription (issue 10 item 1)."""
    await h.call(target, "ds_ping")
    await asyncio.wait_for(h.pinged.wait(), WAIT)
    await h.call(target, "ds_ping")  # the answer was handled before this


async def _flood(h: Host, target: Addr, name: str, args: list[list[Any]]) -> None:
    """Send one request per ``args`` from ``h`` in rounds of 50, each ended by a barrier
    (so the target's socket buffer never overflows: every request is handled)."""
    await _validated(h, target)
    for i in range(0, len(args), 50):
        for rest in args[i : i + 50]:
            h.request(target, name, *rest)
        await h.call(target, "ds_ping")


# -- listen flood -----------------------------------------------------------------------


async def test_a_listen_flood_from_many_ports_of_one_host_is_capped_per_host(
    bind: Bind, target: Callable[[NodeConfig], Awaitable[DhtNode]]
) -> None:
    """64 ports of 127.0.5.1 ask 25 subscriptions each (1,600, within the host's rate
    burst; the bench sends 350,000 from 4,000 ports): the host holds at most
    ``max_listens_per_source``, however many ports it uses, and an honest listen from
    another host is still granted."""
    limits = StorageLimits(max_listens_per_source=100, max_listens=1_000)
    node = await target(NodeConfig(limits=limits))
    assert node.address is not None
    flood = [await bind("127.0.5.1") for _ in range(64)]
    for i, h in enumerate(flood):
        keys = [[records.data_key(f"f{i}-{j}"), 60] for j in range(25)]
        await _flood(h, node.address, "ds_listen", keys)
    subs = node.core.subs
    assert len(subs) == 100
    assert node.stats["refused:listen-full"] == 1_600 - 100
    honest = await bind("127.0.6.1")
    await _validated(honest, node.address)
    granted = await honest.call(node.address, "ds_listen", records.data_key("honest"), 60)
    assert type(granted) in (int, float) and granted > 0


async def test_subscriptions_are_capped_in_total_and_per_prefix(
    bind: Bind, target: Callable[[NodeConfig], Awaitable[DhtNode]]
) -> None:
    """Many hosts of one /24 (127.0.7.0/24) together hold at most
    ``max_listens_per_prefix``; all prefixes together at most ``max_listens``, and
    when full, a light prefix's newcomer evicts from the heaviest prefix."""
    limits = StorageLimits(max_listens_per_source=20, max_listens_per_prefix=50, max_listens=80)
    node = await target(NodeConfig(limits=limits))
    assert node.address is not None
    one_prefix = [await bind(f"127.0.7.{i}") for i in range(1, 9)]  # 8 hosts x 20 = 160
    for h in one_prefix:
        keys = [[records.data_key(f"{h.addr}-{j}"), 60] for j in range(20)]
        await _flood(h, node.address, "ds_listen", keys)
    assert len(node.core.subs) == 50
    others = [await bind(f"127.0.{8 + i}.1") for i in range(4)]  # 4 prefixes x 20 = 80
    for h in others:
        keys = [[records.data_key(f"{h.addr}-{j}"), 60] for j in range(20)]
        await _flood(h, node.address, "ds_listen", keys)
    # Full at 80: each newcomer from a lighter prefix took the place of the heaviest
    # prefix's oldest subscription, so the early /24 no longer holds most of them.
    subs = node.core.subs
    assert len(subs) == 80 and subs.evicted >= 30
    assert max(subs._per_prefix.values()) - min(subs._per_prefix.values()) <= 2
    late = await bind("127.0.20.1")
    await _validated(late, node.address)
    granted = await late.call(node.address, "ds_listen", records.data_key("late"), 60)
    assert type(granted) in (int, float) and len(subs) == 80


# -- store flood ------------------------------------------------------------------------


async def test_a_store_flood_from_one_prefix_leaves_room_for_another_prefix(
    bind: Bind, target: Callable[[NodeConfig], Awaitable[DhtNode]]
) -> None:
    """Four hosts of 127.0.30.0/24 fill the store (``max_keys`` keys) with valid records:
    the prefix's next new key is refused ``store-full``, but an honest new key from
    another prefix is stored on the same node (the flood's oldest record makes room)."""
    limits = StorageLimits(max_keys=120, max_records_per_prefix=10_000)
    node = await target(NodeConfig(limits=limits))
    assert node.address is not None
    flood = [await bind(f"127.0.30.{i}") for i in range(1, 5)]
    who = Identity.generate()
    results: list[Any] = []
    n = 0
    for _ in range(10):
        for h in flood:
            batch = [_data(who, f"junk-{n + i}").raw for i in range(4)]
            n += 4
            results.append(await h.call(node.address, "ds_store", batch))
    flat = [r for rs in results for r in rs]
    assert flat.count("ok") == 120 and flat.count("store-full") == n - 120
    assert len(list(node.core.store.keys())) == 120
    honest = await bind("127.0.31.1")
    rec = _data(Identity.generate(), "honest-new-key")
    assert await honest.call(node.address, "ds_store", [rec.raw]) == ["ok"]
    assert rec.raw in [r.raw for r in node.core.store.get(rec.key, time.time())]
    assert len(list(node.core.store.keys())) == 120  # still within the bound
    assert node.core.store.evicted == 1


async def test_store_quotas_count_hosts_not_ports(
    bind: Bind, target: Callable[[NodeConfig], Awaitable[DhtNode]]
) -> None:
    """32 ports of one host share its quota (``max_records_per_source``)."""
    node = await target(NodeConfig(limits=StorageLimits(max_records_per_source=10)))
    assert node.address is not None
    who = Identity.generate()
    ports = [await bind("127.0.32.1") for _ in range(32)]
    replies = [
        await h.call(node.address, "ds_store", [_data(who, f"q{i}").raw])
        for i, h in enumerate(ports)
    ]
    assert [r[0] for r in replies].count("ok") == 10
    assert [r[0] for r in replies].count("quota") == 22


# -- notify flood -----------------------------------------------------------------------


async def test_honest_pushes_keep_flowing_during_a_notify_flood(
    bind: Bind, target: Callable[[NodeConfig], Awaitable[DhtNode]]
) -> None:
    """63 silent listeners on two hosts of one /24 subscribe to a key, and an attacker
    stores a new version every time: each version is a push to every listener, which
    never answer, so without bounds the pending table fills and pushes are skipped.
    An honest listener elsewhere still receives every honest record while it lasts."""
    cfg = NodeConfig(max_inflight=256, inflight_reserve=64)
    node = await target(cfg)
    assert node.address is not None
    key_name = "busy"
    key = records.data_key(key_name)
    silent = [await bind(f"127.0.40.{1 + i % 2}") for i in range(63)]
    for h in silent:
        await _validated(h, node.address)
        assert type(await h.call(node.address, "ds_listen", key, 60)) in (int, float)
    listener = await bind("127.0.41.1", acks=True)
    await _validated(listener, node.address)
    assert type(await listener.call(node.address, "ds_listen", key, 60)) in (int, float)
    attacker, writer = await bind("127.0.42.1"), await bind("127.0.43.1")
    mallory, alice = Identity.generate(), Identity.generate()
    for seq in range(1, 41):  # 40 versions x 63 silent listeners, each retried
        assert await attacker.call(
            node.address, "ds_store", [_data(mallory, key_name, seq).raw]
        ) == ["ok"]
    assert node.stats["notify-skipped"] > 0  # the flood did hit the bounds
    assert node.core.outstanding() <= cfg.max_inflight
    for seq in range(1, 4):
        listener.got_notify.clear()
        rec = _data(alice, key_name, seq, b"honest")
        assert await writer.call(node.address, "ds_store", [rec.raw]) == ["ok"]
        await asyncio.wait_for(listener.got_notify.wait(), WAIT)
        assert rec.raw in listener.notified
    # The flood's pushes stay within the per-prefix share, not the whole table.
    assert node.core._pushes.in_flight <= cfg.max_pushes_per_prefix + cfg.max_pushes_per_host
    assert dataclasses.replace(cfg) == cfg


# -- offers naming victims --------------------------------------------------------------


def _offer_sdp(candidate: Addr) -> str:
    return sdp.Description(
        type="offer",
        mid="0",
        ufrag="abcd",
        pwd="a" * 22,
        fingerprint_algorithm="sha-256",
        fingerprint=bytes(range(32)),
        setup="actpass",
        sctp_port=5000,
        max_message_size=262144,
        candidates=(
            sdp.Candidate(
                "ab12", 1, "udp", 1, ipaddress.ip_address(candidate[0]), candidate[1], "host"
            ),
        ),
    ).render()


@pytest.fixture
async def boot(dht: StartDht) -> list[str]:
    nodes = await dht(3)
    assert nodes[0].address is not None
    host, port = nodes[0].address
    return [f"{host}:{port}"]


async def test_an_offer_naming_a_victim_sends_the_victim_nothing(
    bind: Bind, peers: StartPeer, boot: list[str]
) -> None:
    """A valid sealed offer from a throwaway key, pushed from 127.0.50.1, names a victim
    (127.0.51.1) as the caller's DHT addresses: the daemon answers (through the DHT)
    but pushes nothing to the victim. An offer pushed by the node it names gets its
    answer pushed straight back there."""
    answered: asyncio.Queue[SignalSent] = asyncio.Queue()

    def observe(event: PeerEvent) -> None:
        if isinstance(event, SignalSent) and event.msg_type is not MessageType.OFFER:
            answered.put_nowait(event)

    bob = await peers("bob", boot, observer=observe)
    assert bob.node.address is not None
    attacker, victim = await bind("127.0.50.1"), await bind("127.0.51.1")
    throwaway = Inbox(Identity.generate())
    for n in range(3):
        rec = throwaway.seal_offer(
            bob.identity.public_key,
            bob.identity.x25519_public,
            os.urandom(8),
            _offer_sdp(("127.0.50.2", 9)),
            label="",
            dht=[victim.addr, (victim.addr[0], victim.addr[1] + 1 + n)],
            channel=ChannelOptions(),
            now=time.time(),
        )
        assert await attacker.call(bob.node.address, "ds_notify", rec.key, [rec.raw]) is True
        await asyncio.wait_for(answered.get(), WAIT)
    # A barrier: bob's node pings the victim; anything bob's node sent it before arrives
    # first (one socket, loopback, in order).
    bob.node.request(victim.addr, "ds_ping", bob.node.ds_args()).add_done_callback(ignore_outcome)
    data, src = await asyncio.wait_for(victim.inbox.get(), WAIT)
    assert src == bob.node.address and codec.decode(data).name == "ds_ping"  # type: ignore[union-attr]
    assert victim.received == 1
    # The node that pushed the offer and is named in it gets the answer pushed back.
    rec = throwaway.seal_offer(
        bob.identity.public_key,
        bob.identity.x25519_public,
        os.urandom(8),
        _offer_sdp(("127.0.50.2", 9)),
        label="",
        dht=[attacker.addr],
        channel=ChannelOptions(),
        now=time.time(),
    )
    attacker.got_notify.clear()
    assert await attacker.call(bob.node.address, "ds_notify", rec.key, [rec.raw]) is True
    await asyncio.wait_for(answered.get(), WAIT)
    await asyncio.wait_for(attacker.got_notify.wait(), WAIT)


# -- one Sybil's refusal ----------------------------------------------------------------


async def test_one_sybil_id_taken_does_not_block_the_owners_first_claim(dht: StartDht) -> None:
    """A Sybil node joins right next to ``node_key("alice")`` holding mallory's claim
    (so it answers ``id-taken``) before alice ever claims: alice's first claim is
    stored all the same, and a reader resolves alice to her key."""
    key = node_key("alice")
    nodes = await dht(12)
    mallory, alice = Identity.generate(), Identity.generate()

    class Sybil(DhtNode):
        def __init__(self, _node_id: bytes, config: object = None) -> None:
            super().__init__(key[:-1] + bytes([key[-1] ^ 1]), config)  # type: ignore[arg-type]

    assert nodes[0].address is not None
    (sybil,) = await dht(1, node_class=Sybil, join=nodes[0].address)
    claim = records.sign(
        mallory,
        RecordType.CLAIM,
        key,
        codec.pack({"id": "alice", "t": 0.0}),
        seq=1,
        expires=time.time() + 3600,
    )
    assert sybil.core.store.put(claim, ("127.0.60.1", 1), time.time())
    await Presence(nodes[1], alice, "alice").publish()  # no NodeIdTaken
    info = await resolve(nodes[-1], "alice", None)
    assert info.public_key == alice.public_key
    assert {r.signer for r in sybil.store.get(key, sybil.wallclock())} == {mallory.public_key}


# -- fuzzing ----------------------------------------------------------------------------


async def test_a_short_fuzz_run_breaks_nothing() -> None:
    """The CI variant of ``bench/fuzz.py``: 3,000 mutated datagrams of every RPC from 64
    hosts; no traceback, every probe lookup finds contacts, every barrier answered."""
    result = await fuzz.run(3_000, seed=7)
    assert result.sent == 3_000
    assert result.tracebacks == 0
    assert result.lookups >= 3 and result.failed_lookups == 0
    assert result.barriers_lost == 0
    assert sum(result.drops.values()) > 1_000  # most of it was refused, by reason
