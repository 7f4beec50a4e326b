"""The presence protocol without I/O (:mod:`dhtsignal.signaling.presence`), on a manual
clock: what is published when, the tombstones, and what a get's records identify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.node import HeldRecords
from dhtsignal.dht.records import Record, RecordType, node_key, room_key
from dhtsignal.errors import PeerNotFound, PinnedKeyChanged, UsageError
from dhtsignal.identity import Identity
from dhtsignal.signaling.presence import PresenceRecords, identify

NOW = 1_700_000_000.0
ADDRS = [("192.0.2.1", 4000), ("198.51.100.7", 4001)]
ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))


def _alice(**kw: Any) -> PresenceRecords:
    return PresenceRecords(ALICE, "alice", ["lab", "ops"], claimed_at=NOW, **kw)


def test_a_publication_claims_then_presents_under_the_label_then_self_id_then_rooms() -> None:
    pres = _alice(ttl=120.0, claim_ttl=3600.0)
    pub = pres.publication(NOW, ADDRS)
    shape = [[(r.type, r.key) for r in batch] for batch in pub.batches]
    assert shape == [
        [(RecordType.CLAIM, node_key("alice")), (RecordType.PRESENCE, node_key("alice"))],
        [(RecordType.PRESENCE, node_key(ALICE.self_id))],
        [(RecordType.ROOM, room_key("lab"))],
        [(RecordType.ROOM, room_key("ops"))],
    ]
    flat = [r for batch in pub.batches for r in batch]
    assert all(r.signer == ALICE.public_key for r in flat)
    assert [r.expires for r in flat] == [NOW + 3600.0] + [NOW + 120.0] * 4
    seqs = [r.seq for r in flat]
    assert len(set(seqs)) == len(seqs) and min(seqs) == int(NOW * 1000)  # ms, one apart
    assert flat[0].fields() == {"id": "alice", "t": NOW}
    assert flat[1].fields()["a"] == [list(a) for a in ADDRS]
    assert flat[2].fields()["id"] == ALICE.self_id
    assert flat[3].fields()["room"] == "lab"
    assert pres.refresh_interval == 40.0  # a third of the 120 s lifetime


def test_the_claim_is_repeated_until_stored_then_at_half_its_lifetime() -> None:
    pres = _alice(ttl=120.0, claim_ttl=3600.0)
    first = pres.publication(NOW, ADDRS)
    assert first.claims
    assert pres.publication(NOW + 60, ADDRS).claims  # the first was never stored
    pres.published(first)
    assert not pres.publication(NOW + 60, ADDRS).claims
    assert not pres.publication(NOW + 1799, ADDRS).claims
    again = pres.publication(NOW + 1800, ADDRS)
    assert again.claims
    pres.published(again)
    assert pres.claim_due == NOW + 3600.0


def test_lifetimes_are_capped_and_must_be_positive() -> None:
    pres = _alice(ttl=1e9, claim_ttl=1e9)
    assert pres.ttl == records.MAX_TTL[RecordType.PRESENCE]
    assert pres.claim_ttl == records.MAX_TTL[RecordType.CLAIM]
    with pytest.raises(UsageError, match="positive"):
        _alice(ttl=0.0)


def test_a_self_certifying_label_is_published_once() -> None:
    pres = PresenceRecords(ALICE, ALICE.self_id, claimed_at=NOW)
    pub = pres.publication(NOW, ADDRS)
    assert [[r.key for r in b] for b in pub.batches] == [
        [node_key(ALICE.self_id)] * 2,
        [room_key("lobby")],
    ]


def test_sign_off_tombstones_every_presence_and_room_record_with_newer_seqs() -> None:
    pres = _alice(ttl=120.0)
    last = max(r.seq for b in pres.publication(NOW, ADDRS).batches for r in b)
    tombs = pres.sign_off(NOW)
    assert [(r.type, r.key) for r in tombs] == [
        (RecordType.PRESENCE, node_key("alice")),
        (RecordType.PRESENCE, node_key(ALICE.self_id)),
        (RecordType.ROOM, room_key("lab")),
        (RecordType.ROOM, room_key("ops")),
    ]
    assert all(r.is_tombstone and r.expires == NOW + 120.0 for r in tombs)
    assert min(r.seq for r in tombs) > last


def _held(recs: list[Record], support: int = 8) -> HeldRecords:
    return HeldRecords(recs, {r.signer: support for r in recs})


def test_identify_reads_the_owners_presence() -> None:
    pres = _alice(ttl=120.0)
    label_batch = pres.publication(NOW, ADDRS).batches[0]
    info = identify("alice", _held(label_batch), None, NOW + 20)
    assert info.public_key == ALICE.public_key
    assert info.self_id == ALICE.self_id
    assert info.addresses == ADDRS
    assert info.rooms == ["lab", "ops"]
    assert info.x25519 == ALICE.x25519_public
    assert info.expires_in == pytest.approx(100.0)


def test_identify_says_why_a_peer_is_not_found() -> None:
    pres = _alice(ttl=120.0)
    claim, _ = pres.publication(NOW, ADDRS).batches[0]
    with pytest.raises(PeerNotFound, match=r"^alice: unknown \(no claim"):
        identify("alice", _held([]), None, NOW)
    with pytest.raises(PeerNotFound, match=r"^alice: offline \(its presence record expired\)"):
        identify("alice", _held([claim]), None, NOW)
    tomb = pres.sign_off(NOW)[0]
    with pytest.raises(PeerNotFound, match=r"^alice: offline \(signed off\)"):
        identify("alice", _held([claim, tomb]), None, NOW)


def test_identify_refuses_a_changed_pinned_key(tmp_path: Path) -> None:
    known = KnownPeers(tmp_path / "known_peers")
    known.pin("alice", MALLORY.public_key.hex())
    label_batch = _alice().publication(NOW, ADDRS).batches[0]
    with pytest.raises(PinnedKeyChanged):
        identify("alice", _held(label_batch), known, NOW)
    assert known.get("alice") == MALLORY.public_key.hex()  # identify only reads pins


def test_a_self_certifying_id_ignores_other_keys() -> None:
    mallory = PresenceRecords(MALLORY, ALICE.self_id, claimed_at=NOW)
    forged = mallory.publication(NOW, ADDRS).batches[0]
    with pytest.raises(PeerNotFound, match="unknown"):
        identify(ALICE.self_id, _held(forged), None, NOW)


def test_the_nat_type_and_subscription_holders_travel_in_the_presence() -> None:
    pres = _alice(ttl=120.0, client_mode=True, nat="symmetric")
    holders = [("198.18.0.1", 4000), ("198.18.0.2", 4000)]
    info = identify("alice", _held(pres.publication(NOW, ADDRS, holders).batches[0]), None, NOW)
    assert info.nat == "symmetric" and info.client_mode and info.holders == holders
    assert info.to_json()["nat"] == "symmetric"
    assert info.to_json()["holders"] == [list(h) for h in holders]
    # Unknown is left out; the next publication follows a changed type.
    pres.nat = "unknown"
    info = identify("alice", _held(pres.publication(NOW + 1, ADDRS).batches[0]), None, NOW + 1)
    assert info.nat == "unknown" and info.holders == []


def test_a_bad_nat_type_or_holder_list_reads_as_unknown_and_empty() -> None:
    pres = _alice(ttl=120.0)
    for bad_nat, bad_holders in (("mystery", "x"), (7, [["h", "p"], [1, 2], "junk"])):
        payload = pres._payload(ADDRS, n=bad_nat, h=bad_holders)
        rec = records.sign(
            ALICE, RecordType.PRESENCE, node_key("alice"), payload, seq=1, expires=NOW + 60
        )
        info = identify("alice", _held([rec]), None, NOW)
        assert info.nat == "unknown" and info.holders == []
