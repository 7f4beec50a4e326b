"""Reply parsing (:mod:`dhtsignal.dht.replies`) and the rate limiter
(:mod:`dhtsignal.dht.ratelimit`), on hand-made values and a manual clock."""

from __future__ import annotations

import os
from typing import Any

import pytest

from dhtsignal.dht.lookup import Lookup
from dhtsignal.dht.ratelimit import RateLimiter
from dhtsignal.dht.replies import (
    MAX_PAGE_RECORDS,
    closer_contacts,
    collect_records,
    ping_reply,
    shaped,
    value_page,
)
from dhtsignal.dht.routing import DIALECT_DS, DIALECT_STOCK, Contact

NID = bytes(range(20))


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ([[], [b"r"], 5], ([], [b"r"], 5)),
        ([[], [], None], ([], [], None)),
        ([[], [], "5"], ([], [], None)),
        ([[], b"r", 5], None),
        ([[], []], None),
        (None, None),
        ({"a": 1}, None),
    ],
)
def test_value_page(reply: Any, parsed: Any) -> None:
    assert value_page(reply) == parsed


def test_collect_records_takes_bytes_up_to_a_page() -> None:
    found: dict[bytes, set[bytes]] = {b"a": {b"x"}}
    page: list[Any] = [b"a", 3, "s", b"b", *[bytes([i]) * 2 for i in range(100)]]
    collect_records(found, page, b"y")
    assert found[b"a"] == {b"x", b"y"}
    assert found[b"b"] == {b"y"}
    assert len(found) == 1 + sum(type(r) is bytes for r in page[1:MAX_PAGE_RECORDS])


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ([NID, ["192.0.2.1", 4000]], (NID, ("192.0.2.1", 4000))),
        ([NID, ["192.0.2.1", "4000"]], (NID, ("192.0.2.1", 4000))),
        ([NID, ["192.0.2.1", "x"]], (NID, None)),
        ([NID, None], (NID, None)),
        ([NID, ["192.0.2.1"]], (NID, None)),
        ([NID[:19], ["192.0.2.1", 4000]], None),
        (["id", ["192.0.2.1", 4000]], None),
        ([NID], None),
        (NID, None),
    ],
)
def test_ping_reply(reply: Any, parsed: Any) -> None:
    assert ping_reply(reply) == parsed


def test_closer_contacts_skips_known_and_malformed() -> None:
    target = bytes(20)
    known = Contact(b"\x01" * 20, "10.0.0.1", 1, DIALECT_DS)
    lk = Lookup(target, [known], k=20, alpha=3, peer_timeout=1.0, own_id=os.urandom(20))
    fresh = Contact(b"\x02" * 20, "10.0.0.2", 2, DIALECT_DS)
    stock = [b"\x03" * 20, "10.0.0.3", 3]
    items: list[Any] = [known.wire(), fresh.wire(), stock, [b"\x04" * 20, "10.0.0.4"], "x", []]
    out = closer_contacts(lk, items, 40)
    assert [(c.id, c.addr, c.dialect) for c in out] == [
        (fresh.id, fresh.addr, DIALECT_DS),
        (b"\x03" * 20, ("10.0.0.3", 3), DIALECT_STOCK),
    ]
    assert [c.id for c in closer_contacts(lk, items, 2)] == [fresh.id]


def test_shaped() -> None:
    assert shaped([b"r", ["h", 1]], [bytes, [str, int]])
    assert not shaped([b"r", ["h", "1"]], [bytes, [str, int]])
    assert not shaped([b"r", ["h", 1, 2]], [bytes, [str, int]])
    assert not shaped((b"r", ["h", 1]), [bytes, [str, int]])


def test_rate_limiter_buckets_refill_on_a_manual_clock() -> None:
    rl = RateLimiter(rate=2.0, burst=3.0, max_entries=100)
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    assert [rl.admit(a, 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.admit(b, 0.0)  # another source has its own bucket
    assert not rl.admit(a, 0.25)  # half a token: still none
    assert rl.admit(a, 0.5)  # 0.25 s more: one token
    assert not rl.admit(a, 0.5)
    assert rl.sources() == [a, b]
    rl.prune(1.0)  # b refilled (1 token taken, 2/s), a has not
    assert rl.sources() == [a]
    rl.prune(10.0)
    assert len(rl) == 0


def test_rate_limiter_is_bounded() -> None:
    rl = RateLimiter(rate=1.0, burst=2.0, max_entries=3)
    for i in range(10):
        assert rl.admit(("10.0.0.1", i), 0.0)
    assert len(rl) == 3  # the oldest evicted as new sources arrive
    assert rl.sources() == [("10.0.0.1", i) for i in (7, 8, 9)]


def test_rate_limiter_without_a_rate_admits_everything() -> None:
    rl = RateLimiter(rate=0.0, burst=1.0, max_entries=1)
    assert all(rl.admit(("10.0.0.1", 1), 0.0) for _ in range(100))
    assert len(rl) == 0


def test_a_refilled_entry_makes_room_for_a_new_source() -> None:
    rl = RateLimiter(rate=1.0, burst=2.0, max_entries=100)
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    rl.admit(a, 0.0)
    rl.admit(b, 0.5)  # a not yet refilled: kept
    assert rl.sources() == [a, b]
    rl.admit(("10.0.0.3", 3), 1.0)  # a refilled (1 token at 1/s): dropped
    assert rl.sources() == [b, ("10.0.0.3", 3)]


def test_ping_reply_ignores_a_seen_address_of_the_wrong_shape() -> None:
    nid = bytes(20)
    assert ping_reply([nid, ["1.2.3.4", 5]]) == (nid, ("1.2.3.4", 5))
    for seen in (["1.2.3.4", float("inf")], ["1.2.3.4", float("nan")], ["h", 70000], ["h", 0]):
        assert ping_reply([nid, seen]) == (nid, None)
