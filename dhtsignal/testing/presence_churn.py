"""Presence lookups while a third of the DHT nodes are killed: real processes on 127.0.0.1.

Theory of operation
-------------------
:func:`run_presence_churn` starts ``nodes`` ``dhtsignal bootstrap`` daemons (one node per
OS process, each with its own data directory; all but the first join through the
first) and then ``peers`` ``dhtsignal peer`` daemons, every one with the shortened
``--refresh-interval`` (the setting the program reads: how long a contact stays good
without being heard from, and when a silent bucket is refreshed). Each waits for the
daemons' ready lines. The prober is this process: what ``dhtsignal lookup`` runs
underneath (:func:`~dhtsignal.daemon.client_node` and
:func:`~dhtsignal.presence.resolve`), in two forms:

* *warm*: one client node that joined before the kill and stays (a long-lived client);
* *fresh*: a new client node per round, joined through the first node, as each
  ``dhtsignal lookup`` command is.

A round looks up every peer once, one after another. Phases:

``quiet``
    ``rounds`` warm rounds and ``fresh_rounds`` fresh rounds.
``right_after``
    ``kill`` nodes chosen at random (never a peer, and by default never the first
    node, the address every client is configured with) are killed with SIGKILL and
    reaped; at once one warm round and one fresh round.
``during``
    warm rounds until one refresh interval has passed since the kill (bounded).
``after``
    ``rounds`` warm rounds and ``fresh_rounds`` fresh rounds; measured again (``after2``,
    ``after3``..., up to ``after_tries`` in all) while either prober's p50 is above
    ``target_ratio`` times its quiet p50.

A lookup succeeds when it returns the presence of the peer's node ID within
``lookup_timeout``. Each round also pings one peer's node (never killed) once: its
round-trip time is a control for the load of the machine, which other jobs share.
Every process is killed by PID in a ``finally``; the daemons' data directories live
under ``workdir``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhtsignal.aio.node import WrappedTransport
from dhtsignal.config import Settings
from dhtsignal.daemon import client_node
from dhtsignal.errors import DhtSignalError
from dhtsignal.presence import resolve
from dhtsignal.testing.daemons import DaemonProcess
from dhtsignal.wire.addr import Addr, parse_addr


@dataclass(frozen=True)
class PresenceChurnConfig:
    """What runs and what is measured."""

    nodes: int = 50
    """DHT node processes (``dhtsignal bootstrap``)."""
    peers: int = 10
    """Peer processes (``dhtsignal peer``), whose presence is looked up."""
    kill: int = 15
    """DHT nodes killed with SIGKILL (30 % of 50)."""
    refresh: float = 5.0
    """``--refresh-interval`` of every process and of the prober, seconds."""
    rounds: int = 20
    """Warm rounds (one lookup of every peer each) in the quiet and after phases."""
    fresh_rounds: int = 5
    """Fresh-client rounds in the quiet and after phases."""
    max_during: int = 200
    """Warm rounds at most while waiting out the refresh interval after the kill."""
    lookup_timeout: float = 10.0
    """A lookup slower than this fails."""
    ready_timeout: float = 60.0
    """Seconds a daemon has to print its ready line (many interpreters start at once)."""
    seed: int = 1
    """Seed of the choice of the nodes killed."""
    target_ratio: float = 2.0
    """The claim: p50 after one refresh interval at most this times the quiet p50."""
    after_tries: int = 1
    """Measurements of the after phase at most: another one (right after the previous)
    is made while a prober's ratio is above ``target_ratio``. More than one rides out a
    burst of load from other jobs on a shared machine; the bench makes one."""
    spare_entry: bool = True
    """Never kill the first node (the one address clients join through). False: the
    nodes killed are drawn from all of them, and clients join through ``entries``
    nodes drawn at random (peers through two)."""
    entries: int = 3
    """Bootstrap addresses of the clients when ``spare_entry`` is off."""


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


@dataclass
class Phase:
    """The lookups of one phase (one form of prober)."""

    ms: list[float] = field(default_factory=list)
    """Milliseconds of each successful lookup."""
    failed: list[str] = field(default_factory=list)
    """Why each failed lookup failed."""
    by_peer: dict[str, list[float]] = field(default_factory=dict)
    """The same milliseconds by peer looked up."""
    control_ms: list[float] = field(default_factory=list)
    """Milliseconds of one ping of a live peer's node per round: the machine's load, as
    a control (it does not depend on the nodes killed)."""
    to_dead: int = 0
    """Datagrams the prober's node sent to killed nodes during the phase (for the warm
    prober its own background liveness pings count too)."""
    waited_on: int = 0
    """RPCs the prober's node retried or gave up on during the phase (dead contacts
    waited on; for the warm prober its own background liveness pings count too)."""

    @property
    def lookups(self) -> int:
        """Lookups made."""
        return len(self.ms) + len(self.failed)

    @property
    def success(self) -> float | None:
        """Share of lookups that succeeded."""
        return len(self.ms) / self.lookups if self.lookups else None

    @property
    def p50(self) -> float | None:
        """Median lookup time of the successful lookups, ms."""
        return _pct(self.ms, 0.5)

    def summary(self) -> dict[str, Any]:
        """The figures as plain data."""
        return {
            "lookups": self.lookups,
            "found": len(self.ms),
            "success": self.success,
            "p50_ms": self.p50,
            "p99_ms": _pct(self.ms, 0.99),
            "max_ms": _pct(self.ms, 1.0),
            "control_ping_p50_ms": _pct(self.control_ms, 0.5),
            "waited_on": self.waited_on,
            "to_dead": self.to_dead,
            "p50_ms_by_peer": {n: _pct(ms, 0.5) for n, ms in sorted(self.by_peer.items())},
            "failures": sorted(set(self.failed))[:5],
        }


@dataclass
class PresenceChurnReport:
    """What a run measured: phases by ``"<prober> <phase>"`` (e.g. ``"warm quiet"``)."""

    config: PresenceChurnConfig
    phases: dict[str, Phase] = field(default_factory=dict)
    start_s: float = 0.0
    """Seconds until every daemon was ready."""
    killed_at: float = 0.0
    """Seconds from the start of the run to the kill."""
    prober_stats: dict[str, int] = field(default_factory=dict)
    """The warm prober's node counters at the end (RPC retries, timeouts...)."""

    def control_ratio(self, prober: str) -> float | None:
        """The control ping's p50 after one refresh interval over its quiet p50."""
        before = _pct(self.phase(f"{prober} quiet").control_ms, 0.5)
        after = _pct(self.phase(f"{prober} after").control_ms, 0.5)
        if not before or after is None:
            return None
        return round(after / before, 3)

    def phase(self, name: str) -> Phase:
        """The phase ``name``, created empty if new."""
        return self.phases.setdefault(name, Phase())

    def all_lookups(self) -> Phase:
        """Every lookup of the run, merged."""
        out = Phase()
        for p in self.phases.values():
            out.ms += p.ms
            out.failed += p.failed
            out.waited_on += p.waited_on
            out.to_dead += p.to_dead
        return out

    def ratio(self, prober: str, tag: str = "after") -> float | None:
        """p50 after one refresh interval over the quiet p50, for ``prober``.

        :param tag: which measurement of the after phase (``after``, ``after2``...).
        """
        before = self.phase(f"{prober} quiet").p50
        after = self.phase(f"{prober} {tag}").p50
        if not before or after is None:
            return None
        return round(after / before, 3)

    def after_tags(self) -> list[str]:
        """The measurements of the after phase made, in order."""
        return [n.split()[1] for n in self.phases if n.startswith("warm after")]

    def met(self, tag: str) -> bool:
        """Both probers' ratios at most ``target_ratio`` in measurement ``tag``."""
        target = self.config.target_ratio
        ratios = [self.ratio(prober, tag) for prober in ("warm", "fresh")]
        return all(r is not None and r <= target for r in ratios)

    def met_in(self) -> str | None:
        """The first measurement of the after phase in which the target was met."""
        return next((tag for tag in self.after_tags() if self.met(tag)), None)

    def summary(self) -> dict[str, Any]:
        """The figures as plain data."""
        cfg = self.config
        every = self.all_lookups()
        return {
            "nodes": cfg.nodes,
            "peers": cfg.peers,
            "killed": cfg.kill,
            "refresh_s": cfg.refresh,
            "entry_spared": cfg.spare_entry,
            "start_s": round(self.start_s, 1),
            "success_all": every.success,
            "lookups_all": every.lookups,
            "ratio_warm": self.ratio("warm"),
            "ratio_fresh": self.ratio("fresh"),
            "control_ratio_warm": self.control_ratio("warm"),
            "control_ratio_fresh": self.control_ratio("fresh"),
            "ratios_by_try": {
                tag: [self.ratio("warm", tag), self.ratio("fresh", tag)]
                for tag in self.after_tags()
            },
            "target_met_in": self.met_in(),
            "phases": {name: p.summary() for name, p in self.phases.items()},
            "warm_prober_stats": {
                k: v for k, v in sorted(self.prober_stats.items()) if not k.startswith("rpc:")
            },
        }


