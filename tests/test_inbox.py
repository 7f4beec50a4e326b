"""The inbox protocol with bytes and times only: no sockets, no event loop, no clock reads."""

from __future__ import annotations

import ipaddress

import pytest

from dhtsignal.dht import records
from dhtsignal.dht.records import Record, RecordType, inbox_key
from dhtsignal.identity import Identity
from dhtsignal.signaling import envelope, inbox, sdp
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.inbox import (
    AnswerMalformed,
    AnswerReceived,
    ChannelOptions,
    Inbox,
    OfferReceived,
    Refused,
    RejectReceived,
)
from dhtsignal.wire import codec

ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))
MALLORY = Identity(bytes(range(2, 34)))
NOW = 1_700_000_000.0
SESSION = b"\x05" * 8


def description(type: str) -> str:
    """A data-channel SDP of ``type`` as aiortc would write it (rendered from its parts)."""
    return sdp.Description(
        type=type,
        mid="0",
        ufrag="abcd",
        pwd="a" * 22,
        fingerprint_algorithm="sha-256",
        fingerprint=bytes(range(32)),
        setup="actpass" if type == "offer" else "active",
        sctp_port=5000,
        max_message_size=262144,
        candidates=(
            sdp.Candidate("ab12", 1, "udp", 1, ipaddress.ip_address("127.0.0.1"), 9, "host"),
        ),
    ).render()


OFFER = description("offer")
ANSWER = description("answer")
CHANNEL = ChannelOptions(ordered=False, max_retransmits=3)
DHT = [("127.0.0.1", 4000), ("::1", 4001), ("10.0.0.1", 4002), ("10.0.0.2", 4003)]


def offer_record(
    sender: Inbox, to: Identity = BOB, session: bytes = SESSION, now: float = NOW
) -> Record:
    return sender.seal_offer(
        to.public_key,
        to.x25519_public,
        session,
        OFFER,
        label="alice",
        dht=DHT,
        channel=CHANNEL,
        now=now,
    )


def raw_record(
    signer: Identity,
    msg_type: MessageType,
    body: object,
    *,
    sender: Identity | None = None,
    to: Identity = BOB,
    session: bytes = SESSION,
    sealed_at: float = NOW,
) -> Record:
    """An INBOX record around an envelope of any body, sealed by ``sender`` (default the
    signer) and signed by ``signer``."""
    blob = envelope.seal(
        sender or signer,
        to.public_key,
        to.x25519_public,
        session,
        msg_type,
        codec.pack(body),
        sealed_at,
    )
    return records.sign(
        signer,
        RecordType.INBOX,
        inbox_key(to.public_key),
        blob,
        seq=int(sealed_at * 1000),
        expires=sealed_at + 60,
        sub=session + bytes([int(msg_type)]),
    )


def test_offer_round_trip_and_record_layout() -> None:
    alice, bob = Inbox(ALICE, ttl=45.0), Inbox(BOB)
    rec = offer_record(alice)
    assert rec.type == RecordType.INBOX
    assert rec.key == inbox_key(BOB.public_key) == bob.key
    assert rec.signer == ALICE.public_key
    assert rec.sub == SESSION + bytes([MessageType.OFFER])
    assert rec.seq == int(NOW * 1000) and rec.expires == NOW + 45.0
    assert len(rec.raw) <= records.MAX_RECORD
    body = codec.unpack(envelope.open_envelope(BOB, rec.payload, NOW, envelope.ReplayCache()).body)
    assert sorted(body) == ["ch", "dht", "id", "sdp", "x"]  # the wire's body keys

    event = bob.receive(records.decode(rec.raw), NOW + 1)
    assert isinstance(event, OfferReceived)
    assert event.sender == ALICE.public_key and event.session_id == SESSION
    assert event.x25519 == ALICE.x25519_public and event.label == "alice"
    assert event.dht == tuple(DHT[: inbox.MAX_BODY_ADDRS])
    assert event.channel == CHANNEL
    assert sdp.compact(event.sdp, "offer") == sdp.compact(OFFER, "offer")


def test_answer_and_reject_round_trip_only_for_an_expected_dial() -> None:
    alice, bob = Inbox(ALICE), Inbox(BOB)
    answer = bob.seal_answer(ALICE.public_key, ALICE.x25519_public, SESSION, ANSWER, NOW)
    reject = bob.seal_reject(ALICE.public_key, ALICE.x25519_public, b"\x06" * 8, "x" * 300, NOW)
    assert answer.sub[-1] == MessageType.ANSWER and reject.sub[-1] == MessageType.REJECT

    alice.expect(SESSION, BOB.public_key)
    alice.expect(b"\x06" * 8, BOB.public_key)
    got = alice.receive(answer, NOW)
    assert isinstance(got, AnswerReceived) and got.session_id == SESSION
    assert got.sender == BOB.public_key
    assert sdp.compact(got.sdp, "answer") == sdp.compact(ANSWER, "answer")
    rejected = alice.receive(reject, NOW)
    assert rejected == RejectReceived(BOB.public_key, b"\x06" * 8, "x" * inbox.MAX_WHY)


