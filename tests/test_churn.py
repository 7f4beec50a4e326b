"""Churn with real processes on 127.0.0.1: departed peers stop being handed out.

Daemons are separate ``dhtsignal`` processes (the launcher of ``test_cli``); the probe is
an in-process client-mode :class:`~dhtsignal.aio.node.DhtNode` on a real UDP socket. Its
claims are counted: which addresses a bootstrap node's ``ds_find_node`` and stock
``find_node`` replies name, and how many RPCs a fresh client's lookups had to retry or give
up on (each one a dead contact waited on). The SIGTERM scenario also measures what the
issue measured, as a user would: ``dhtsignal ping target`` run as a process of its own (a
fresh anonymous client each time), its reported *resolve* phase, median of several runs
before and after the churn. Every process is killed by PID in the launcher's finalizer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import LOOPBACK_RTC, Launcher, Proc, _bootstrap, _peer

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.rpc import parse_contact
from dhtsignal.errors import DhtSignalError
from dhtsignal.presence import resolve
from dhtsignal.testing.presence_churn import PresenceChurnConfig, run_presence_churn
from dhtsignal.wire.addr import Addr, parse_addr

#: Short-lived peers that join and leave in each scenario.
CHURNERS = 12
#: The shortened refresh interval (and good-for bound) of the SIGKILL scenario, seconds.
SHORT_REFRESH = 2.0
#: ``dhtsignal ping`` runs whose resolve phases make one median.
PING_RUNS = 5
#: Milliseconds of slack on top of 2x for a loaded machine: the issue saw 300 ms more
#: for every three departed peers, so one dead contact waited on still fails the bound.
PING_SLACK_MS = 50.0


@pytest.fixture()
def own_launcher(tmp_path: Path) -> Iterator[Launcher]:
    lau = Launcher(tmp_path)
    try:
        yield lau
    finally:
        lau.close()


@dataclass
class Probe:
    """What a fresh client saw."""

    handed_out: set[Addr]
    """Addresses named by the entry node's ds_find_node and stock find_node replies."""
    waited_on: int
    """RPCs of the client's lookups retried or timed out (dead contacts waited on)."""
    lookup_ms: float
    """Milliseconds of one presence lookup of ``target``, from a joined client."""


async def _probe(entry: Addr, target: str) -> Probe:
    node = DhtNode(os.urandom(20), NodeConfig(client_mode=True))
    entry_id: bytes | None = None
    await node.listen_udp("127.0.0.1", 0)
    try:
        handed: set[Addr] = set()
        entry_id = await node.ping(entry)
        for _ in range(4):
            target_id = os.urandom(20)
            ours = await node.request(entry, "ds_find_node", node.ds_args(target_id))
            # A stock request has no client flag: sent in the entry node's own name, so
            # that the probe (which leaves without notice) does not enter its table.
            stock = await node.request(entry, "find_node", [entry_id, target_id])
            for item in [*ours, *stock]:
                c = parse_contact(item)
                assert c is not None, item
                handed.add(c.addr)
        assert await node.bootstrap([entry]) > 0
        began = time.perf_counter()
        info = await resolve(node, target)
        ms = (time.perf_counter() - began) * 1000
        assert info.node_id == target
        await node.find_nodes(os.urandom(20))
        stats = node.stats
        return Probe(handed, stats["rpc-retry"] + stats["rpc-timeout"], ms)
    finally:
        await node.close()


def _addr(proc: Proc) -> Addr:
    return parse_addr(proc.ready()["addr"])


def _start_churners(lau: Launcher, entry: str, *extra: str) -> tuple[list[Proc], set[Addr]]:
    procs = [_peer(lau, f"churn{i}", entry, *extra) for i in range(CHURNERS)]
    return procs, {_addr(p) for p in procs}


def _ping_resolve_ms(lau: Launcher, entry: str, target: str) -> list[float]:
    """The resolve phase of ``PING_RUNS`` runs of ``dhtsignal ping target`` (each a process
    of its own: a fresh client that learns its contacts from the entry node's replies),
    milliseconds, as the command reports it (``--json``: ``phases_ms.resolve``)."""
    phases = []
    for _ in range(PING_RUNS):
        res = lau.run("ping", target, "--bootstrap", entry, "--count", "1", "--json", *LOOPBACK_RTC)
        assert res.returncode == 0, res.stderr
        phases.append(float(json.loads(res.stdout)["phases_ms"]["resolve"]))
    return phases


