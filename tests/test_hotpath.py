"""The hot path's shortcuts decide exactly as the code they stand in for: find replies
packed before they are measured, and the cached address checks."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dhtsignal.dht import hosts
from dhtsignal.dht.routing import (
    DIALECT_DS,
    DIALECT_STOCK,
    Contact,
    RoutingTable,
    pack_contacts,
    pack_stock_contacts,
)
from dhtsignal.dht.rpc import Outcome, RequestHandler
from dhtsignal.dht.storage import LegacyStore, RecordStore, StorageLimits, Subscriptions
from dhtsignal.wire import addr as wire_addr
from dhtsignal.wire.addr import is_ip_literal


def _handler(contacts: list[Contact]) -> RequestHandler:
    table = RoutingTable(b"\x00" * 20, ksize=20)
    for c in contacts:
        table.add_contact(c, 0.0)
    limits = StorageLimits()
    return RequestHandler(
        b"\x00" * 20,
        "net",
        table,
        RecordStore(limits),
        LegacyStore(limits),
        Subscriptions(limits),
        lambda: 0.0,
    )


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(min_size=20, max_size=20),
            st.sampled_from(["10.0.0.1", "192.168.100.200", "2001:db8::1", "::1"]),
            st.integers(1, 65535),
            st.sampled_from([DIALECT_DS, DIALECT_STOCK]),
        ),
        max_size=20,
        unique_by=lambda t: t[0],
    ),
    st.one_of(st.none(), st.integers(-5, 1200)),
    st.booleans(),
)
def test_packed_fit_equals_cutting_first(
    items: list[tuple[bytes, str, int, int]], room: int | None, stock: bool
) -> None:
    """A find reply packed first and cut only when too large is byte for byte the reply
    cut contact by contact, with the same ``reply-cut`` count and ``cut`` flag."""
    found = [Contact(nid, ip, port, d) for nid, ip, port, d in items]
    fast, slow = _handler(found), _handler(found)
    out_fast, out_slow = Outcome(), Outcome()
    raw = fast._packed_fit(found, room, out_fast, stock)
    kept = found if room is None else slow._fit(found, room, out_slow, stock)
    assert raw == (pack_stock_contacts if stock else pack_contacts)(kept)
    assert out_fast.cut is out_slow.cut
    assert fast.stats["reply-cut"] == slow.stats["reply-cut"]


def test_is_ip_literal_cached_and_bounded() -> None:
    assert is_ip_literal("10.1.2.3") and is_ip_literal("2001:db8::1")
    assert not is_ip_literal("fe80::1%eth0")  # a zone: a name the node would look up
    assert not is_ip_literal("example.org")
    assert not is_ip_literal("")
    assert not is_ip_literal("1" * 46)
    assert not is_ip_literal(b"10.1.2.3")
    before = wire_addr._is_ip_literal.cache_info().currsize
    for _ in range(3):
        assert not is_ip_literal(os.urandom(8).hex())
    info = wire_addr._is_ip_literal.cache_info()
    assert info.maxsize == wire_addr._LITERALS_CACHED
    assert min(before + 3, wire_addr._LITERALS_CACHED) <= info.currsize
    assert info.currsize <= wire_addr._LITERALS_CACHED


def test_diversity_prefix_functions() -> None:
    """One cached call each: the /24 or /48 of a public address (None for private ones),
    and of any address when private ones are limited too."""
    cases = [
        ("8.8.8.8", "8.8.8.0/24", "8.8.8.0/24"),
        ("2001:4860:1:2::8888", "2001:4860:1::/48", "2001:4860:1::/48"),
        ("::ffff:8.8.4.4", "8.8.4.0/24", "8.8.4.0/24"),
        ("127.0.0.1", None, "127.0.0.0/24"),
        ("10.1.2.3", None, "10.1.2.0/24"),
        ("not-an-ip", None, "not-an-ip"),
    ]
    for ip, public, any_ in cases:
        assert hosts.public_prefix(ip) == hosts.diversity_group(ip) == public
        assert hosts.prefix_if_any(ip) == hosts.diversity_group(ip, private_too=True) == any_
