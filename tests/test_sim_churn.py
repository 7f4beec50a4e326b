"""Churn in the simulator (virtual time): departed nodes leave the routing tables, and
lookups keep finding values while half the nodes are replaced per hour.

The 10,000-node version is ``bench/sim_churn.py``; here a few hundred nodes.
"""

from __future__ import annotations

from dhtsignal.dht.node import Node
from dhtsignal.dht.params import NodeConfig
from dhtsignal.testing import simnet
from dhtsignal.testing.churn import ChurnConfig, run_churn

#: Virtual seconds any single wait may take before the simulation is declared stuck.
LIMIT = 4 * 3600.0


def _holders(net: simnet.SimNetwork, gone: Node) -> int:
    """Live nodes whose routing table still holds ``gone``."""
    return sum(1 for n in net.live_nodes() if n.table.get(gone.id) is not None)


def _handing_out(net: simnet.SimNetwork, gone: Node) -> int:
    """Live nodes whose find replies would name ``gone`` (it is good to them)."""
    return sum(
        1
        for n in net.live_nodes()
        if (c := n.table.get(gone.id)) is not None and n.table.is_good(c, net.now)
    )


def test_a_leaving_node_is_dropped_by_its_contacts_within_seconds() -> None:
    net = simnet.SimNetwork.build(120, simnet.SimConfig(seed=3), time_limit=LIMIT)
    # Pings validating the last requests' senders still in flight: a node admits a
    # sender only once it answered (issue 10), and leave notices go to admitted contacts.
    net.run_for(1.0)
    leaver = net.nodes[50]
    assert _holders(net, leaver) > 0
    assert net.leave(leaver) > 0
    net.run_for(0.2)  # the notices arrived: nobody hands it out any more
    assert _handing_out(net, leaver) == 0
    net.run_for(3.0)  # the confirming pings failed: evicted
    assert _holders(net, leaver) == 0
    assert sum(n.stats["left"] for n in net.live_nodes()) > 0
    net.close()


def test_a_crashed_node_is_no_longer_handed_out_after_good_for() -> None:
    cfg = NodeConfig(good_for=60.0, maintenance_interval=10.0)
    net = simnet.SimNetwork.build(120, simnet.SimConfig(seed=4, node_config=cfg), time_limit=LIMIT)
    victim = net.nodes[60]
    assert _handing_out(net, victim) > 0
    net.crash(victim)
    net.run_for(cfg.good_for + 0.1)
    # Questionable by now at the latest (nobody heard from it); then pinged and evicted.
    assert _handing_out(net, victim) == 0
    net.run_for(cfg.maintenance_interval + 3 * 2.4 + 5.0)
    assert _holders(net, victim) == 0
    net.close()


def test_lookups_keep_finding_values_under_churn() -> None:
    """Half the nodes replaced per simulated hour (half crashes, half leaves): every
    lookup finds its value, in a few hops."""
    net = simnet.SimNetwork.build(150, simnet.SimConfig(seed=5), time_limit=LIMIT)
    report = run_churn(net, ChurnConfig(duration=3600.0, lookups=100, values=20, seed=5))
    net.close()
    s = report.summary()
    assert report.crashes > 10 and report.leaves > 10, s
    assert report.joins == report.crashes + report.leaves and report.join_failures == 0, s
    assert report.lookups == 100 and report.found == report.lookups, s
    assert s["hops_p99"] <= 6, s
