"""A mass join in the simulator (virtual time): 400 nodes join through one seed at
once, and every value put 2 s after the join is found from another node, right after
and 30 s later. Without the join's fills (``join_fill_below``) a value put from a
cluster that knows nothing of the key's part of the ID space lands far from the key.

The real-process version is ``bench/churn.py --mode massjoin`` (1,000 nodes in 10
processes).
"""

from __future__ import annotations

import random

from dhtsignal.dht import join
from dhtsignal.dht.params import NodeConfig
from dhtsignal.testing.massjoin import MassJoinConfig, run_massjoin

NODES = 400


def test_values_put_right_after_a_mass_join_are_found_from_other_nodes() -> None:
    report = run_massjoin(MassJoinConfig(nodes=NODES, values=NODES, stagger=2.0, seed=1))
    s = report.summary()
    assert report.joined == NODES and report.puts_ok == NODES, s
    assert report.found_first == NODES, s
    assert report.found_later == NODES, s
    assert not report.drops, s


def test_without_the_fills_a_value_put_after_a_mass_join_is_lost() -> None:
    """The same join with main's join (full refreshes 15-30 s later, no fills): a put
    from a cluster that knows nothing of the key's region stores it there."""
    cfg = NodeConfig(join_fill_below=0, join_refreshes=16)
    report = run_massjoin(
        MassJoinConfig(nodes=NODES, values=NODES, stagger=2.0, seed=1, later=0.0, node_config=cfg)
    )
    assert report.puts_ok == NODES
    assert report.found_first < NODES, report.summary()


def test_sparse_distances_names_the_distances_known_too_little() -> None:
    own = 1 << 100
    known = [own ^ (1 << 159) ^ 5, own ^ (1 << 159) ^ 7, own ^ (1 << 158), own ^ (1 << 150)]
    # 159: two known; 158: one; 157..151: none; 150 is our closest neighbour's (excluded).
    assert join.sparse_distances(own, known, 150, 2) == [158, *range(157, 150, -1)]
    assert join.sparse_distances(own, known, 150, 1) == list(range(157, 150, -1))
    assert join.sparse_distances(own, [], 159, 2) == []


def test_target_at_differs_from_us_first_at_that_bit() -> None:
    rng = random.Random(7)
    own = rng.getrandbits(160)
    for bit in (159, 100, 3, 0):
        t = int.from_bytes(join.target_at(own, bit, rng.randbytes), "big")
        assert (t ^ own).bit_length() - 1 == bit