def _env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
    env["XDG_DATA_HOME"] = str(workdir / "xdg")
    env["XDG_CONFIG_HOME"] = str(workdir / "xdg-config")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _show(a: Addr) -> str:
    return f"{a[0]}:{a[1]}"


def peer_names(cfg: PresenceChurnConfig) -> list[str]:
    """The node IDs of the peers."""
    return [f"peer{i}" for i in range(cfg.peers)]


class _Watch(WrappedTransport):
    """A node's transport, counting the datagrams sent to the addresses in ``dead``."""

    def __init__(self, inner: asyncio.DatagramTransport, dead: set[Addr]) -> None:
        super().__init__(inner)
        self.dead = dead
        self.sent_to_dead = 0

    def sendto(self, data: Any, addr: Any = None) -> None:
        if addr is not None and (addr[0], addr[1]) in self.dead:
            self.sent_to_dead += 1
        self._inner.sendto(data, addr)


def _watch(node: Any, dead: set[Addr]) -> _Watch:
    """Put a :class:`_Watch` between ``node`` and its transport."""
    watch = _Watch(node.transport, dead)
    node.transport = watch
    return watch


def _waits(node: Any) -> int:
    stats = node.stats
    return int(stats["rpc-retry"] + stats["rpc-timeout"])


async def _round(node: Any, names: list[str], phase: Phase, timeout: float, control: Addr) -> None:
    waits = _waits(node)
    watch = node.transport
    sent = watch.sent_to_dead if isinstance(watch, _Watch) else 0
    try:
        await _lookups(node, names, phase, timeout)
        began = time.perf_counter()
        with contextlib.suppress(DhtSignalError):
            await node.ping(control)
            phase.control_ms.append((time.perf_counter() - began) * 1000)
    finally:
        phase.waited_on += _waits(node) - waits
        if isinstance(watch, _Watch):
            phase.to_dead += watch.sent_to_dead - sent


