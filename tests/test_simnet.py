"""The simulated network: virtual time, and a 1,000-node DHT running the real node code.

:class:`~dhtsignal.testing.simnet.SimNetwork` drives the sans-I/O nodes directly (no
event loop); the network is built once per module (``sim`` fixture). The presence test
runs the real, asyncio-based :mod:`dhtsignal.presence` on
:class:`~dhtsignal.testing.simnet.LoopSimNetwork` (a virtual-time event loop), because
that code sleeps and gathers through asyncio itself.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.errors import PeerNotFound
from dhtsignal.identity import Identity
from dhtsignal.presence import PeerInfo, Presence, resolve
from dhtsignal.testing import simnet
from dhtsignal.wire import codec

NODES = 1_000
KEYS = 100
SEED = 20240611
#: Virtual seconds any one test phase may take before the loop gives up.
PHASE_LIMIT = 600.0

T = TypeVar("T")


def _found(res_records: list[Record], node: DhtNode | Node, want: Record) -> bool:
    """Whether a lookup (plus the asking node's own store, as ``get`` merges) has ``want``."""
    held = node.store.get(want.key, node.wallclock())
    return any(r.raw == want.raw for r in [*res_records, *held])


def _lookup_of(key: bytes) -> Callable[[Node, float], int]:
    """What a node starts to look ``key`` up (as ``get`` does: 8 closest, values wanted)."""
    return lambda n, now: n.start_lookup(key, now, k=8, want_value=True)


def _put_of(rec: Record) -> Callable[[Node, float], int]:
    """What a node starts to put ``rec``."""
    return lambda n, now: n.start_put([rec], now)


def _gets(net: simnet.SimNetwork, wanted: list[Record], batch: int = 50) -> list[int | None]:
    """Look each record up from a random live node; hop count per lookup, None if not found."""
    hops: list[int | None] = []
    for start in range(0, len(wanted), batch):
        chunk = wanted[start : start + batch]
        askers = [net.random_node() for _ in chunk]
        ops = [net.start(a, _lookup_of(w.key)) for a, w in zip(askers, chunk, strict=True)]
        results = net.wait(ops)
        for asker, want, res in zip(askers, chunk, results, strict=True):
            hops.append(res.hops if _found(res.records, asker, want) else None)
    return hops


@dataclass
class Sim:
    net: simnet.SimNetwork
    values: list[Record]
    build_seconds: float


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    started = time.monotonic()
    net = simnet.SimNetwork.build(NODES, simnet.SimConfig(seed=SEED))
    ident = Identity.generate()
    values = [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"value-{i}"),
            codec.pack({"n": i}),
            seq=1,
            expires=net.wallclock() + 3600,
        )
        for i in range(KEYS)
    ]
    net.time_limit = net.now + PHASE_LIMIT
    ops = [net.start(net.random_node(), _put_of(v)) for v in values]
    assert all(not isinstance(r, BaseException) for r in net.wait(ops))
    yield Sim(net, values, time.monotonic() - started)
    net.close()


def test_sleep_takes_no_real_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(1000)
        return loop.time() - before

    started = time.monotonic()
    advanced = simnet.run(main())
    assert time.monotonic() - started < 1.0
    assert advanced == pytest.approx(1000.0)


def test_stall_is_an_error_not_a_hang() -> None:
    async def never() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(simnet.SimulationStalled):
        simnet.run(never())


def test_time_limit_stops_runaway_simulation() -> None:
    async def forever() -> None:
        for _ in range(10**9):
            await asyncio.sleep(60)

    with pytest.raises(simnet.SimulationStalled, match="limit"):
        simnet.run(forever(), time_limit=3600.0)


def test_sans_io_network_time_is_virtual() -> None:
    """The sans-I/O network's clock jumps from one event to the next: an hour of an idle
    network (maintenance timers firing) takes no real time to speak of."""
    net = simnet.SimNetwork.build(20, simnet.SimConfig(seed=3))
    started, before = time.monotonic(), net.now
    net.run_for(3600)
    assert net.now - before == pytest.approx(3600.0)
    assert time.monotonic() - started < 5.0


def test_sans_io_network_stall_and_time_limit_are_errors() -> None:
    """Waiting for an operation that cannot end (its node crashed) is an error, not a
    hang: by the time limit, or by the wait's own timeout."""
    net = simnet.SimNetwork.build(10, simnet.SimConfig(seed=4))
    node = net.nodes[3]
    op = net.start(node, lambda n, now: n.start_lookup(n.id, now))
    net.crash(node)
    with pytest.raises(simnet.SimulationStalled):
        net.wait([op], timeout=60.0)
    net.time_limit = net.now + 30.0
    with pytest.raises(simnet.SimulationStalled, match="limit"):
        net.wait([op])


def test_latency_is_symmetric_fixed_and_in_range() -> None:
    net = simnet.SimNetwork(simnet.SimConfig(seed=7, latency=(0.01, 0.02)))
    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.randrange(10_000), rng.randrange(10_000)
        d = net.latency(a, b)
        assert 0.01 <= d <= 0.02
        assert d == net.latency(b, a)


