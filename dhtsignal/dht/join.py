"""Which parts of the ID space a node that just joined must look into at once (no I/O).

Theory of operation
-------------------
A joining node looks its own ID up (Kademlia paper section 2.3): that fills its table
near its own ID, along the path from its bootstrap node. In a mass join every answer
on that path is already deep in the newcomer's own subtree (the bootstrap node knows
many nodes there), so the sibling subtrees near the root, each holding a large share
of the network, stay unknown: the newcomer holds no contact at those distances, and
neither do its neighbours, whose self-lookups took the same path. A lookup started in
such a cluster for a key in one of those subtrees then ends among the cluster's nodes,
never reaching the key's true neighbourhood: a put stores there and a get from anywhere
else misses it (measured in ``dhtsignal.testing.massjoin``: 17 of 1,000 values).

:func:`sparse_distances` names the distances (bit ``i`` of ``ours XOR theirs`` the
highest set) from the farthest half of the ID space down to our closest neighbour's at
which the table knows fewer than ``below`` contacts; the node starts one small lookup
(a few closest only) of a random ID at each of them, at a random moment within about a
second of the self-lookup (``join_fill_delay``: the nodes joining together are known
by then, and the fills stay out of the burst of self-lookups at the bootstrap node). A
distance already known is skipped, so a node joining a settled network sends little
more than its self-lookup. These replace the paper's full refresh of every far bucket
(``join_refreshes``, now off by default), which cost ten times the traffic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: Highest distance bit of a 160-bit ID space.
TOP_BIT = 159


def sparse_distances(own: int, known: Iterable[int], lowest: int, below: int) -> list[int]:
    """The distance bits, farthest first, at which fewer than ``below`` IDs are known.

    :param own: our ID as an integer.
    :param known: the IDs (integers) in our routing table.
    :param lowest: the distance bit of our closest neighbour (not included: that
        subtree is where the self-lookup went).
    :param below: a distance with fewer known IDs than this is sparse.
    :returns: bits from :data:`TOP_BIT` down to ``lowest + 1``.
    """
    counts = [0] * (TOP_BIT + 1)
    for nid in known:
        d = nid ^ own
        if d:
            counts[d.bit_length() - 1] += 1
    return [bit for bit in range(TOP_BIT, lowest, -1) if counts[bit] < below]


def target_at(own: int, bit: int, randbytes: Callable[[int], bytes]) -> bytes:
    """A random 20-byte ID at distance bit ``bit`` from ``own`` (it differs from ``own``
    first at that bit)."""
    low = int.from_bytes(randbytes(20), "big") & ((1 << bit) - 1)
    return (((own ^ (1 << bit)) >> bit << bit) | low).to_bytes(20, "big")
