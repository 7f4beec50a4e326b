"""Mutated datagrams against a real node while a probe keeps looking things up.

Theory of operation
-------------------
:func:`run` starts a small network on loopback (a target node and ``helpers`` more, all
joined), a probe node joined through the target, and ``hosts`` fuzzing sockets spread
over 127.a.b.c addresses in several /24 prefixes (so per-host rate limits let most of
the traffic through to the handlers). It then sends ``count`` datagrams, each a valid
request of every kind (both RPC families, valid signed records included) mutated one
of several ways (bit flips, truncation, splicing, an argument replaced by random
msgpack, random bytes), in batches: after each batch a ping from a separate socket is
the barrier (datagrams reach one socket's queue in order on loopback), and the probe
runs one lookup of a random key, which must return contacts.

The result counts tracebacks (the target's ``drop:internal`` and whatever reached the
event loop's exception handler), failed probe lookups, datagrams sent and the target's
RSS growth. ``bench/fuzz.py`` runs 200,000 datagrams; ``tests/test_attacks.py`` a short
run.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.params import DEFAULT_NETWORK, NodeConfig
from dhtsignal.dht.records import RecordType
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

NET = DEFAULT_NETWORK


@dataclass
class FuzzResult:
    """What a fuzz run found."""

    sent: int = 0
    tracebacks: int = 0
    lookups: int = 0
    failed_lookups: int = 0
    barriers_lost: int = 0
    rss_growth: int = 0
    seconds: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)


class _Sock(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        fut = self.waiting.pop(data[1 : 1 + codec.MSG_ID_BYTES], None)
        if fut is not None and not fut.done():
            fut.set_result(None)


def _rss() -> int:
    """Resident set size now, bytes (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def corpus(rng: random.Random) -> list[bytes]:
    """Valid requests of every RPC, to mutate."""
    me = os.urandom(20)
    key = os.urandom(20)
    who = Identity.generate()
    now = time.time()
    recs = [
        records.sign(who, RecordType.DATA, key, b"payload", seq=1, expires=now + 600).raw,
        records.sign(
            who,
            RecordType.CLAIM,
            records.node_key("fuzz"),
            codec.pack({"id": "fuzz", "t": now}),
            seq=1,
            expires=now + 600,
        ).raw,
    ]
    ds = [NET, me, 0]
    reqs: list[tuple[str, list[Any]]] = [
        ("ds_ping", ds),
        ("ds_find_node", [*ds, key]),
        ("ds_find_value", [*ds, key, 0]),
        ("ds_store", [*ds, recs[:1]]),
        ("ds_store", [*ds, recs]),
        ("ds_store_find", [*ds, key, recs[:1]]),
        ("ds_listen", [*ds, key, 60]),
        ("ds_unlisten", [*ds, key]),
        ("ds_notify", [*ds, key, recs[:1]]),
        ("ping", [me]),
        ("stun", []),
        ("store", [me, key, b"value"]),
        ("find_node", [me, key]),
        ("find_value", [me, key]),
    ]
    return [codec.encode_request(os.urandom(codec.MSG_ID_BYTES), n, a) for n, a in reqs]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0:
        return rng.randrange(-(2**63), 2**64)
    if pick == 1:
        return rng.randbytes(rng.choice((0, 1, 19, 20, 21, 32, 64, 300)))
    if pick == 2:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(12)))
    if pick == 3:
        return rng.random() * 10 ** rng.randrange(-5, 300)
    if pick == 4:
        return rng.choice((None, True, False))
    if pick == 5:
        return rng.randrange(256)
    if pick == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if pick == 7:
        return {str(i): _random_value(rng, depth + 1) for i in range(rng.randrange(4))}
    return [NET, os.urandom(20), rng.randrange(4)]