async def _lookups(node: Any, names: list[str], phase: Phase, timeout: float) -> None:
    for name in names:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                info = await resolve(node, name)
        except TimeoutError:
            phase.failed.append(f"no answer within {timeout:g} s")
            continue
        except DhtSignalError as exc:
            phase.failed.append(f"{type(exc).__name__}: {exc}")
            continue
        if info.node_id != name:
            phase.failed.append(f"{name} resolved to {info.node_id}")
            continue
        ms = (time.perf_counter() - began) * 1000
        phase.ms.append(ms)
        phase.by_peer.setdefault(name, []).append(ms)


async def _fresh_rounds(
    settings: Settings,
    entries: list[Addr],
    control: Addr,
    dead: set[Addr],
    names: list[str],
    phase: Phase,
    rounds: int,
    timeout: float,
) -> None:
    for _ in range(rounds):
        try:
            async with asyncio.timeout(timeout), client_node(settings, entries) as node:
                _watch(node, dead)
                await _round(node, names, phase, timeout, control)
        except (TimeoutError, DhtSignalError) as exc:
            phase.failed += [f"fresh client: {type(exc).__name__}: {exc}"] * len(names)


async def _probe(
    cfg: PresenceChurnConfig,
    entries: list[Addr],
    control: Addr,
    dead: set[Addr],
    kill: Callable[[], None],
    report: PresenceChurnReport,
    progress: Callable[[str], None],
) -> None:
    settings = Settings(listen=("127.0.0.1", 0), refresh_interval=cfg.refresh)
    names = peer_names(cfg)
    t = cfg.lookup_timeout
    async with client_node(settings, entries) as warm:
        _watch(warm, dead)
        for _ in range(cfg.rounds):
            await _round(warm, names, report.phase("warm quiet"), t, control)
        await _fresh_rounds(
            settings,
            entries,
            control,
            dead,
            names,
            report.phase("fresh quiet"),
            cfg.fresh_rounds,
            t,
        )
        progress(f"quiet: warm p50 {report.phase('warm quiet').p50} ms")
        kill()
        killed = time.monotonic()
        await _round(warm, names, report.phase("warm right_after"), t, control)
        await _fresh_rounds(
            settings, entries, control, dead, names, report.phase("fresh right_after"), 1, t
        )
        during = report.phase("warm during")
        for _ in range(cfg.max_during):
            if time.monotonic() - killed >= cfg.refresh:
                break
            await _round(warm, names, during, t, control)
        progress(f"one refresh interval ({cfg.refresh:g} s) passed since the kill")
        for k in range(max(1, cfg.after_tries)):
            tag = "after" if k == 0 else f"after{k + 1}"
            for _ in range(cfg.rounds):
                await _round(warm, names, report.phase(f"warm {tag}"), t, control)
            fresh = report.phase(f"fresh {tag}")
            await _fresh_rounds(settings, entries, control, dead, names, fresh, cfg.fresh_rounds, t)
            if report.met(tag):
                break
            progress(f"{tag}: ratios {report.ratio('warm', tag)}, {report.ratio('fresh', tag)}")
        report.prober_stats = dict(warm.stats)


