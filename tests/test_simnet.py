"""The simulated network: virtual time, and a 1,000-node DHT running the real node code.

The network is built once per module (``sim`` fixture) on one virtual-time loop,
kept across tests by a :class:`~dhtsignal.testing.simnet.SimRunner`; the crash test
runs last because it removes nodes.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.signaling.identity import Identity
from dhtsignal.testing import simnet
from dhtsignal.wire import codec

NODES = 1_000
KEYS = 100
SEED = 20240611
#: Virtual seconds any one test phase may take before the loop gives up.
PHASE_LIMIT = 600.0

T = TypeVar("T")


def _found(res_records: list[Record], node: DhtNode, want: Record) -> bool:
    """Whether a lookup (plus the asking node's own store, as ``get`` merges) has ``want``."""
    held = node.store.get(want.key, node.wallclock())
    return any(r.raw == want.raw for r in [*res_records, *held])


async def _gets(net: simnet.SimNetwork, wanted: list[Record], batch: int = 50) -> list[int | None]:
    """Look each record up from a random live node; hop count per lookup, None if not found."""
    hops: list[int | None] = []
    for start in range(0, len(wanted), batch):
        chunk = wanted[start : start + batch]
        askers = [net.random_node() for _ in chunk]
        results = await asyncio.gather(
            *(a.get_with_hops(w.key) for a, w in zip(askers, chunk, strict=True))
        )
        for asker, want, res in zip(askers, chunk, results, strict=True):
            hops.append(res.hops if _found(res.records, asker, want) else None)
    return hops


@dataclass
class Sim:
    runner: simnet.SimRunner
    net: simnet.SimNetwork
    values: list[Record]
    build_seconds: float

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one phase on the shared loop, bounded in virtual time."""
        loop = self.runner.get_loop()
        loop.time_limit = loop.time() + PHASE_LIMIT
        return self.runner.run(coro)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with simnet.runner(time_limit=PHASE_LIMIT) as runner:

        async def build() -> tuple[simnet.SimNetwork, list[Record]]:
            net = await simnet.SimNetwork.build(NODES, simnet.SimConfig(seed=SEED))
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
            await asyncio.gather(*(net.random_node().put([v]) for v in values))
            return net, values

        started = time.monotonic()
        net, values = runner.run(build())
        state = Sim(runner, net, values, time.monotonic() - started)
        yield state
        state.run(net.close())


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


def test_latency_is_symmetric_fixed_and_in_range() -> None:
    async def main() -> None:
        net = simnet.SimNetwork(simnet.SimConfig(seed=7, latency=(0.01, 0.02)))
        rng = random.Random(1)
        for _ in range(200):
            a, b = rng.randrange(10_000), rng.randrange(10_000)
            d = net.latency(a, b)
            assert 0.01 <= d <= 0.02
            assert d == net.latency(b, a)

    simnet.run(main())


def _small_run(seed: int, loss: float) -> tuple[int, list[int | None], simnet.Traffic]:
    """A 100-node network: put 20 values, get each once; (virtual ms, hops, traffic)."""

    async def main() -> tuple[int, list[int | None], simnet.Traffic]:
        net = await simnet.SimNetwork.build(100, simnet.SimConfig(seed=seed, loss=loss))
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
            await net.nodes[0].put([v])
        hops = await _gets(net, values, batch=5)
        elapsed = round(asyncio.get_running_loop().time() * 1000)
        await net.close()
        return elapsed, hops, net.traffic

    return simnet.run(main(), time_limit=PHASE_LIMIT)


def test_same_seed_same_run() -> None:
    first, second = _small_run(5, 0.0), _small_run(5, 0.0)
    assert first == second
    assert first[2].sent == first[2].delivered > 0


def test_lossy_network_still_finds_values() -> None:
    _, hops, traffic = _small_run(6, 0.05)
    assert traffic.lost > 0
    assert None not in hops


def test_bootstrap_over_slow_links() -> None:
    async def main() -> tuple[int, int]:
        # One-way 200 ms: every round trip (400 ms) outlasts the soft peer timeout.
        net = await simnet.SimNetwork.build(100, simnet.SimConfig(seed=2, latency=(0.2, 0.2)))
        node = net.add_node()
        assert net.nodes[0].address is not None
        size = await node.bootstrap([net.nodes[0].address])
        res = await node.find_nodes(node.id)
        await net.close()
        return size, len(res.closest)

    size, closest = simnet.run(main(), time_limit=PHASE_LIMIT)
    assert size > 1
    assert closest == 20


@pytest.mark.slow
def test_every_get_finds_its_value_in_few_hops(sim: Sim) -> None:
    net = sim.net
    assert net.join_failures == 0
    hops = sim.run(_gets(net, sim.values))
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


@pytest.mark.slow
def test_refreshed_presence_survives_ten_percent_crash(sim: Sim) -> None:
    net = sim.net
    rng = random.Random(SEED)
    publishers = rng.sample(net.live_nodes(), KEYS)
    idents = [Identity.generate() for _ in publishers]

    def presence(i: int, seq: int) -> Record:
        label = f"peer-{i}"
        return records.sign(
            idents[i],
            RecordType.PRESENCE,
            records.node_key(label),
            codec.pack({"id": label, "addr": f"127.0.0.{i}:4000"}),
            seq=seq,
            expires=net.wallclock() + 300,
        )

    async def publish(seq: int) -> list[Record]:
        recs = [presence(i, seq) for i in range(KEYS)]
        await asyncio.gather(*(p.put([r]) for p, r in zip(publishers, recs, strict=True)))
        return recs

    sim.run(publish(1))
    crashed = net.crash_random(0.10, spare=publishers)
    assert len(crashed) == NODES // 10

    async def refresh_later() -> list[Record]:
        # Half a presence lifetime later, one refresh period: each publisher puts again.
        await asyncio.sleep(150)
        return await publish(2)

    refreshed = sim.run(refresh_later())
    hops = sim.run(_gets(net, refreshed))
    found = [h for h in hops if h is not None]
    print(
        f"\nafter crashing {len(crashed)} of {NODES} nodes and one refresh: "
        f"{len(found)}/{len(hops)} presence gets found the refreshed record"
    )
    assert len(found) == KEYS
    assert net.traffic.dead > 0
