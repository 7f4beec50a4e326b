"""Signed records: round trips, tamper refusal, size/TTL bounds, key binding."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from dhtsignal.dht import records
from dhtsignal.dht.records import (
    CLOCK_SKEW,
    MAX_RECORD,
    MAX_TTL,
    TOMBSTONE,
    RecordType,
    node_key,
    room_key,
)
from dhtsignal.errors import RecordRejected
from dhtsignal.identity import Identity, verify
from dhtsignal.wire import codec

NOW = 1_700_000_000.0
ALICE = Identity(bytes(range(32)))
MALLORY = Identity(bytes(range(1, 33)))


def _forge(
    identity: Identity,
    fields: list[Any],
    *,
    signed_fields: list[Any] | None = None,
    network: str = records.DEFAULT_NETWORK,
) -> bytes:
    """Encode ``[version, network, rtype, key, signer, sub, seq, expires, payload]`` plus a
    signature by ``identity`` over ``signed_fields`` (default: the same fields), bypassing
    every check of :func:`records.sign`. The fields are given without the network, which
    is inserted (``network``).
    """
    version, rtype, key, signer, sub, seq, expires, payload = signed_fields or fields
    signed = [version, network, rtype, key, signer, sub, seq, expires, payload]
    sig = identity.sign(records._SIG_DOMAIN + codec.pack(signed))
    return codec.pack([fields[0], network, *fields[1:], sig])


def _claim(identity: Identity, label: str, *, seq: int = 1, ttl: float = 600.0) -> records.Record:
    return records.sign(
        identity,
        RecordType.CLAIM,
        node_key(label),
        codec.pack({"id": label}),
        seq=seq,
        expires=NOW + ttl,
    )


record_types = st.sampled_from(list(RecordType))
payloads = st.binary(max_size=600)
subs = st.binary(max_size=records.MAX_SUB)
seqs = st.one_of(
    st.sampled_from([0, 1, 127, 128, 255, 256, 1000, 32767, 40000, 2**31, 2**32 + 5, 2**63 - 1]),
    st.integers(0, records.MAX_SEQ),
)


@settings(max_examples=60, deadline=None)
@given(
    record_type=record_types,
    key=st.binary(min_size=20, max_size=20),
    payload=payloads,
    sub=subs,
    seq=seqs,
    ttl=st.floats(1.0, 3600.0),
    tombstone=st.booleans(),
)
def test_sign_decode_round_trip(
    record_type: RecordType,
    key: bytes,
    payload: bytes,
    sub: bytes,
    seq: int,
    ttl: float,
    tombstone: bool,
) -> None:
    rec = records.sign(
        ALICE, record_type, key, payload, seq=seq, expires=NOW + ttl, sub=sub, tombstone=tombstone
    )
    back = records.decode(rec.raw)
    assert back == rec
    assert back.signer == ALICE.public_key
    assert back.type == record_type
    assert back.is_tombstone is tombstone
    assert back.payload == (b"" if tombstone else payload)
    assert back.slot == (ALICE.public_key, int(record_type), sub)
    assert len(rec.raw) <= MAX_RECORD


@st.composite
def record_and_change(draw: st.DrawFn) -> tuple[bytes, int, int]:
    seq = draw(seqs)
    record_type = draw(record_types)
    payload = draw(st.binary(max_size=64))
    rec = records.sign(
        ALICE, record_type, records.data_key("x"), payload, seq=seq, expires=NOW + 60
    )
    pos = draw(st.integers(0, len(rec.raw) - 1))
    mask = draw(st.integers(1, 255))
    return rec.raw, pos, mask


@settings(max_examples=400, deadline=None)
@given(record_and_change())
def test_every_single_byte_change_is_refused(case: tuple[bytes, int, int]) -> None:
    raw, pos, mask = case
    changed = bytearray(raw)
    changed[pos] ^= mask
    with pytest.raises(RecordRejected):
        records.decode(bytes(changed))


@pytest.mark.parametrize(
    ("seq", "pos_of", "mask"),
    [
        # version 2 (0x02) -> True (0xc3): msgpack reads a bool, which is not a version.
        (1, lambda raw: 1, 0x02 ^ 0xC3),
        # seq 1000 as uint16 (0xcd) -> int16 (0xd1): same value, same signed content.
        (1000, lambda raw: raw.index(b"\xcd\x03\xe8"), 0xCD ^ 0xD1),
        # seq 100000 as uint32 (0xce) -> int32 (0xd2).
        (100_000, lambda raw: raw.index(b"\xce\x00\x01\x86\xa0"), 0xCE ^ 0xD2),
    ],
)
def test_alternative_encodings_of_the_same_content_are_refused(
    seq: int, pos_of: Any, mask: int
) -> None:
    """Regression: these single-byte changes used to decode to an accepted record."""
    rec = records.sign(ALICE, RecordType.DATA, records.data_key("x"), b"", seq=seq, expires=NOW)
    changed = bytearray(rec.raw)
    changed[pos_of(rec.raw)] ^= mask
    assert codec.unpack(bytes(changed))[6] == seq or seq == 1  # same value, other bytes
    with pytest.raises(RecordRejected) as info:
        records.decode(bytes(changed))
    assert info.value.reason in ("malformed", "bad-version")


def test_records_of_another_network_or_version_1_are_refused_and_counted() -> None:
    key = records.data_key("x")
    mine = records.sign(ALICE, RecordType.DATA, key, b"v", seq=1, expires=NOW + 60)
    other = records.sign(
        ALICE, RecordType.DATA, key, b"v", seq=1, expires=NOW + 60, network="other-net"
    )
    assert mine.network == records.DEFAULT_NETWORK and other.network == "other-net"
    assert records.decode(other.raw, "other-net") == other
    # Version 1 had no network: the same fields, signed as version 1 records were.
    v1_fields = [1, RecordType.DATA, key, ALICE.public_key, b"", 1, NOW + 60, b"v"]
    v1_sig = ALICE.sign(b"dhtsignal/record/v1\x00" + codec.pack(v1_fields))
    v1 = codec.pack([*v1_fields, v1_sig])
    counts: Counter[str] = Counter()
    out = records.check_all([mine.raw, other.raw, v1], NOW, counts)
    assert out == [mine, "wrong-network", "bad-version"]
    assert counts == Counter({"refused:wrong-network": 1, "refused:bad-version": 1})
    # The network id is signed: a record relabelled for another network does not verify.
    swapped = other.raw.replace(b"other-net", b"dhtsignl/")
    assert records.check_all([swapped], NOW, network="dhtsignl/") == ["bad-signature"]


def test_truncated_or_extended_records_are_refused() -> None:
    rec = records.sign(ALICE, RecordType.DATA, records.data_key("x"), b"abc", seq=1, expires=NOW)
    for cut in range(len(rec.raw)):
        with pytest.raises(RecordRejected):
            records.decode(rec.raw[:cut])
    with pytest.raises(RecordRejected):
        records.decode(rec.raw + b"\x00")


@pytest.mark.parametrize("bad", [None, 5, "text", [b"x"], bytearray(b"\x99")])
def test_non_bytes_are_refused_as_malformed(bad: object) -> None:
    with pytest.raises(RecordRejected) as info:
        records.decode(bad)
    assert info.value.reason == "malformed"


def test_wrong_signer_or_swapped_signature_is_refused() -> None:
    key = records.data_key("x")
    fields = [2, RecordType.DATA, key, ALICE.public_key, b"", 1, NOW + 60, b"pay"]
    # Signed by Mallory but claiming Alice as signer.
    with pytest.raises(RecordRejected) as info:
        records.decode(_forge(MALLORY, fields))
    assert info.value.reason == "bad-signature"
    # Alice's signature over other content (seq 1) reused for seq 2.
    fields2 = [*fields[:5], 2, *fields[6:]]
    with pytest.raises(RecordRejected) as info:
        records.decode(_forge(ALICE, fields2, signed_fields=fields))
    assert info.value.reason == "bad-signature"
    # The honest version decodes.
    assert records.decode(_forge(ALICE, fields)).seq == 1


def test_oversized_records_are_refused() -> None:
    key = records.data_key("big")
    with pytest.raises(RecordRejected) as info:
        records.sign(ALICE, RecordType.DATA, key, b"x" * MAX_RECORD, seq=1, expires=NOW)
    assert info.value.reason == "oversized"
    # Find the largest payload that fits: it is accepted, one byte more is not.
    base = len(records.sign(ALICE, RecordType.DATA, key, b"", seq=1, expires=NOW).raw)
    size = MAX_RECORD - base  # the bin header grows by 2 bytes past 255: try a few below
    while True:
        try:
            fits = records.sign(ALICE, RecordType.DATA, key, b"x" * size, seq=1, expires=NOW)
            break
        except RecordRejected:
            size -= 1
    assert MAX_RECORD - 2 <= len(fits.raw) <= MAX_RECORD
    assert records.decode(fits.raw) == fits
    with pytest.raises(RecordRejected):
        records.sign(ALICE, RecordType.DATA, key, b"x" * (size + 1), seq=1, expires=NOW)
    # A forged record past the limit is refused before any other work.
    fields = [2, RecordType.DATA, key, ALICE.public_key, b"", 1, NOW, b"x" * (size + 50)]
    with pytest.raises(RecordRejected) as info:
        records.decode(_forge(ALICE, fields))
    assert info.value.reason == "oversized"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([3, 5, b"k" * 20, None, b"", 1, NOW, b""], "bad-version"),
        ([2, 99, b"k" * 20, None, b"", 1, NOW, b""], "bad-type"),
        ([2, 5, b"k" * 19, None, b"", 1, NOW, b""], "malformed"),
        ([2, 5, b"k" * 20, None, b"s" * 17, 1, NOW, b""], "malformed"),
        ([2, 5, b"k" * 20, None, b"", -1, NOW, b""], "malformed"),
        ([2, 5, b"k" * 20, None, b"", 1, int(NOW), b""], "malformed"),
        ([2, 5, b"k" * 20, None, b"", 1, NOW, "text"], "malformed"),
        ([2, 5 | TOMBSTONE, b"k" * 20, None, b"", 1, NOW, b"payload"], "malformed"),
        ([2, 5, b"k" * 20, None, b"", 1, float("nan"), b""], "malformed"),
        ([2, 5, b"k" * 20, None, b"", 1, float("inf"), b""], "malformed"),
    ],
)
def test_bad_fields_are_refused_even_when_signed(fields: list[Any], reason: str) -> None:
    fields[3] = ALICE.public_key
    with pytest.raises(RecordRejected) as info:
        records.decode(_forge(ALICE, fields))
    assert info.value.reason == reason


def test_sign_refuses_bad_fields() -> None:
    for kwargs in (
        {"key": b"short"},
        {"sub": b"s" * 17},
        {"seq": -1},
        {"expires": float("nan")},
    ):
        args: dict[str, Any] = {"key": b"k" * 20, "sub": b"", "seq": 1, "expires": NOW}
        args.update(kwargs)
        key = args.pop("key")
        with pytest.raises(RecordRejected) as info:
            records.sign(ALICE, RecordType.DATA, key, b"", **args)
        assert info.value.reason == "bad-field"


@pytest.mark.parametrize("record_type", list(RecordType))
def test_ttl_bounds(record_type: RecordType) -> None:
    key = records.data_key("ttl")
    payload = b""
    if record_type in (RecordType.CLAIM, RecordType.PRESENCE):
        key, payload = node_key("alice"), codec.pack({"id": "alice"})
    elif record_type == RecordType.ROOM:
        key, payload = room_key("lobby"), codec.pack({"room": "lobby"})

    def at(expires: float) -> records.Record:
        return records.decode(
            records.sign(ALICE, record_type, key, payload, seq=1, expires=expires).raw
        )

    records.validate(at(NOW + 1), NOW)
    records.validate(at(NOW + MAX_TTL[record_type] + CLOCK_SKEW), NOW)
    for expires in (NOW, NOW - 1, 0.0):
        with pytest.raises(RecordRejected) as info:
            records.validate(at(expires), NOW)
        assert info.value.reason == "expired"
    with pytest.raises(RecordRejected) as info:
        records.validate(at(NOW + MAX_TTL[record_type] + CLOCK_SKEW + 1), NOW)
    assert info.value.reason == "ttl-too-long"


def test_validate_refuses_a_nan_expiry_it_is_handed() -> None:
    """A Record built without decode() (e.g. by hand) with a NaN expiry is not kept forever."""
    rec = records.sign(ALICE, RecordType.DATA, records.data_key("x"), b"", seq=1, expires=NOW + 9)
    nan = records.Record(
        rec.rtype,
        rec.key,
        rec.signer,
        rec.sub,
        rec.seq,
        float("nan"),
        rec.payload,
        rec.signature,
        rec.raw,
    )
    with pytest.raises(RecordRejected) as info:
        records.validate(nan, NOW)
    assert info.value.reason == "expired"


@pytest.mark.parametrize("record_type", [RecordType.CLAIM, RecordType.PRESENCE])
def test_node_id_records_must_sit_under_their_label_key(record_type: RecordType) -> None:
    def make(key: bytes, payload: bytes) -> records.Record:
        return records.sign(ALICE, record_type, key, payload, seq=1, expires=NOW + 60)

    records.validate(make(node_key("alice"), codec.pack({"id": "alice"})), NOW)
    bad = [
        make(node_key("bob"), codec.pack({"id": "alice"})),  # under another label's key
        make(records.data_key("alice"), codec.pack({"id": "alice"})),  # another key family
        make(node_key("alice"), codec.pack({"name": "alice"})),  # no id field
        make(node_key("alice"), codec.pack({"id": 5})),  # id not text
        make(node_key("alice"), b"\xc1"),  # payload not msgpack
        make(node_key("alice"), codec.pack(["alice"])),  # payload not a map
    ]
    for rec in bad:
        with pytest.raises(RecordRejected) as info:
            records.validate(records.decode(rec.raw), NOW)
        assert info.value.reason == "wrong-key"
    # A tombstone carries no payload, so it is bound to nothing but its slot.
    tomb = records.sign(
        ALICE, record_type, node_key("alice"), b"", seq=2, expires=NOW + 60, tombstone=True
    )
    records.validate(records.decode(tomb.raw), NOW)


def test_room_records_must_sit_under_their_room_key() -> None:
    ok = records.sign(
        ALICE,
        RecordType.ROOM,
        room_key("lobby"),
        codec.pack({"room": "lobby"}),
        seq=1,
        expires=NOW + 60,
    )
    records.validate(ok, NOW)
    wrong = records.sign(
        ALICE,
        RecordType.ROOM,
        room_key("other"),
        codec.pack({"room": "lobby"}),
        seq=1,
        expires=NOW + 60,
    )
    with pytest.raises(RecordRejected) as info:
        records.validate(wrong, NOW)
    assert info.value.reason == "wrong-key"


def test_self_certifying_label_must_match_its_signer() -> None:
    mine = ALICE.self_id
    records.validate(_claim(ALICE, mine), NOW)
    with pytest.raises(RecordRejected) as info:
        records.validate(_claim(MALLORY, mine), NOW)  # Mallory claims Alice's key hash
    assert info.value.reason == "wrong-key"
    # Upper-case hex is not the self-certifying form, and not a label either: refused.
    with pytest.raises(RecordRejected) as info:
        records.validate(_claim(MALLORY, mine.upper()), NOW)
    assert info.value.reason == "bad-label"


@pytest.mark.parametrize(
    ("label", "why"),
    [
        ("alice\n", "control character"),
        ("Alice", "lower case only"),
        ("ALICE", "lower case only"),
        ("AbCdEf0123456789abcdef0123456789abcdef01", "self-certifying ID"),
        ("", "1-64 characters"),
        ("a" * 65, "1-64 characters"),
        ("-alice", "1-64 characters"),
        ("ali ce", "1-64 characters"),
    ],
)
def test_labels_are_refused_saying_why(label: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        records.check_label(label)
    assert not records.is_label(label)


def test_lowercase_labels_and_self_certifying_ids_pass() -> None:
    for label in ("alice", "a", "bob@example.org", "x_y-z.1", ALICE.self_id, "a" * 64):
        assert records.check_label(label) == label


def test_records_with_a_label_refused_by_check_label_are_refused() -> None:
    for label in ("alice\n", "Alice", ALICE.self_id.upper()):
        rec = records.sign(
            ALICE,
            RecordType.PRESENCE,
            node_key(label),
            codec.pack({"id": label}),
            seq=1,
            expires=NOW + 60,
        )
        with pytest.raises(RecordRejected) as info:
            records.validate(records.decode(rec.raw), NOW)
        assert info.value.reason == "bad-label"
    room = records.sign(
        ALICE,
        RecordType.ROOM,
        records.room_key("Lobby"),
        codec.pack({"room": "Lobby", "id": "alice"}),
        seq=1,
        expires=NOW + 60,
    )
    with pytest.raises(RecordRejected) as info:
        records.validate(records.decode(room.raw), NOW)
    assert info.value.reason == "bad-label"


def test_newest_keeps_the_highest_seq_per_slot() -> None:
    key = records.data_key("x")
    a1 = records.sign(ALICE, RecordType.DATA, key, b"1", seq=1, expires=NOW + 60)
    a3 = records.sign(ALICE, RecordType.DATA, key, b"3", seq=3, expires=NOW + 60)
    a2 = records.sign(ALICE, RecordType.DATA, key, b"2", seq=2, expires=NOW + 60)
    a_sub = records.sign(ALICE, RecordType.DATA, key, b"s", seq=1, expires=NOW + 60, sub=b"s")
    m1 = records.sign(MALLORY, RecordType.DATA, key, b"m", seq=9, expires=NOW + 60)
    merged = records.newest([a1, a3, m1, a2, a_sub, a1])
    assert sorted(r.payload for r in merged) == [b"3", b"m", b"s"]


def test_every_single_byte_change_is_refused_exhaustively() -> None:
    """Every change of every framing or scalar byte of a record whose seq has two
    msgpack encodings; inside the key, signer and signature (where any change
    only reaches the signature check) two masks per byte keep this fast.
    """
    rec = records.sign(ALICE, RecordType.DATA, records.data_key("x"), b"p", seq=1000, expires=NOW)
    opaque: set[int] = set()
    for blob in (rec.key, rec.signer, rec.signature):
        start = rec.raw.index(blob)
        opaque.update(range(start, start + len(blob)))
    accepted = []
    for pos in range(len(rec.raw)):
        for mask in (0x01, 0x80) if pos in opaque else range(1, 256):
            changed = bytearray(rec.raw)
            changed[pos] ^= mask
            try:
                records.decode(bytes(changed))
            except RecordRejected:
                continue
            accepted.append((pos, mask))
    assert accepted == []


# -- the signature primitive ----------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=1200),
    where=st.sampled_from(["key", "message", "signature"]),
    index=st.integers(0, 2**16),
    bit=st.integers(0, 7),
)
def test_verify_accepts_own_signatures_and_refuses_any_flipped_bit(
    seed: bytes, message: bytes, where: str, index: int, bit: int
) -> None:
    """``identity.verify`` (libsodium) accepts what ``Identity.sign`` (OpenSSL) made, and
    agrees with OpenSSL's own verify that a single flipped bit anywhere is refused."""
    me = Identity(seed)
    sig = me.sign(message)
    assert verify(me.public_key, message, sig)
    parts = {
        "key": bytearray(me.public_key),
        "message": bytearray(message),
        "signature": bytearray(sig),
    }
    if not parts[where]:
        return
    target = parts[where]
    target[index % len(target)] ^= 1 << bit
    key, msg, bad = bytes(parts["key"]), bytes(parts["message"]), bytes(parts["signature"])
    assert not verify(key, msg, bad)
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(bad, msg)
        openssl_ok = True
    except (InvalidSignature, ValueError):
        openssl_ok = False
    assert not openssl_ok


@pytest.mark.parametrize(
    ("key", "signature"),
    [
        (b"", b"\x00" * 64),
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 32, b"\x00" * 63),
        (b"\x00" * 32, b"\x00" * 64),  # a small-order key with an all-zero signature
        (b"\x01" + b"\x00" * 31, b"\x01" + b"\x00" * 63),  # the identity point
        (b"\xff" * 32, b"\xff" * 64),  # not a point, S not canonical
    ],
)
def test_verify_refuses_malformed_keys_and_signatures_without_raising(
    key: bytes, signature: bytes
) -> None:
    assert verify(key, b"anything", signature) is False