def run_presence_churn(
    cfg: PresenceChurnConfig,
    workdir: Path,
    progress: Callable[[str], None] = lambda _msg: None,
) -> PresenceChurnReport:
    """Start the daemons, probe, kill, probe again; every process is killed at the end.

    :param cfg: what runs.
    :param workdir: an empty directory for data directories and stderr files.
    :param progress: called with a line of progress now and then.
    :raises RuntimeError: a daemon did not start.
    """
    report = PresenceChurnReport(cfg)
    env = _env(workdir)
    daemons: list[DaemonProcess] = []
    short = ["--refresh-interval", f"{cfg.refresh:g}"]

    def start(name: str, *args: str) -> DaemonProcess:
        data = ["--data-dir", str(workdir / name)]
        d = DaemonProcess([*args, *data, *short], workdir / f"{name}.err", env)
        daemons.append(d)
        return d

    def addr_of_ready(d: DaemonProcess) -> Addr:
        return parse_addr(d.ready(cfg.ready_timeout)["addr"])

    began = time.monotonic()
    try:
        listen = ("--listen", "127.0.0.1:0")
        first = start("node0", "bootstrap", *listen)
        entry = addr_of_ready(first)
        join = ("--join", _show(entry))
        others = [start(f"node{i}", "bootstrap", *listen, *join) for i in range(1, cfg.nodes)]
        addrs = [entry] + [addr_of_ready(d) for d in others]
        progress(f"{len(addrs)} DHT nodes ready after {time.monotonic() - began:.1f} s")
        addr_of = dict(zip([first, *others], addrs, strict=True))
        rng = random.Random(cfg.seed)
        if cfg.spare_entry:
            entries = [entry]
            doomed = rng.sample(others, cfg.kill)
        else:
            entries = rng.sample(addrs, min(cfg.entries, len(addrs)))
            doomed = rng.sample([first, *others], cfg.kill)

        def boot() -> list[str]:
            picks = [entry, rng.choice(addrs[1:])] if cfg.spare_entry else rng.sample(addrs, 2)
            return [w for a in picks for w in ("--bootstrap", _show(a))]

        peers = [
            start(
                f"peer-{name}",
                "peer",
                *("--node-id", name, *listen, "--ice-host", "127.0.0.1", *boot()),
            )
            for name in peer_names(cfg)
        ]
        ready = [addr_of_ready(p) for p in peers]
        control = ready[0]
        report.start_s = time.monotonic() - began
        progress(f"{len(peers)} peers ready after {report.start_s:.1f} s")

        dead: set[Addr] = set()

        def kill() -> None:
            report.killed_at = time.monotonic() - began
            dead.update(addr_of[d] for d in doomed)
            for d in doomed:
                d.kill()
            progress(f"killed {len(doomed)} of {cfg.nodes} DHT nodes with SIGKILL")

        asyncio.run(_probe(cfg, entries, control, dead, kill, report, progress))
        return report
    finally:
        for d in daemons:
            d.kill()
