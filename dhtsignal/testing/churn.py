"""A churn model on the simulated network: sessions of random length, departures half
crashes and half clean leaves, each departed node replaced by a newcomer, lookups
throughout.

Theory of operation
-------------------
:func:`run_churn` drives a joined :class:`~dhtsignal.testing.simnet.SimNetwork` on its
virtual clock. Every node but the value owners has an exponentially distributed session
(the mean chosen so that ``replaced_per_hour`` of the nodes depart per hour); at the end
of its session a node crashes (``crash_share`` of departures) or leaves cleanly, and a
new node joins through a random live one. The owners put ``values`` records at the start
and republish them every ``republish`` seconds (as presence records are refreshed). At
evenly spaced times a random live node looks a random value up (``ds_find_value``, as a
get does); a lookup succeeds if it returns that value. The report has success, lookup
time (virtual) and hops.

It uses only what the simulator and the node have offered since before nodes could
leave (``SimNetwork.leave`` is used if present, else a leave is a silent stop), so the
benchmark can run it against an older tree for a side-by-side figure.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.identity import Identity
from dhtsignal.testing.simnet import SimNetwork


@dataclass(frozen=True)
class ChurnConfig:
    """What churns and what is measured."""

    duration: float = 3600.0
    """Virtual seconds of churn."""
    replaced_per_hour: float = 0.5
    """Share of the nodes that depart (and are replaced) per hour."""
    crash_share: float = 0.5
    """Share of departures that are crashes (the others leave cleanly)."""
    lookups: int = 1000
    """Lookups, evenly spread over ``duration``."""
    values: int = 50
    """Values put by the owners."""
    owners: int = 10
    """Nodes that put the values and never depart."""
    republish: float = 600.0
    """Seconds between the owners' republications of their values."""
    seed: int = 1
    """Seed of the churn's random choices."""


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class ChurnReport:
    """What a churn run measured."""

    lookups: int = 0
    found: int = 0
    lookup_ms: list[float] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    crashes: int = 0
    leaves: int = 0
    joins: int = 0
    join_failures: int = 0

    @property
    def success(self) -> float:
        """Share of lookups that found their value."""
        return self.found / self.lookups if self.lookups else float("nan")

    def summary(self) -> dict[str, Any]:
        """The figures as plain data."""
        return {
            "lookups": self.lookups,
            "found": self.found,
            "success": self.success,
            "lookup_ms_p50": _pct(self.lookup_ms, 0.5),
            "lookup_ms_p99": _pct(self.lookup_ms, 0.99),
            "hops_p50": _pct([float(h) for h in self.hops], 0.5),
            "hops_p99": _pct([float(h) for h in self.hops], 0.99),
            "crashes": self.crashes,
            "leaves": self.leaves,
            "joins": self.joins,
            "join_failures": self.join_failures,
        }


def _values(net: SimNetwork, cfg: ChurnConfig) -> list[Record]:
    ident = Identity(bytes(32))
    expires = net.wallclock() + cfg.duration + 3600
    return [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"churn-{cfg.seed}-{i}"),
            b"v",
            seq=1,
            expires=expires,
        )
        for i in range(cfg.values)
    ]


def run_churn(net: SimNetwork, cfg: ChurnConfig) -> ChurnReport:
    """Churn ``net`` (joined already) for ``cfg.duration`` virtual seconds.

    :param net: a joined simulated network.
    :param cfg: the churn model.
    :returns: what was measured.
    """
    rng = random.Random(cfg.seed)
    report = ChurnReport()
    live = [n for n in net.live_nodes() if n.address is not None]
    owners = live[: cfg.owners]
    owner_ids = {id(n) for n in owners}
    values = _values(net, cfg)
    held_by = [owners[i % len(owners)] for i in range(len(values))]

    def putting(v: Record) -> Callable[[Node, float], int]:
        return lambda n, now: n.start_put([v], now)

    def publish() -> None:
        net.wait([net.start(o, putting(v)) for o, v in zip(held_by, values, strict=True)])

    publish()
    start = net.now
    # Mean session so that replaced_per_hour of the nodes depart per hour.
    mean = 3600.0 / cfg.replaced_per_hour if cfg.replaced_per_hour > 0 else float("inf")
    #: (when, seq, kind, node): kind 0 departure, 1 lookup, 2 republish
    events: list[tuple[float, int, int, Node | None]] = []
    seq = 0

    def push(when: float, kind: int, node: Node | None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, seq, kind, node))

    def session(node: Node) -> None:
        if id(node) not in owner_ids and mean != float("inf"):
            push(net.now + rng.expovariate(1.0 / mean), 0, node)

    for n in live:
        session(n)
    step = cfg.duration / max(1, cfg.lookups)
    for i in range(cfg.lookups):
        push(start + (i + 0.5) * step, 1, None)
    t = start + cfg.republish
    while t < start + cfg.duration:
        push(t, 2, None)
        t += cfg.republish
    end = start + cfg.duration
    leave = getattr(net, "leave", None)
    while events and events[0][0] <= end:
        when, _, kind, node = heapq.heappop(events)
        if when > net.now:
            net.run_for(when - net.now)
        if kind == 0:
            assert node is not None
            if rng.random() < cfg.crash_share or leave is None:
                net.crash(node)
                report.crashes += 1
            else:
                leave(node)
                report.leaves += 1
            before = net.join_failures
            (fresh,) = net.grow(1)
            report.joins += 1
            report.join_failures += net.join_failures - before
            session(fresh)
        elif kind == 1:
            _lookup(net, rng, values, report)
        else:
            publish()
    if net.now < end:
        net.run_for(end - net.now)
    return report


def _lookup(net: SimNetwork, rng: random.Random, values: list[Record], report: ChurnReport) -> None:
    value = rng.choice(values)
    asker = net.random_node()
    k = asker.config.replicas
    began = net.now
    ended: list[float] = []
    op = net.start(asker, lambda n, now: n.start_lookup(value.key, now, k=k, want_value=True))
    (res,) = net.wait([op], ended_at=ended)
    report.lookups += 1
    report.lookup_ms.append((ended[0] - began) * 1000)
    if isinstance(res, BaseException):
        return
    report.hops.append(res.hops)
    if any(r.raw == value.raw for r in res.records):
        report.found += 1