def test_answer_to_no_dial_is_refused_and_a_stray_reject_ignored() -> None:
    alice, bob = Inbox(ALICE), Inbox(BOB)
    answer = bob.seal_answer(ALICE.public_key, ALICE.x25519_public, SESSION, ANSWER, NOW)
    assert alice.receive(answer, NOW) == Refused(
        "refused:unexpected-answer", f"session {SESSION.hex()}"
    )
    # A dial to someone else: bob's answer to it is still unexpected.
    alice.expect(SESSION, MALLORY.public_key)
    again = bob.seal_answer(ALICE.public_key, ALICE.x25519_public, SESSION, ANSWER, NOW + 1)
    refused = alice.receive(again, NOW + 1)
    assert isinstance(refused, Refused) and refused.counter == "refused:unexpected-answer"
    # After the dial ended, its rejection means nothing.
    alice.expect(SESSION, BOB.public_key)
    alice.forget(SESSION)
    reject = bob.seal_reject(ALICE.public_key, ALICE.x25519_public, SESSION, "no", NOW + 2)
    assert alice.receive(reject, NOW + 2) is None


def test_second_copy_is_a_duplicate_and_the_memory_is_bounded() -> None:
    alice, bob = Inbox(ALICE), Inbox(BOB, max_seen=2)
    first, second, third = (offer_record(alice, session=bytes([i]) * 8) for i in range(3))
    assert isinstance(bob.receive(first, NOW), OfferReceived)
    assert bob.receive(first, NOW) == Refused("duplicate")
    assert isinstance(bob.receive(second, NOW), OfferReceived)
    assert isinstance(bob.receive(third, NOW), OfferReceived)
    # first was forgotten (bound 2): its copy now reaches the envelope's replay cache.
    refused = bob.receive(first, NOW)
    assert isinstance(refused, Refused) and refused.counter == "refused:replay"


def test_signer_mismatch_is_refused_before_the_replay_cache_sees_the_envelope() -> None:
    """A relay re-signing alice's envelope first must not get the genuine record refused."""
    bob = Inbox(BOB)
    genuine = offer_record(Inbox(ALICE))
    relayed = records.sign(
        MALLORY,
        RecordType.INBOX,
        genuine.key,
        genuine.payload,
        seq=genuine.seq,
        expires=genuine.expires,
        sub=genuine.sub,
    )
    refused = bob.receive(relayed, NOW)
    assert isinstance(refused, Refused) and refused.counter == "refused:signer-mismatch"
    assert isinstance(bob.receive(genuine, NOW), OfferReceived)


@pytest.mark.parametrize(
    ("case", "counter"),
    [
        ("wrong-recipient", "refused:wrong-recipient"),
        ("stale", "refused:stale"),
        ("from-the-future", "refused:stale"),
        ("truncated", "refused:malformed"),
        ("bad-signature", "refused:bad-signature"),
    ],
)
def test_envelope_refusals_are_counted_by_reason(case: str, counter: str) -> None:
    alice, bob = Inbox(ALICE), Inbox(BOB)
    if case == "wrong-recipient":
        rec = offer_record(alice, to=MALLORY)
    elif case == "stale":
        rec = offer_record(alice, now=NOW - envelope.DEFAULT_MAX_AGE - 1)
    elif case == "from-the-future":
        rec = offer_record(alice, now=NOW + envelope.DEFAULT_MAX_AGE + 1)
    else:
        good = offer_record(alice)
        if case == "truncated":
            blob = good.payload[:120]
        else:
            at = envelope.HEADER.size + 3
            blob = good.payload[:at] + bytes([good.payload[at] ^ 1]) + good.payload[at + 1 :]
        rec = records.sign(
            ALICE, RecordType.INBOX, good.key, blob, seq=1, expires=NOW + 60, sub=good.sub
        )
    refused = bob.receive(rec, NOW)
    assert isinstance(refused, Refused) and refused.counter == counter, refused


def resigned(rec: Record, bump: int) -> Record:
    """The same envelope in a new record by the same signer (a higher sequence number)."""
    return records.sign(
        ALICE,
        RecordType.INBOX,
        rec.key,
        rec.payload,
        seq=rec.seq + bump,
        expires=rec.expires,
        sub=rec.sub,
    )


def test_replay_of_the_same_envelope_in_a_new_record_is_refused() -> None:
    bob = Inbox(BOB)
    rec = offer_record(Inbox(ALICE))
    assert isinstance(bob.receive(rec, NOW), OfferReceived)
    refused = bob.receive(resigned(rec, 1), NOW + 5)
    assert isinstance(refused, Refused) and refused.counter == "refused:replay"
    # Once stale, the same envelope is refused as stale, not remembered for ever.
    later = bob.receive(resigned(rec, 2), NOW + envelope.DEFAULT_MAX_AGE + 1)
    assert isinstance(later, Refused) and later.counter == "refused:stale"


