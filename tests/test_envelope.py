"""Sealed envelopes: round trip, every refusal reason, and the replay cache bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dhtsignal.errors import EnvelopeRejected, UsageError
from dhtsignal.identity import Identity
from dhtsignal.signaling import envelope
from dhtsignal.signaling.envelope import MessageType, ReplayCache, open_envelope, seal

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
MALLORY = Identity(bytes(range(2, 34)))
NOW = 1_700_000_000.0
SESSION = b"\x01" * 8
BODY = b"compact offer" * 10


def _seal(msg_type: MessageType = MessageType.OFFER, now: float = NOW, body: bytes = BODY) -> bytes:
    return seal(ALICE, BOB.public_key, BOB.x25519_public, SESSION, msg_type, body, now)


def _reason(blob: bytes, now: float = NOW, replay: ReplayCache | None = None) -> str:
    with pytest.raises(EnvelopeRejected) as caught:
        open_envelope(BOB, blob, now, replay or ReplayCache())
    return caught.value.reason


def _resign(signer: Identity, unsigned: bytes) -> bytes:
    return unsigned + signer.sign(envelope.DOMAIN + BOB.public_key + unsigned)


@pytest.mark.parametrize("msg_type", list(MessageType))
def test_round_trip(msg_type: MessageType) -> None:
    blob = _seal(msg_type, now=NOW + 0.123)
    opened = open_envelope(BOB, blob, NOW, ReplayCache())
    assert opened == envelope.Opened(ALICE.public_key, SESSION, msg_type, BODY, NOW + 0.123)
    assert len(blob) == len(BODY) + envelope.OVERHEAD == len(BODY) + 170


def test_each_envelope_is_encrypted_afresh() -> None:
    first, second = _seal(), _seal()
    assert first != second
    assert BODY not in first


# Where a flipped byte lands decides the first check that fails.
REGIONS = [
    (0, 1, {"malformed"}),  # version
    (1, 2, {"malformed", "bad-signature"}),  # msg_type: another valid msg_type fails the signature
    (2, 18, {"bad-signature"}),  # session id, time
    (18, 26, {"wrong-recipient"}),  # recipient hint
]


@given(st.data(), st.integers(1, 255))
def test_any_flipped_byte_is_refused_for_its_region(data: st.DataObject, mask: int) -> None:
    blob = _seal()
    position = data.draw(st.integers(0, len(blob) - 1))
    tampered = bytearray(blob)
    tampered[position] ^= mask
    expected = next(
        (reasons for start, end, reasons in REGIONS if start <= position < end), {"bad-signature"}
    )
    assert _reason(bytes(tampered)) in expected


@given(st.data())
def test_truncated_is_refused(data: st.DataObject) -> None:
    blob = _seal()
    length = data.draw(st.integers(0, len(blob) - 1))
    reason = _reason(blob[:length])
    assert reason == ("malformed" if length < envelope.OVERHEAD else "bad-signature")


def test_forged_signer_is_refused() -> None:
    blob = _seal()
    assert _reason(_resign(MALLORY, blob[: -envelope.SIGNATURE_SIZE])) == "bad-signature"


def test_rebinding_a_ciphertext_to_another_sender_fails_decryption() -> None:
    unsigned = bytearray(_seal()[: -envelope.SIGNATURE_SIZE])
    unsigned[26:58] = MALLORY.public_key
    assert _reason(_resign(MALLORY, bytes(unsigned))) == "decrypt-failed"


def test_wrong_recipient_is_refused() -> None:
    blob = seal(
        ALICE, MALLORY.public_key, MALLORY.x25519_public, SESSION, MessageType.OFFER, BODY, NOW
    )
    assert _reason(blob) == "wrong-recipient"


def test_encrypted_to_another_x25519_key_fails_decryption() -> None:
    blob = seal(ALICE, BOB.public_key, MALLORY.x25519_public, SESSION, MessageType.OFFER, BODY, NOW)
    assert _reason(blob) == "decrypt-failed"


def test_replay_is_refused_but_a_new_envelope_is_not() -> None:
    replay = ReplayCache()
    blob = _seal()
    open_envelope(BOB, blob, NOW, replay)
    assert _reason(blob, NOW + 1, replay) == "replay"
    assert open_envelope(BOB, _seal(), NOW + 1, replay).body == BODY


def test_refused_envelopes_do_not_enter_the_replay_cache() -> None:
    replay = ReplayCache()
    _reason(_seal(now=NOW - 60), NOW, replay)
    tampered = bytearray(_seal())
    tampered[-1] ^= 1
    _reason(bytes(tampered), NOW, replay)
    assert len(replay) == 0


@pytest.mark.parametrize(("skew", "ok"), [(-30.0, True), (30.0, True), (-30.5, False), (31, False)])
def test_stale_or_future_is_refused(skew: float, ok: bool) -> None:
    blob = _seal(now=NOW + skew)
    if ok:
        assert open_envelope(BOB, blob, NOW, ReplayCache()).sent_at == NOW + skew
    else:
        assert _reason(blob) == "stale"


def test_max_age_is_the_callers() -> None:
    blob = _seal(now=NOW - 5)
    with pytest.raises(EnvelopeRejected, match="stale"):
        open_envelope(BOB, blob, NOW, ReplayCache(), max_age=4.0)


def test_bad_version_and_kind_are_malformed() -> None:
    for position, value in [(0, 2), (1, 0), (1, 4)]:
        tampered = bytearray(_seal())
        tampered[position] = value
        assert _reason(bytes(tampered)) == "malformed"


def test_seal_refuses_bad_sizes() -> None:
    with pytest.raises(UsageError):
        seal(ALICE, BOB.public_key, BOB.x25519_public, b"short", MessageType.OFFER, BODY, NOW)
    with pytest.raises(UsageError):
        seal(ALICE, BOB.public_key, b"\x00" * 31, SESSION, MessageType.OFFER, BODY, NOW)


def test_replay_cache_forgets_expired_entries() -> None:
    cache = ReplayCache(max_entries=10)
    cache.add(b"a", expires=10.0, now=0.0)
    assert cache.seen(b"a", 9.9)
    assert cache.seen(b"a", 10.0)  # live through its expiry, inclusive
    assert not cache.seen(b"a", 10.1)
    cache.add(b"b", expires=20.0, now=10.1)
    assert len(cache) == 1


def test_replay_cache_refuses_when_full_of_live_entries_instead_of_evicting() -> None:
    cache = ReplayCache(max_entries=3)
    cache.add(b"old", expires=5.0, now=0.0, sender=b"1")
    cache.add(b"keep1", expires=50.0, now=0.0, sender=b"2")
    cache.add(b"keep2", expires=60.0, now=0.0, sender=b"3")
    assert cache.refusal(b"4", 4.0) == "replay-full"
    cache.add(b"new1", expires=70.0, now=6.0, sender=b"4")  # "old" expired and went
    assert [cache.seen(k, 6.0) for k in (b"old", b"keep1", b"keep2", b"new1")] == [
        False,
        True,
        True,
        True,
    ]
    assert cache.refusal(b"5", 7.0) == "replay-full"
    with pytest.raises(UsageError, match="replay-full"):
        cache.add(b"new2", expires=80.0, now=7.0, sender=b"5")
    assert all(cache.seen(k, 7.0) for k in (b"keep1", b"keep2", b"new1"))


def test_replay_cache_quota_per_sender() -> None:
    cache = ReplayCache(max_entries=100, max_per_sender=2)
    cache.add(b"a", expires=10.0, now=0.0, sender=b"s")
    cache.add(b"b", expires=20.0, now=0.0, sender=b"s")
    assert cache.refusal(b"s", 1.0) == "replay-quota"
    assert cache.refusal(b"t", 1.0) is None
    assert cache.refusal(b"s", 10.5) is None  # "a" expired: room for the sender again


def test_replay_cache_stays_bounded_under_flood() -> None:
    cache = ReplayCache(max_entries=1000)
    largest = refused = 0
    for i in range(100_000):
        if cache.refusal(i.to_bytes(4, "big"), float(i % 7)) is None:
            cache.add(i.to_bytes(16, "big"), 1e9 + i, float(i % 7), i.to_bytes(4, "big"))
        else:
            refused += 1
        largest = max(largest, len(cache))
    assert largest == len(cache) == 1000
    assert refused == 99_000
    assert cache.seen((999).to_bytes(16, "big"), 0.0)  # the first ones stay


def test_envelope_at_exactly_its_max_age_opens_once() -> None:
    replay = ReplayCache()
    blob = _seal(now=NOW)
    open_envelope(BOB, blob, NOW + 30.0, replay)  # fresh at exactly sent_at + max_age
    assert _reason(blob, NOW + 30.0, replay) == "replay"
    assert _reason(blob, NOW + 30.001, replay) == "stale"


def test_cache_flush_with_5000_throwaway_keys_does_not_reopen_a_genuine_envelope() -> None:
    replay = ReplayCache()
    genuine = _seal()
    open_envelope(BOB, genuine, NOW, replay)
    reasons: dict[str, int] = {}
    for i in range(5000):
        stranger = Identity.generate()
        # Dated up to 30 s ahead, so that they outlive the genuine entry if kept.
        blob = seal(
            stranger,
            BOB.public_key,
            BOB.x25519_public,
            SESSION,
            MessageType.OFFER,
            BODY,
            NOW + 30 * i / 5000,
        )
        try:
            open_envelope(BOB, blob, NOW + 1, replay)
            reasons["opened"] = reasons.get("opened", 0) + 1
        except EnvelopeRejected as exc:
            reasons[exc.reason] = reasons.get(exc.reason, 0) + 1
    assert reasons == {"opened": 4095, "replay-full": 905}
    assert _reason(genuine, NOW + 2, replay) == "replay"
    # One key cannot fill the cache on its own: its quota ends it first.
    own = ReplayCache()
    for i in range(200):
        blob = seal(
            MALLORY, BOB.public_key, BOB.x25519_public, SESSION, MessageType.OFFER, BODY, NOW
        )
        try:
            open_envelope(BOB, blob, NOW, own)
        except EnvelopeRejected as exc:
            assert exc.reason == "replay-quota" and i == own.max_per_sender
            break
    assert len(own) == own.max_per_sender


def test_replay_cache_needs_room() -> None:
    with pytest.raises(UsageError):
        ReplayCache(max_entries=0)