def _small_run(seed: int, loss: float) -> tuple[int, list[int | None], simnet.Traffic]:
    """A 100-node network: put 20 values, get each once; (virtual ms, hops, traffic)."""
    net = simnet.SimNetwork.build(100, simnet.SimConfig(seed=seed, loss=loss))
    net.time_limit = PHASE_LIMIT
    ident = Identity(bytes(32))  # fixed key: records are the same bytes in every run
    values = [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"small-{i}"),
            b"",
            seq=1,
            expires=net.wallclock() + 600,
        )
        for i in range(20)
    ]
    for v in values:
        net.put(net.nodes[0], [v])
    hops = _gets(net, values, batch=5)
    elapsed = round(net.now * 1000)
    net.close()
    return elapsed, hops, net.traffic


def test_same_seed_same_run() -> None:
    first, second = _small_run(5, 0.0), _small_run(5, 0.0)
    assert first == second
    # Everything sent was delivered, but for what was still in flight at the end.
    assert first[2].delivered > 0
    assert first[2].sent == first[2].delivered + first[2].dead


def test_lossy_network_still_finds_values() -> None:
    _, hops, traffic = _small_run(6, 0.05)
    assert traffic.lost > 0
    assert None not in hops


def test_bootstrap_over_slow_links() -> None:
    # One-way 200 ms: every round trip (400 ms) outlasts the soft peer timeout.
    net = simnet.SimNetwork.build(100, simnet.SimConfig(seed=2, latency=(0.2, 0.2)))
    net.time_limit = PHASE_LIMIT
    node = net.add_node()
    assert net.nodes[0].address is not None
    size = net.bootstrap(node, [net.nodes[0].address])
    res = net.find_nodes(node, node.id)
    net.close()
    assert size > 1
    assert len(res.closest) == 20


@pytest.mark.slow
def test_every_get_finds_its_value_in_few_hops(sim: Sim) -> None:
    net = sim.net
    assert net.join_failures == 0
    net.time_limit = net.now + PHASE_LIMIT
    hops = _gets(net, sim.values)
    found = [h for h in hops if h is not None]
    hist = dict(sorted(Counter(found).items()))
    print(
        f"\n{NODES} nodes built in {sim.build_seconds:.1f} s real; "
        f"{len(found)}/{len(hops)} gets found their value; hops median "
        f"{statistics.median(found) if found else '-'}, histogram {hist}"
    )
    assert len(found) == len(hops) == KEYS
    assert statistics.median(found) <= 4
    assert max(found) <= 8


@dataclass
class LoopSim:
    runner: simnet.SimRunner
    net: simnet.LoopSimNetwork

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one phase on the shared loop, bounded in virtual time."""
        loop = self.runner.get_loop()
        loop.time_limit = loop.time() + PHASE_LIMIT
        return self.runner.run(coro)


@pytest.mark.slow
def test_presence_survives_ten_percent_crash_by_refreshing() -> None:
    """The real presence code at scale: 100 peers claim their node IDs and publish
    presence (:class:`Presence`, 120 s records refreshed every 60 s); 10% of the other
    nodes crash; once every record from before the crash has expired, every node ID still
    resolves (:func:`resolve`: claim, owner by storing-node majority, presence) to its
    peer's key from a random live node. Then SIGTERM's tombstones make each one offline."""
    with simnet.runner(time_limit=PHASE_LIMIT) as runner:

        async def build() -> simnet.LoopSimNetwork:
            return await simnet.LoopSimNetwork.build(NODES, simnet.SimConfig(seed=SEED))

        sim = LoopSim(runner, runner.run(build()))
        try:
            _presence_phases(sim)
        finally:
            sim.run(sim.net.close())


def _presence_phases(sim: LoopSim) -> None:
    net = sim.net
    rng = random.Random(SEED)
    publishers = rng.sample(net.live_nodes(), KEYS)
    peers = [
        Presence(node, Identity.generate(), f"peer-{i}", [f"room-{i % 10}"], ttl=120.0)
        for i, node in enumerate(publishers)
    ]

    async def each(method: str) -> None:
        await asyncio.gather(*(getattr(p, method)() for p in peers))

    sim.run(each("start"))
    crashed = net.crash_random(0.10, spare=publishers)
    assert len(crashed) == NODES // 10
    dead_before = net.traffic.dead

    async def resolve_all() -> list[PeerInfo | BaseException]:
        out: list[PeerInfo | BaseException] = []
        for start in range(0, KEYS, 50):
            out += await asyncio.gather(
                *(resolve(net.random_node(), p.node_id) for p in peers[start : start + 50]),
                return_exceptions=True,
            )
        return out

    async def after_expiry() -> list[PeerInfo | BaseException]:
        # Past the lifetime of everything published before the crash: what resolves now
        # was refreshed (at 60 and 120 s) onto the storing nodes of the shrunken network.
        await asyncio.sleep(peers[0].ttl + 10)
        return await resolve_all()

    infos = sim.run(after_expiry())
    ok = [
        i
        for i, p in zip(infos, peers, strict=True)
        if isinstance(i, PeerInfo) and i.public_key == p.identity.public_key
    ]
    print(
        f"\nafter crashing {len(crashed)} of {NODES} nodes and {peers[0].ttl + 10:.0f} s: "
        f"{len(ok)}/{KEYS} node IDs resolved to their peers"
    )
    assert len(ok) == KEYS, [i for i in infos if not isinstance(i, PeerInfo)][:3]
    assert net.traffic.dead > dead_before  # the crashed nodes were asked, and timed out

    sim.run(each("stop"))
    gone = sim.run(resolve_all())
    offline = [g for g in gone if isinstance(g, PeerNotFound) and "signed off" in str(g)]
    assert len(offline) == KEYS, [g for g in gone if g not in offline][:3]
