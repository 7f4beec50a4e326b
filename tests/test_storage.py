"""What a node keeps for others: slots, seq order, first claim wins, every bound."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhtsignal.dht import records
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType, node_key
from dhtsignal.dht.routing import Contact, RoutingTable
from dhtsignal.dht.rpc import RequestHandler
from dhtsignal.dht.storage import LegacyStore, RecordStore, StorageLimits, Subscriptions
from dhtsignal.errors import RecordRejected, StoreLimitExceeded
from dhtsignal.identity import Identity
from dhtsignal.wire import codec

if TYPE_CHECKING:
    from conftest import StartDht

NOW = 1_700_000_000.0
A = Identity(bytes([1]) * 32)
B = Identity(bytes([2]) * 32)
C = Identity(bytes([3]) * 32)
SRC = ("192.0.2.1", 4000)
SRC2 = ("192.0.2.2", 4000)
KEY = records.data_key("k")


def data(
    who: Identity,
    seq: int = 1,
    *,
    key: bytes = KEY,
    payload: bytes = b"v",
    sub: bytes = b"",
    ttl: float = 60.0,
    record_type: RecordType = RecordType.DATA,
    tombstone: bool = False,
) -> Record:
    return records.sign(
        who, record_type, key, payload, seq=seq, expires=NOW + ttl, sub=sub, tombstone=tombstone
    )


def node_record(
    who: Identity, record_type: RecordType, label: str, seq: int = 1, ttl: float = 60.0
) -> Record:
    return data(
        who,
        seq,
        key=node_key(label),
        payload=codec.pack({"id": label}),
        ttl=ttl,
        record_type=record_type,
    )


def limits(**kw: Any) -> StorageLimits:
    return dataclasses.replace(StorageLimits(), **kw)


def refused(fn: object, *args: object) -> str:
    with pytest.raises(RecordRejected) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


# -- slots and sequence numbers -------------------------------------------------------------


def test_one_slot_per_signer_type_and_sub() -> None:
    st_ = RecordStore(StorageLimits(max_slots_per_signer=4))  # the default is 2
    held = [
        data(A),
        data(B),
        data(A, sub=b"session-1"),
        data(A, sub=b"session-2"),
        data(A, record_type=RecordType.INBOX),
    ]
    for rec in held:
        assert st_.put(rec, SRC, NOW) is True
    assert len(st_) == 5
    assert {r.slot for r in st_.get(KEY, NOW)} == {r.slot for r in held}
    assert st_.total_bytes == sum(len(r.raw) for r in held)


def test_higher_seq_replaces_lower_and_equal_are_refused() -> None:
    st_ = RecordStore(StorageLimits())
    assert st_.put(data(A, 5, payload=b"five"), SRC, NOW)
    assert st_.put(data(A, 7, payload=b"seven"), SRC, NOW)
    assert [r.payload for r in st_.get(KEY, NOW)] == [b"seven"]
    assert len(st_) == 1
    assert refused(st_.put, data(A, 6), SRC, NOW) == "stale-seq"
    assert refused(st_.put, data(A, 7, payload=b"other"), SRC, NOW) == "stale-seq"
    # The very same record again is a harmless repeat, not new.
    assert st_.put(data(A, 7, payload=b"seven"), SRC2, NOW) is False
    assert [r.payload for r in st_.get(KEY, NOW)] == [b"seven"]
    assert st_.total_bytes == len(data(A, 7, payload=b"seven").raw)


def test_tombstone_replaces_its_slot_and_blocks_older_values() -> None:
    st_ = RecordStore(StorageLimits())
    st_.put(data(A, 1), SRC, NOW)
    st_.put(data(B, 1), SRC, NOW)
    assert st_.put(data(A, 2, tombstone=True), SRC, NOW)
    got = {r.signer: r for r in st_.get(KEY, NOW)}
    assert got[A.public_key].is_tombstone and got[A.public_key].payload == b""
    assert not got[B.public_key].is_tombstone
    assert refused(st_.put, data(A, 1), SRC, NOW) == "stale-seq"  # a replay cannot resurrect
    assert st_.put(data(A, 3, payload=b"back"), SRC, NOW)  # the owner can, with a higher seq


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 2]), st.integers(0, 6), st.booleans()), max_size=30)
)
def test_each_slot_holds_the_highest_seq_ever_accepted(ops: list[tuple[int, int, bool]]) -> None:
    who = [A, B, C]
    st_ = RecordStore(StorageLimits())
    best: dict[bytes, int] = {}
    for signer, seq, tomb in ops:
        rec = data(who[signer], seq, payload=b"" if tomb else bytes([seq]), tombstone=tomb)
        prev = best.get(rec.signer)
        try:
            st_.put(rec, SRC, NOW)
        except RecordRejected as exc:
            assert exc.reason == "stale-seq"
            assert prev is not None and seq <= prev
            continue
        assert prev is None or seq >= prev
        best[rec.signer] = seq
    held = {r.signer: r.seq for r in st_.get(KEY, NOW)}
    assert held == best
    assert st_.total_bytes == sum(len(r.raw) for r in st_.get(KEY, NOW))


# -- node IDs: the first live claim wins ----------------------------------------------------


@pytest.mark.parametrize("first", [RecordType.CLAIM, RecordType.PRESENCE])
@pytest.mark.parametrize("second", [RecordType.CLAIM, RecordType.PRESENCE])
def test_first_live_claim_wins_until_it_expires(first: RecordType, second: RecordType) -> None:
    st_ = RecordStore(StorageLimits())
    assert st_.put(node_record(A, first, "alice", ttl=60), SRC, NOW)
    assert st_.owner(node_key("alice"), NOW) == A.public_key
    assert refused(st_.put, node_record(B, second, "alice", ttl=60), SRC2, NOW) == "id-taken"
    # The owner keeps refreshing and adding its other record record_type.
    assert st_.put(node_record(A, first, "alice", seq=2, ttl=60), SRC, NOW + 30)
    other = RecordType.PRESENCE if first == RecordType.CLAIM else RecordType.CLAIM
    assert st_.put(node_record(A, other, "alice", ttl=10), SRC, NOW + 30)
    assert refused(st_.put, node_record(B, second, "alice", ttl=90), SRC2, NOW + 50) == "id-taken"
    # Another label is free; other record types under a node key are refused.
    assert st_.put(node_record(B, second, "bob"), SRC2, NOW + 50)
    assert refused(st_.put, data(B, key=node_key("alice")), SRC2, NOW + 50) == "wrong-type"
    # Once every claim of A has expired (refreshed one: NOW + 30 + 60), B may take the label.
    later = NOW + 91
    assert st_.owner(node_key("alice"), later) is None
    assert st_.put(node_record(B, second, "alice", ttl=200), SRC2, later)
    assert st_.owner(node_key("alice"), later) == B.public_key
    assert refused(st_.put, node_record(A, first, "alice", seq=3, ttl=200), SRC, later) == (
        "id-taken"
    )


def test_tombstones_release_a_claim_but_cannot_be_forged_by_others() -> None:
    st_ = RecordStore(StorageLimits())
    key = node_key("alice")
    st_.put(node_record(A, RecordType.CLAIM, "alice"), SRC, NOW)
    tomb_b = data(B, 5, key=key, record_type=RecordType.CLAIM, payload=b"", tombstone=True)
    assert refused(st_.put, tomb_b, SRC2, NOW) == "id-taken"
    st_.put(
        data(A, 2, key=key, record_type=RecordType.CLAIM, payload=b"", tombstone=True), SRC, NOW
    )
    assert st_.owner(key, NOW) is None
    assert st_.put(node_record(B, RecordType.CLAIM, "alice"), SRC2, NOW)


# -- bounds ---------------------------------------------------------------------------------


def test_values_per_key_are_capped_but_slots_can_still_be_updated() -> None:
    st_ = RecordStore(limits(max_values_per_key=2))
    st_.put(data(A), SRC, NOW)
    st_.put(data(B), SRC, NOW)
    assert refused(st_.put, data(C), SRC, NOW) == "key-full"
    assert st_.put(data(A, 2), SRC, NOW)
    assert st_.put(data(C, key=records.data_key("other")), SRC, NOW)
    assert len(st_) == 3


def test_a_signers_third_slot_under_one_key_is_refused() -> None:
    inbox = records.inbox_key(B.public_key)
    st_ = RecordStore(limits())
    assert st_.limits.max_slots_per_signer == 2

    def slot(who: Identity, sub: bytes, seq: int = 1) -> Record:
        return data(who, seq, key=inbox, sub=sub, record_type=RecordType.INBOX)

    assert st_.put(slot(A, b"s1"), SRC, NOW)
    assert st_.put(slot(A, b"s2"), SRC, NOW)
    assert refused(st_.put, slot(A, b"s3"), SRC, NOW) == "signer-full"
    assert refused(st_.put, slot(A, b"s3"), SRC2, NOW) == "signer-full"  # any source
    assert st_.put(slot(A, b"s2", seq=2), SRC, NOW)  # its own slots still update
    assert st_.put(slot(C, b"s3"), SRC, NOW)  # other signers are not crowded out
    assert st_.put(slot(A, b"s3"), SRC, NOW + 61)  # once its slots expire, room again
    # A node ID's claim and presence are one signer's two slots.
    st2 = RecordStore(limits())
    assert st2.put(node_record(A, RecordType.CLAIM, "alice"), SRC, NOW)
    assert st2.put(node_record(A, RecordType.PRESENCE, "alice"), SRC, NOW)


def test_records_per_source_quota() -> None:
    st_ = RecordStore(limits(max_records_per_source=2))
    st_.put(data(A), SRC, NOW)
    st_.put(data(B), SRC, NOW)
    assert refused(st_.put, data(C), SRC, NOW) == "quota"
    assert st_.put(data(C), SRC2, NOW)  # another source has its own quota
    assert len(st_) == 3


def test_a_source_at_its_quota_can_still_refresh_its_records() -> None:
    """Replacing a record one already holds grows nothing: refreshes must not hit the quota."""
    st_ = RecordStore(limits(max_records_per_source=2))
    st_.put(data(A), SRC, NOW)
    st_.put(data(B), SRC, NOW)
    assert st_.put(data(A, 2), SRC, NOW)
    assert st_.put(data(B, 2, tombstone=True), SRC, NOW)
    assert len(st_) == 2


def test_bytes_per_source_quota() -> None:
    one = len(data(A).raw)
    st_ = RecordStore(limits(max_bytes_per_source=2 * one + one // 2))
    st_.put(data(A), SRC, NOW)
    st_.put(data(B), SRC, NOW)
    assert refused(st_.put, data(C), SRC, NOW) == "quota"
    assert st_.put(data(C), SRC2, NOW)
    # The byte quota also holds for a source's first record.
    tiny = RecordStore(limits(max_bytes_per_source=one - 1))
    assert refused(tiny.put, data(A), SRC, NOW) == "quota"
    assert len(tiny) == 0


def test_total_caps() -> None:
    st_ = RecordStore(limits(max_keys=2))
    st_.put(data(A, key=records.data_key("1")), SRC, NOW)
    st_.put(data(A, key=records.data_key("2")), SRC, NOW)
    assert refused(st_.put, data(A, key=records.data_key("3")), SRC, NOW) == "store-full"
    assert st_.put(data(B, key=records.data_key("2")), SRC, NOW)  # an existing key has room

    one = len(data(A).raw)
    st2 = RecordStore(limits(max_bytes=2 * one))
    st2.put(data(A), SRC, NOW)
    st2.put(data(B), SRC2, NOW)
    assert refused(st2.put, data(C), ("192.0.2.3", 1), NOW) == "store-full"
    assert st2.total_bytes == 2 * one


def test_expiry_frees_every_count() -> None:
    st_ = RecordStore(limits(max_records_per_source=3, max_keys=3))
    st_.put(data(A, ttl=10), SRC, NOW)
    st_.put(data(B, ttl=20, key=records.data_key("x")), SRC, NOW)
    st_.put(data(C, ttl=30), SRC, NOW)
    assert refused(st_.put, data(A, key=records.data_key("y")), SRC, NOW) == "quota"
    assert st_.get(KEY, NOW + 10) == [data(C, ttl=30)]  # lazily dropped on access
    assert st_.expire(NOW + 25) == 1
    assert len(st_) == 1 and st_.total_bytes == len(data(C, ttl=30).raw)
    assert st_.dump(NOW + 25) == [(data(C, ttl=30).raw, SRC)]
    assert st_.expire(NOW + 30) == 1
    assert (len(st_), st_.total_bytes, list(st_.keys())) == (0, 0, [])
    assert st_._usage == {}
    for i in range(3):
        assert st_.put(data(A, key=records.data_key(str(i))), SRC, NOW + 30)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.integers(0, 2),  # signer
            st.integers(0, 3),  # key
            st.integers(0, 3),  # seq
            st.integers(0, 1),  # source
            st.integers(1, 40),  # ttl
            st.integers(0, 30),  # clock step
        ),
        max_size=40,
    )
)
def test_accounting_matches_what_is_held(ops: list[tuple[int, int, int, int, int, int]]) -> None:
    lim = limits(max_values_per_key=2, max_records_per_source=4, max_keys=3)
    st_ = RecordStore(lim)
    who = [A, B, C]
    now = NOW
    for signer, key, seq, src, ttl, step in ops:
        now += step
        rec = records.sign(
            who[signer],
            RecordType.DATA,
            records.data_key(str(key)),
            b"",
            seq=seq,
            expires=now + ttl,
        )
        try:
            st_.put(rec, [SRC, SRC2][src], now)
        except RecordRejected as exc:
            assert exc.reason in ("stale-seq", "key-full", "quota", "store-full")
        st_.expire(now)
        held = [(raw, source) for raw, source in st_.dump(now)]
        assert st_.total_bytes == sum(len(raw) for raw, _ in held)
        assert len(st_) == len(held)
        for source in (SRC, SRC2):
            mine = [raw for raw, s in held if s == source]
            assert len(mine) <= lim.max_records_per_source
            hb, hr, _, _ = st_.usage(source)
            assert hr == len(mine)
            assert hb == sum(map(len, mine))
        # SRC and SRC2 share a /24: the prefix holds what both hosts hold
        assert st_.usage(SRC)[3] == len(held) and st_.usage(SRC)[2] == st_.total_bytes
        assert len(list(st_.keys())) <= lim.max_keys
        for k in list(st_.keys()):
            assert len(st_.get(k, now)) <= lim.max_values_per_key


# -- subscriptions ----------------------------------------------------------------------------


def test_subscription_ttl_is_clamped_and_expires() -> None:
    subs = Subscriptions(limits(max_listen_ttl=120.0))
    assert subs.add(KEY, SRC, 1e9, NOW) == 120.0
    assert subs.add(KEY, SRC2, -5, NOW) == 1.0
    assert subs.add(records.data_key("nan"), SRC2, float("nan"), NOW) == 1.0
    assert sorted(subs.listeners(KEY, NOW + 0.5)) == [SRC, SRC2]
    assert subs.listeners(KEY, NOW + 1.0) == [SRC]
    assert subs.listeners(KEY, NOW + 120.0) == []
    subs.expire(NOW + 120.0)
    assert len(subs) == 0
    assert subs._per_source == {}


def test_subscriptions_are_bounded_per_key_and_per_source() -> None:
    subs = Subscriptions(limits(max_listeners_per_key=2, max_listens_per_source=3))
    subs.add(KEY, ("10.0.0.1", 1), 60, NOW)
    subs.add(KEY, ("10.0.0.2", 1), 60, NOW)
    assert refused(subs.add, KEY, ("10.0.0.3", 1), 60, NOW) == "listen-full"
    assert subs.add(KEY, ("10.0.0.1", 1), 90, NOW) == 90  # a refresh is not a new listener
    for i in range(2):
        subs.add(records.data_key(str(i)), SRC, 60, NOW)
    subs.add(records.data_key("2"), SRC, 60, NOW)
    assert refused(subs.add, records.data_key("3"), SRC, 60, NOW) == "listen-full"
    subs.add(records.data_key("2"), SRC, 60, NOW)  # refresh still fine
    subs.remove(records.data_key("0"), SRC)
    assert subs.add(records.data_key("3"), SRC, 60, NOW) == 60  # the freed place is usable
    subs.remove(records.data_key("never"), SRC)  # unknown: nothing happens
    assert len(subs) == 2 + 3
    # Expiry gives a source its places back too.
    subs.expire(NOW + 61)
    assert len(subs) == 1  # the 90 s refresh of 10.0.0.1
    for i in range(3):
        subs.add(records.data_key(f"new{i}"), SRC, 60, NOW + 61)
    assert subs._per_source[SRC[0]] == 3


# -- legacy values from stock kademlia nodes --------------------------------------------------


def test_legacy_store_validates_keys_and_values() -> None:
    leg = LegacyStore(limits(legacy_max_value=10))
    k = b"k" * 20
    for bad_key in (b"short", "k" * 20, 5):
        assert refused(leg.put, bad_key, b"v", NOW) == "bad-legacy"
    # A string is measured in UTF-8 bytes, not characters: four "é" are 8 bytes, six 12.
    for bad_value in (None, [1], {"a": 1}, b"x" * 11, "y" * 11, "é" * 6, "\U0001f600" * 3):
        assert refused(leg.put, k, bad_value, NOW) == "bad-legacy"
    for good in (b"x" * 10, "text", "é" * 5, 7, 1.5, True):
        leg.put(k, good, NOW)
        assert leg.get(k, NOW) == good  # last writer wins
    assert len(leg) == 1


def test_legacy_store_is_bounded_and_expires() -> None:
    leg = LegacyStore(limits(legacy_max_keys=3, legacy_ttl=100.0))
    keys = [bytes([i]) * 20 for i in range(5)]
    for i, k in enumerate(keys[:3]):
        leg.put(k, i, NOW)
    leg.put(keys[0], "again", NOW + 10)  # rewriting makes it the newest
    leg.put(keys[3], 3, NOW + 10)
    assert len(leg) == 3
    assert leg.get(keys[1], NOW + 10) is None  # the oldest write was evicted
    assert leg.get(keys[0], NOW + 10) == "again"
    assert leg.get(keys[2], NOW + 99) == 2
    assert leg.get(keys[2], NOW + 100) is None  # its TTL ran out
    assert dict(leg.items(NOW + 100)) == {keys[0]: "again", keys[3]: 3}
    leg.expire(NOW + 110)
    assert len(leg) == 0


# -- serving what is held -----------------------------------------------------------------------


def test_a_held_record_is_served_next_to_a_full_contact_list() -> None:
    own = bytes(20)
    table = RoutingTable(own)
    for i in range(20):
        table.add_contact(Contact(bytes([i + 1]) * 20, f"10.0.0.{i}", 4000 + i))
    lim = StorageLimits()
    store = RecordStore(lim)
    handler = RequestHandler(
        own, "dhtsignal/1", table, store, LegacyStore(lim), Subscriptions(lim), lambda: NOW
    )
    big = data(A, payload=b"x" * 900)
    store.put(big, SRC, NOW)

    served: list[bytes] = []
    cursor: int | None = 0
    for _ in range(4):  # follow the pages as DhtNode does
        assert cursor is not None
        req = codec.Request(bytes(20), "ds_find_value", ["dhtsignal/1", bytes(20), 1, KEY, cursor])
        _, page, nxt = handler.handle(req, ("10.9.9.9", 9), 0.0).result()
        served.extend(page)
        if type(nxt) is not int or nxt <= cursor:
            break
        cursor = nxt
    assert served == [big.raw]


# -- limits, as the writer sees them over the network ---------------------------------------


async def test_a_put_past_a_storage_limit_names_the_limit(dht: StartDht) -> None:
    """Four real nodes with small limits: the writer's third record is refused by every
    storing node for its source quota, the third signer under one key for the per-key cap;
    each caller gets StoreLimitExceeded naming the limit, and what was stored stays."""
    small = NodeConfig(limits=limits(max_records_per_source=2, max_values_per_key=2))
    nodes = await dht(4, config=small)
    writer = nodes[1]
    now = time.time()
    ident = Identity.generate()

    def rec(i: int, who: Identity = ident, key: bytes | None = None) -> Record:
        k = key or records.data_key(f"quota-{i}")
        return records.sign(who, RecordType.DATA, k, b"v%d" % i, seq=1, expires=now + 60)

    for i in range(2):
        assert (await writer.put([rec(i)])).stored >= 3
    with pytest.raises(StoreLimitExceeded) as exc:
        await writer.put([rec(2)])
    assert exc.value.limit == "quota"
    assert "max_records_per_source" in str(exc.value)
    assert [r.payload for r in await nodes[3].get(records.data_key("quota-1"))] == [b"v1"]

    # Every node here sends from 127.0.0.1, one host: its quota is used up for all of
    # them (quotas count hosts, not ports). A second cluster shows the per-key cap.
    nodes = await dht(4, config=NodeConfig(limits=limits(max_values_per_key=2)))
    shared = records.data_key("crowded")
    for i, n in enumerate((nodes[0], nodes[2])):
        await n.put([rec(10 + i, Identity.generate(), shared)])
    with pytest.raises(StoreLimitExceeded) as exc:
        await nodes[3].put([rec(12, Identity.generate(), shared)])
    assert exc.value.limit == "key-full"
    assert "max_values_per_key" in str(exc.value)
    assert len(await nodes[1].get(shared)) == 2


async def test_a_put_stores_on_the_k_closest_with_one_rpc_per_node_asked(dht: StartDht) -> None:
    """A put's lookup stores as it goes (ds_store_find): each node it asks answers once,
    no separate store follows, and the k closest of all nodes hold the record."""
    nodes = await dht(24)
    writer = nodes[5]
    rec = records.sign(
        Identity.generate(),
        RecordType.DATA,
        records.data_key("k-closest"),
        b"v",
        seq=1,
        expires=time.time() + 60,
    )

    def calls(name: str) -> int:
        return sum(n.stats["rpc:" + name] for n in nodes)

    before = calls("ds_store_find")
    res = await writer.put([rec])
    asked = calls("ds_store_find") - before
    assert calls("ds_store") == 0
    remote = res.stored - (1 if writer.store.get(rec.key, time.time()) else 0)  # own copy
    assert asked >= remote == writer.config.replicas
    target = int.from_bytes(rec.key, "big")
    others = sorted((n for n in nodes if n is not writer), key=lambda n: n.table.own_long ^ target)
    closest = others[: writer.config.replicas]
    assert all(n.store.get(rec.key, time.time()) for n in closest)
    spare = sum(1 for n in others[writer.config.replicas :] if n.store.get(rec.key, time.time()))
    assert spare == writer.stats["put:spare-copies"] == asked - remote


def test_records_are_bound_to_the_kind_of_key_they_live_under() -> None:
    """64 DATA records from throwaway keys under a label's key before its owner claims
    it: the owner's claim is stored all the same (the junk is dropped: a claim proves
    the key is a node key), and DATA under it is refused from then on."""
    st_ = RecordStore(limits(max_values_per_key=64))
    key = node_key("alice")
    for i in range(64):
        junk = data(Identity.generate(), 1, key=key, payload=b"junk %d" % i)
        assert st_.put(junk, (f"198.51.100.{i % 200 + 1}", 1), NOW)
    assert refused(st_.put, data(Identity.generate(), 1, key=key), SRC2, NOW) == "key-full"
    assert st_.put(node_record(A, RecordType.CLAIM, "alice"), SRC, NOW)
    assert st_.put(node_record(A, RecordType.PRESENCE, "alice"), SRC, NOW)
    assert {r.type for r in st_.get(key, NOW)} == {RecordType.CLAIM, RecordType.PRESENCE}
    assert st_.evicted == 64 and len(st_) == 2
    assert refused(st_.put, data(Identity.generate(), 1, key=key), SRC2, NOW) == "wrong-type"
