"""The simulated network: virtual time, and a 1,000-node DHT running the real node code.

:class:`~dhtsignal.testing.simnet.SimNetwork` drives the sans-I/O nodes directly (no
event loop); the network is built once per module (``sim`` fixture). The presence test
runs the real presence logic (:mod:`dhtsignal.signaling.presence`: the records to
publish, their refresh, the tombstones, and who owns a node ID) on a network of its own,
refreshing on the simulator's virtual clock.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.records import Record, RecordType, node_key
from dhtsignal.errors import DhtSignalError, PeerNotFound
from dhtsignal.identity import Identity
from dhtsignal.signaling.presence import PeerInfo, PresenceRecords, identify, node_addresses
from dhtsignal.testing import simnet
from dhtsignal.wire import codec

NODES = 1_000
KEYS = 100
SEED = 20240611
#: Virtual seconds any one test phase may take before the simulation gives up.
PHASE_LIMIT = 600.0


def _found(res_records: list[Record], node: Node, want: Record) -> bool:
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


def _put_batch(batch: list[Record]) -> Callable[[Node, float], int]:
    """What a node starts to put one batch of records."""
    return lambda n, now: n.start_put(batch, now)


@dataclass
class SimPeer:
    """A peer of the presence test: its DHT node and what it publishes."""

    node: Node
    records: PresenceRecords


def _publish(net: simnet.SimNetwork, peers: list[SimPeer], *, first: bool) -> int:
    """Every peer publishes at once, as :meth:`Presence.publish` does: one put per batch,
    the first (claim when due, presence under the label) must be stored. Runs until all
    puts ended; a failed first batch raises on the first publication (as
    :meth:`Presence.start` does) and is skipped later (the refresh loop logs it).

    :returns: how many peers' first batch failed.
    """
    pubs, ops = [], []
    for p in peers:
        addrs = node_addresses(p.node.address, p.node.observed)
        pub = p.records.publication(net.wallclock(), addrs)
        pubs.append(pub)
        ops.append([net.start(p.node, _put_batch(b)) for b in pub.batches])
    results = net.wait([op for each in ops for op in each])
    failed = 0
    at = 0
    for p, pub, each in zip(peers, pubs, ops, strict=True):
        head = results[at]
        at += len(each)
        if isinstance(head, BaseException):
            if first:
                raise head
            failed += 1
        else:
            p.records.published(pub)
    return failed


def _resolve_all(net: simnet.SimNetwork, peers: list[SimPeer]) -> list[PeerInfo | BaseException]:
    """Each node ID looked up from a random live node (50 at once) and identified, as
    :func:`resolve` does: a get of its node key, tombstones included, then
    :func:`identify`."""
    out: list[PeerInfo | BaseException] = []
    for start in range(0, len(peers), 50):
        chunk = peers[start : start + 50]
        ops = [
            net.start(
                net.random_node(),
                _get_held_of(node_key(p.records.node_id)),
            )
            for p in chunk
        ]
        for p, held in zip(chunk, net.wait(ops), strict=True):
            if isinstance(held, BaseException):
                out.append(held)
                continue
            try:
                out.append(identify(p.records.node_id, held, None, net.wallclock()))
            except DhtSignalError as exc:
                out.append(exc)
    return out


def _get_held_of(key: bytes) -> Callable[[Node, float], int]:
    """What a node starts to get ``key`` with tombstones (as :func:`resolve` does)."""
    return lambda n, now: n.start_get(key, now, include_tombstones=True)


@pytest.mark.slow
def test_presence_survives_ten_percent_crash_by_refreshing() -> None:
    """The real presence logic at scale: 100 peers claim their node IDs and publish
    presence (:class:`PresenceRecords`, 120 s records refreshed every 60 s after the
    previous publication ended); 10% of the other nodes crash; once every record from
    before the crash has expired, every node ID still resolves (:func:`identify`: claim,
    owner by storing-node majority, presence) to its peer's key from a random live node.
    Then SIGTERM's tombstones make each one offline."""
    net = simnet.SimNetwork.build(NODES, simnet.SimConfig(seed=SEED), time_limit=PHASE_LIMIT)
    try:
        _presence_phases(net)
    finally:
        net.close()


def _presence_phases(net: simnet.SimNetwork) -> None:
    rng = random.Random(SEED)
    publishers = rng.sample(net.live_nodes(), KEYS)
    peers = [
        SimPeer(
            node,
            PresenceRecords(
                Identity.generate(),
                f"peer-{i}",
                [f"room-{i % 10}"],
                ttl=120.0,
                claimed_at=net.wallclock(),
            ),
        )
        for i, node in enumerate(publishers)
    ]
    ttl = peers[0].records.ttl
    net.time_limit = net.now + PHASE_LIMIT
    _publish(net, peers, first=True)
    crashed = net.crash_random(0.10, spare=publishers)
    assert len(crashed) == NODES // 10
    dead_before = net.traffic.dead

    # Past the lifetime of everything published before the crash: what resolves now was
    # refreshed (at about 60 and 120 s) onto the storing nodes of the shrunken network.
    net.time_limit = net.now + PHASE_LIMIT
    check_at = net.now + ttl + 10
    refresh_failures = 0
    while (due := net.now + peers[0].records.refresh_interval) < check_at:
        net.run_for(due - net.now)
        refresh_failures += _publish(net, peers, first=False)
    net.run_for(check_at - net.now)
    infos = _resolve_all(net, peers)
    ok = [
        i
        for i, p in zip(infos, peers, strict=True)
        if isinstance(i, PeerInfo) and i.public_key == p.records.identity.public_key
    ]
    print(
        f"\nafter crashing {len(crashed)} of {NODES} nodes and {ttl + 10:.0f} s: "
        f"{len(ok)}/{KEYS} node IDs resolved to their peers "
        f"({refresh_failures} refreshes refused)"
    )
    assert len(ok) == KEYS, [i for i in infos if not isinstance(i, PeerInfo)][:3]
    assert net.traffic.dead > dead_before  # the crashed nodes were asked, and timed out

    net.time_limit = net.now + PHASE_LIMIT
    tombs = [(p, t) for p in peers for t in p.records.sign_off(net.wallclock())]
    net.wait([net.start(p.node, _put_batch([t])) for p, t in tombs])  # failures: logged
    gone = _resolve_all(net, peers)
    offline = [g for g in gone if isinstance(g, PeerNotFound) and "signed off" in str(g)]
    assert len(offline) == KEYS, [g for g in gone if g not in offline][:3]
