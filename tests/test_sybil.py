"""Sybil attacks on names in the simulator (a small ``bench/sybil.py``), and the
per-prefix diversity limit of lookups it rests on."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from dhtsignal.dht.hosts import diversity_group, keys_of
from dhtsignal.dht.lookup import Finished, Lookup, Query
from dhtsignal.dht.routing import DIALECT_DS, Contact
from dhtsignal.testing import sybil


def test_hosts_and_prefixes() -> None:
    assert keys_of("192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert keys_of("::ffff:192.0.2.7") == ("192.0.2.7", "192.0.2.0/24")
    assert keys_of("2001:db8:1:2:3::4") == ("2001:db8:1:2::/64", "2001:db8:1::/48")
    assert keys_of("not an ip") == ("not an ip", "not an ip")
    assert diversity_group("8.8.8.8") == "8.8.8.0/24"
    assert diversity_group("127.0.0.1") is None  # private: not limited...
    assert diversity_group("127.0.0.1", private_too=True) == "127.0.0.0/24"  # ...unless asked


def test_a_lookup_keeps_one_place_per_prefix_among_the_closest() -> None:
    """Ten contacts of one /24 right next to the target and ten of distinct /24s
    farther away: the lookup queries one of the ten and returns it with the nine
    nearest others."""
    target = bytes(20)
    near = [
        Contact((i + 1).to_bytes(20, "big"), "11.0.0.1", 1000 + i, DIALECT_DS) for i in range(10)
    ]
    far = [
        Contact((1 << 100 + i).to_bytes(20, "big"), f"12.0.{i}.1", 1000, DIALECT_DS)
        for i in range(10)
    ]
    lk = Lookup(target, near + far, k=10, alpha=20, group=lambda c: diversity_group(c.ip, True))
    step = lk.next(0.0)
    assert isinstance(step, Query)
    assert [c.ip for c in step.contacts].count("11.0.0.1") == 1
    for c in step.contacts:
        lk.on_success(c, [])
    done = lk.next(0.0)
    assert isinstance(done, Finished)
    assert [c.ip for c in done.closest].count("11.0.0.1") == 1
    assert len(done.closest) == 10


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """Each kept-but-contested put logs a warning: not here (restored after)."""
    log = logging.getLogger("dhtsignal.dht.putpolicy")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def test_sybils_from_a_few_prefixes_take_a_name_only_without_the_defence() -> None:
    """400 honest nodes. Without diversity limits (today's lookups), 2 prefixes with 2
    nodes each next to the key win most trials; with them, 8 prefixes win none, and
    the curve turns only past 16 prefixes (17 win: the bench's full curve)."""
    base = sybil.network(400, sybil.BASELINE, seed=3)
    assert sybil.success_rate(base, 2, 6) >= 0.5
    net = sybil.network(400, sybil.DEFENDED, seed=3)
    assert sybil.success_rate(net, 8, 6) == 0.0
    assert sybil.success_rate(net, 14, 4) <= 0.25
    assert sybil.success_rate(net, 20, 3) == 1.0