def mutate(rng: random.Random, base: list[bytes]) -> bytes:
    """One hostile datagram made from a valid one."""
    data = bytearray(rng.choice(base))
    how = rng.randrange(7)
    if how == 0:  # bit flips
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == 1:  # truncation
        del data[rng.randrange(len(data)) :]
    elif how == 2:  # splice two datagrams
        other = rng.choice(base)
        data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other)) :]
    elif how == 3:  # an argument replaced by a random value
        try:
            msg = codec.decode(bytes(data))
        except codec.MalformedDatagram:
            return bytes(data)
        if isinstance(msg, codec.Request) and msg.args:
            args = list(msg.args)
            args[rng.randrange(len(args))] = _random_value(rng)
            try:
                return codec.encode_request(msg.msg_id, msg.name, args)[: codec.MAX_DATAGRAM]
            except Exception:
                return bytes(data)
    elif how == 4:  # bytes inserted
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randrange(1, 16))
    elif how == 5:  # random bytes
        return rng.randbytes(rng.randrange(0, 1400))
    else:  # a random RPC name with the same arguments
        try:
            msg = codec.decode(bytes(data))
        except codec.MalformedDatagram:
            return bytes(data)
        if isinstance(msg, codec.Request):
            name = rng.choice(("ds_" + rng.randbytes(3).hex(), "", "x" * 200, msg.name.upper()))
            return codec.encode_request(msg.msg_id, name, list(msg.args))[: codec.MAX_DATAGRAM]
    return bytes(data)


async def run(
    count: int,
    *,
    seed: int = 1,
    helpers: int = 6,
    hosts: int = 64,
    batch: int = 100,
    config: NodeConfig | None = None,
) -> FuzzResult:
    """Fuzz a real node with ``count`` mutated datagrams (see the module docstring).

    :param count: datagrams to send.
    :param seed: the mutation PRNG's seed (a run is reproducible but for keys and ids).
    :param helpers: more nodes in the network, so lookups have somewhere to go.
    :param hosts: fuzzing sockets, four hosts per /24 prefix.
    :param batch: datagrams between barriers.
    """
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    rng = random.Random(seed)
    nodes: list[DhtNode] = []
    socks: list[_Sock] = []
    result = FuzzResult()
    started = time.monotonic()
    try:
        target = DhtNode(os.urandom(20), config)
        nodes.append(target)
        addr: Addr = await target.listen_udp("127.0.0.1", 0)
        for i in range(helpers):
            helper = DhtNode(os.urandom(20), config)
            nodes.append(helper)
            await helper.listen_udp(f"127.0.80.{i + 1}", 0)
            await helper.bootstrap([addr])
        probe = DhtNode(os.urandom(20), config)
        nodes.append(probe)
        await probe.listen_udp("127.0.81.1", 0)
        await probe.bootstrap([addr])
        for i in range(hosts):
            _, s = await loop.create_datagram_endpoint(
                _Sock, local_addr=(f"127.0.{90 + i // 4}.{1 + i % 4}", 0)
            )
            socks.append(s)
        _, barrier = await loop.create_datagram_endpoint(_Sock, local_addr=("127.0.82.1", 0))
        socks.append(barrier)
        base = corpus(rng)
        rss0 = _rss()
        sent = 0
        while sent < count:
            m = min(batch, count - sent)
            for i in range(m):
                s = socks[(sent + i) % hosts]
                assert s.transport is not None
                s.transport.sendto(mutate(rng, base), addr)
            sent += m
            msg_id = os.urandom(codec.MSG_ID_BYTES)
            fut: asyncio.Future[None] = loop.create_future()
            barrier.waiting[msg_id] = fut
            assert barrier.transport is not None
            barrier.transport.sendto(
                codec.encode_request(msg_id, "ds_ping", [NET, os.urandom(20), 1]), addr
            )
            try:
                await asyncio.wait_for(fut, 5.0)
            except TimeoutError:
                result.barriers_lost += 1
                barrier.waiting.pop(msg_id, None)
            if sent % (batch * 10) == 0 or sent >= count:
                result.lookups += 1
                try:
                    res = await asyncio.wait_for(probe.find_nodes(os.urandom(20)), 10.0)
                    if not res.closest:
                        result.failed_lookups += 1
                except Exception:
                    result.failed_lookups += 1
        result.sent = sent
        result.rss_growth = _rss() - rss0
        stats = target.stats
        result.tracebacks = stats["drop:internal"] + len(errors)
        result.drops = {k: v for k, v in stats.items() if k.startswith(("drop:", "refused:"))}
    finally:
        for s in socks:
            if s.transport is not None:
                s.transport.close()
        for n in nodes:
            await n.close()
        loop.set_exception_handler(previous)
        result.seconds = time.monotonic() - started
    return result
