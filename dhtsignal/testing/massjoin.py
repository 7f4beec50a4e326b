"""A mass join on the simulated network: many nodes join through one seed at once, then
values are put and got from other nodes while the tables are still converging.

Theory of operation
-------------------
:func:`run_massjoin` builds a network of one seed node, then makes ``nodes`` fresh
nodes bootstrap through the seed all at once (each starting within ``stagger``
seconds, as processes starting their nodes together do). ``put_after`` seconds after
the last join ended, random nodes put ``values`` records (all at once); each value is
then got (``start_get``) by another random node, right away and again ``later``
seconds afterwards. The report counts the values found each time. This is the
simulated twin of ``bench/churn.py --mode massjoin`` (real processes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.identity import Identity
from dhtsignal.testing.simnet import SimConfig, SimNetwork


@dataclass(frozen=True)
class MassJoinConfig:
    """What joins and what is measured."""

    nodes: int = 300
    """Nodes joining at once (besides the seed)."""
    values: int = 300
    """Values put after the join."""
    stagger: float = 0.5
    """Seconds over which the joins start (uniformly)."""
    put_after: float = 2.0
    """Seconds after the last join ended at which the values are put."""
    later: float = 30.0
    """Seconds after the first round of gets at which the values are got again."""
    seed: int = 1
    """Seed of the simulator."""
    latency: tuple[float, float] = (0.005, 0.050)
    """One-way delay range, seconds (see :class:`SimConfig`)."""
    jitter: float = 0.0
    """Extra per-datagram delay, uniform in ``[0, jitter)`` (a busy host's queueing)."""
    node_config: NodeConfig = field(default_factory=NodeConfig)
    """Protocol parameters of every node."""


@dataclass
class MassJoinReport:
    """What a mass join measured."""

    joined: int = 0
    puts_ok: int = 0
    found_first: int = 0
    found_later: int = 0
    values: int = 0
    join_s: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    """Datagrams sent in each phase: join, settle (until the puts), put, get, later
    (the wait before the second gets, with the gets themselves)."""

    def summary(self) -> dict[str, Any]:
        """The figures as plain data."""
        return {
            "joined": self.joined,
            "values": self.values,
            "puts_ok": self.puts_ok,
            "found_right_after": self.found_first,
            "found_later": self.found_later,
            "join_s": round(self.join_s, 2),
            "drops": self.drops,
            "sent": self.sent,
        }


def _values(cfg: MassJoinConfig, wallclock: float) -> list[Record]:
    ident = Identity(bytes(32))
    return [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"mass-{cfg.seed}-{i}"),
            b"v",
            seq=1,
            expires=wallclock + 3600,
        )
        for i in range(cfg.values)
    ]


def run_massjoin(cfg: MassJoinConfig, *, time_limit: float = 3600.0) -> MassJoinReport:
    """Run one mass join (see the module's docstring).

    :param cfg: what joins and what is measured.
    :param time_limit: virtual seconds past which the simulation is declared stuck.
    :returns: what was measured.
    """
    net = SimNetwork(
        SimConfig(
            seed=cfg.seed, latency=cfg.latency, jitter=cfg.jitter, node_config=cfg.node_config
        ),
        time_limit=time_limit,
    )
    try:
        return _run(net, cfg)
    finally:
        net.close()


def _run(net: SimNetwork, cfg: MassJoinConfig) -> MassJoinReport:
    report = MassJoinReport(values=cfg.values)
    seed = net.add_node()
    net.joined.append(net.index_of(seed))
    assert seed.address is not None
    boot = seed.address
    fresh = [net.add_node() for _ in range(cfg.nodes)]
    starts = sorted((net.rng.random() * cfg.stagger, i) for i in range(len(fresh)))
    began = net.now
    mark = net.traffic.sent

    def phase(name: str) -> None:
        nonlocal mark
        report.sent[name] = net.traffic.sent - mark
        mark = net.traffic.sent

    ops = []
    for at, i in starts:
        if began + at > net.now:
            net.run_for(began + at - net.now)
        ops.append(net.start(fresh[i], lambda n, now: n.start_bootstrap([boot], now)))
    results = net.wait(ops)
    report.join_s = net.now - began

    phase("join")
    for op, size in zip(ops, results, strict=True):
        if isinstance(size, int) and size > 0:
            report.joined += 1
            net.joined.append(op.index)
    net.run_for(cfg.put_after)
    phase("settle")
    values = _values(cfg, net.wallclock())
    putters = [net.random_node() for _ in values]
    puts = [net.start(n, _putting(v)) for n, v in zip(putters, values, strict=True)]
    report.puts_ok = sum(not isinstance(r, BaseException) for r in net.wait(puts))
    phase("put")
    report.found_first = _gets(net, values, putters)
    phase("get")
    net.run_for(cfg.later)
    report.found_later = _gets(net, values, putters)
    phase("later")
    drops: dict[str, int] = {}
    for n in net.nodes:
        for name, count in n.stats.items():
            if name.startswith("drop:"):
                drops[name] = drops.get(name, 0) + count
    report.drops = drops
    return report


def _putting(v: Record) -> Callable[[Node, float], int]:
    return lambda node, now: node.start_put([v], now)


def _getting(key: bytes) -> Callable[[Node, float], int]:
    return lambda node, now: node.start_get(key, now)


def _gets(net: SimNetwork, values: list[Record], putters: list[Node]) -> int:
    ops = []
    for v, putter in zip(values, putters, strict=True):
        getter = net.random_node()
        while getter is putter:
            getter = net.random_node()
        ops.append(net.start(getter, _getting(v.key)))
    found = 0
    for v, res in zip(values, net.wait(ops), strict=True):
        if not isinstance(res, BaseException) and any(r.raw == v.raw for r in res.records):
            found += 1
    return found