def _until_handed_out(entry: Addr, target: str, want: set[Addr], timeout: float) -> Probe:
    """Probe until the entry node hands out every address of ``want`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = asyncio.run(_probe(entry, target))
        except DhtSignalError:
            # Twelve interpreters starting at once on two cores can starve the entry
            # node for a few seconds: poll again until the deadline, then fail.
            if time.monotonic() >= deadline:
                raise
            continue
        if want <= probe.handed_out or time.monotonic() >= deadline:
            return probe


def test_peers_leaving_on_sigterm_are_not_handed_out(own_launcher: Launcher) -> None:
    """12 peers join and leave with SIGTERM one after another: the very next replies of
    the bootstrap node name none of them, a fresh client's lookups wait on no dead
    contact, and ``dhtsignal ping target`` right after resolves within 2x of its median
    before (the issue saw 1,203 ms of resolve instead of 1 ms: every fresh client learned
    the departed peers from the bootstrap node and waited out a soft timeout on each)."""
    lau = own_launcher
    boot = _bootstrap(lau, "boot")
    entry = boot.ready()["addr"]
    entry_addr = parse_addr(entry)
    target = _peer(lau, "target", entry)
    target_addr = _addr(target)
    before = asyncio.run(_probe(entry_addr, "target"))
    assert target_addr in before.handed_out and before.waited_on == 0
    ping_before = _ping_resolve_ms(lau, entry, "target")

    churners, gone = _start_churners(lau, entry)
    during = _until_handed_out(entry_addr, "target", gone, 10.0)
    assert gone <= during.handed_out  # they were in the bootstrap node's table
    for p in churners:
        rc, _ = p.signal_and_wait(signal.SIGTERM)
        assert rc == 0, p.stderr()

    # Right after: first the entry node's very next replies, then what a user sees; the
    # issue's own figure is checked first.
    after = asyncio.run(_probe(entry_addr, "target"))
    ping_after = _ping_resolve_ms(lau, entry, "target")
    p50_before, p50_after = statistics.median(ping_before), statistics.median(ping_after)
    assert p50_after <= 2 * p50_before + PING_SLACK_MS, (
        f"ping resolve p50 {p50_after:.1f} ms after the churn, {p50_before:.1f} ms before "
        f"(runs: {ping_after} after, {ping_before} before)"
    )
    assert not (after.handed_out & gone), f"departed peers still handed out: {after}"
    assert target_addr in after.handed_out
    assert after.waited_on == 0, f"the client waited on dead contacts: {after}, before {before}"
    # Within 2x, with 50 ms of slack for a loaded machine (shown, not the claim).
    assert after.lookup_ms <= 2 * before.lookup_ms + 50, (before, after)


def test_peers_killed_are_not_handed_out_after_one_refresh_interval(
    own_launcher: Launcher,
) -> None:
    """The same with SIGKILL (no notice): after one (shortened) refresh interval the
    bootstrap node has noticed, by its own liveness pings, that they are gone."""
    lau = own_launcher
    short = ("--refresh-interval", f"{SHORT_REFRESH:g}")
    boot = _bootstrap(lau, "boot", *short)
    entry = boot.ready()["addr"]
    entry_addr = parse_addr(entry)
    target = _peer(lau, "target", entry, *short)
    target_addr = _addr(target)
    before = asyncio.run(_probe(entry_addr, "target"))
    assert before.waited_on == 0

    churners, gone = _start_churners(lau, entry, *short)
    during = _until_handed_out(entry_addr, "target", gone, 10.0)
    assert gone <= during.handed_out
    for p in churners:
        p.kill()
    killed = time.monotonic()

    # Poll (bounded) until none is handed out; it must happen within one refresh
    # interval plus a maintenance round and a liveness round.
    deadline = killed + SHORT_REFRESH + 3.0
    after = asyncio.run(_probe(entry_addr, "target"))
    while after.handed_out & gone and time.monotonic() < deadline:
        after = asyncio.run(_probe(entry_addr, "target"))
    noticed = time.monotonic() - killed
    assert not (after.handed_out & gone), f"killed peers still handed out after {noticed:.1f} s"
    assert target_addr in _until_handed_out(entry_addr, "target", {target_addr}, 5.0).handed_out
    settled = asyncio.run(_probe(entry_addr, "target"))
    assert settled.waited_on == 0, f"the client waited on dead contacts: {settled}"
    assert settled.lookup_ms <= 2 * before.lookup_ms + 50, (before, settled)


def test_presence_lookups_all_succeed_with_30_percent_of_50_nodes_killed(tmp_path: Path) -> None:
    """Issue 9's proof at its full scale: 50 DHT node processes and 10 peer processes;
    SIGKILL 15 nodes (30 %): every presence lookup succeeds (right after the kill, while
    the refresh interval runs and after it), and after one (shortened) refresh interval
    their p50 is within 2x of the quiet figure, both for a client that stayed joined and
    for a fresh one per round (as ``dhtsignal lookup``); a fresh client then sends
    nothing to a killed node. (bench/presence_churn.py is the same run with its figures.)"""
    # Up to 3 measurements of ~2 s each after the interval: the machine is shared, and a
    # burst of other jobs' load shows in the control ping (figures["control_ratio_*"]).
    cfg = PresenceChurnConfig(nodes=50, peers=10, kill=15, refresh=SHORT_REFRESH, after_tries=3)
    report = run_presence_churn(cfg, tmp_path)
    figures = report.summary()
    print(json.dumps(figures))  # shown with -rP: the figures of a passing run
    every = report.all_lookups()
    assert every.lookups >= 2 * (cfg.rounds + cfg.fresh_rounds + 1) * cfg.peers, figures
    assert every.success == 1.0, figures
    assert report.phase("warm right_after").lookups == cfg.peers, figures
    assert report.met_in() is not None, figures  # p50 ratios <= 2 for both probers
    # After the interval no node hands out the killed: a fresh client sends them nothing.
    assert report.phase("fresh after").to_dead == 0, figures


pytestmark = pytest.mark.slow