GOOD_OFFER = {
    "sdp": sdp.compact(OFFER, "offer"),
    "x": ALICE.x25519_public,
    "id": "alice",
    "dht": [["127.0.0.1", 4000]],
    "ch": [True, None, None],
}


@pytest.mark.parametrize(
    "body",
    [
        [1, 2, 3],  # not a map
        b"\xc1",  # not even msgpack (packed as bytes: still not a map)
        {**GOOD_OFFER, "x": b"short"},
        {k: v for k, v in GOOD_OFFER.items() if k != "x"},
        {**GOOD_OFFER, "sdp": "text, not bytes"},
        {**GOOD_OFFER, "sdp": b"\x01"},
        {**GOOD_OFFER, "sdp": sdp.compact(ANSWER, "answer")},  # an answer in an offer
    ],
    ids=["list", "bytes", "short-x", "no-x", "text-sdp", "garbage-sdp", "answer-as-offer"],
)
def test_malformed_offer_body_is_refused(body: object) -> None:
    rec = raw_record(ALICE, MessageType.OFFER, body)
    refused = Inbox(BOB).receive(rec, NOW)
    assert isinstance(refused, Refused) and refused.counter == "refused:malformed-body", refused


def test_offer_body_fields_out_of_shape_fall_back_to_defaults() -> None:
    body = {**GOOD_OFFER, "id": 7, "dht": [["h", 0], ["h", 70000], "x", ["ok", 1]], "ch": "?"}
    event = Inbox(BOB).receive(raw_record(ALICE, MessageType.OFFER, body), NOW)
    assert isinstance(event, OfferReceived)
    assert event.label == "" and event.dht == () and event.channel == ChannelOptions()


def test_malformed_answer_to_our_dial_fails_it_and_is_not_an_answer() -> None:
    alice = Inbox(ALICE)
    alice.expect(SESSION, BOB.public_key)
    missing = raw_record(BOB, MessageType.ANSWER, {"x": BOB.x25519_public}, to=ALICE)
    assert alice.receive(missing, NOW) == AnswerMalformed(
        BOB.public_key, SESSION, "answer carried no description"
    )
    as_offer = raw_record(
        BOB, MessageType.ANSWER, {"sdp": sdp.compact(OFFER, "offer")}, to=ALICE, sealed_at=NOW + 1
    )
    assert alice.receive(as_offer, NOW + 1) == AnswerMalformed(
        BOB.public_key, SESSION, "answer is not an SDP answer"
    )


def test_tombstones_and_other_record_types_are_not_messages() -> None:
    bob = Inbox(BOB)
    tomb = records.sign(
        ALICE, RecordType.INBOX, bob.key, b"", seq=1, expires=NOW + 60, tombstone=True
    )
    assert bob.receive(tomb, NOW) is None
    other = records.sign(ALICE, RecordType.PRESENCE, bob.key, b"x", seq=1, expires=NOW + 60)
    assert bob.receive(other, NOW) is None


def test_a_sender_claiming_someone_elses_envelope_is_refused() -> None:
    """mallory's own envelope with alice named as its sender, in a record mallory signed
    (mallory cannot sign one as alice): a signer mismatch, refused before it is opened."""
    rec = raw_record(MALLORY, MessageType.OFFER, GOOD_OFFER, sender=MALLORY)
    blob = rec.payload
    sender = slice(envelope.AAD_END - 32, envelope.AAD_END)
    forged = blob[: sender.start] + ALICE.public_key + blob[sender.stop :]
    forged_rec = records.sign(
        MALLORY, RecordType.INBOX, rec.key, forged, seq=2, expires=NOW + 60, sub=rec.sub
    )
    refused = Inbox(BOB).receive(forged_rec, NOW)
    assert isinstance(refused, Refused) and refused.counter == "refused:signer-mismatch"


@pytest.mark.parametrize("claimed", ["alice\n", "Alice", ALICE.self_id.upper()])
def test_a_claimed_label_that_is_not_a_label_is_dropped(claimed: str) -> None:
    """The offer's claimed label is checked again after unpacking: an invalid one is
    dropped (the caller is then known by its self-certifying ID only)."""
    alice, bob = Inbox(ALICE), Inbox(BOB)
    rec = alice.seal_offer(
        BOB.public_key,
        BOB.x25519_public,
        SESSION,
        OFFER,
        label=claimed,
        dht=DHT,
        channel=CHANNEL,
        now=NOW,
    )
    got = bob.receive(rec, NOW)
    assert isinstance(got, OfferReceived) and got.label == ""
