"""The inbox protocol: signaling messages sealed into INBOX records, and opened from them.

Theory of operation
-------------------

A peer's *inbox* is the DHT key :func:`~dhtsignal.dht.records.inbox_key` of its Ed25519
key. A caller drops an offer there; the callee answers (or rejects) into the caller's
inbox. This module is that protocol and nothing else: it does no I/O and reads no clock.
:class:`Inbox` turns an outgoing message into the :class:`~dhtsignal.dht.records.Record`
to push and store, and an incoming record into one past-tense event
(:class:`OfferReceived`, :class:`AnswerReceived`, :class:`RejectReceived`), a
:class:`Refused` whose ``counter`` is the name the peer counts it under, or None for a
record that is none of its business (another type, a tombstone, a rejection of a dial we
no longer make).

Record layout (the wire format)::

    Record(type=INBOX, key=inbox_key(recipient), signer=sender, seq=sealed-at ms,
           expires=now + ttl, sub=session id || msg_type, payload=envelope)

The envelope (:mod:`~dhtsignal.signaling.envelope`) carries a msgpack map, the *body*:

=======  ==========================  =================================================
type     key                         value
=======  ==========================  =================================================
offer    ``sdp``                     compact offer (:mod:`~dhtsignal.signaling.sdp`)
offer    ``x``                       the caller's X25519 key (32 bytes)
offer    ``id``                      the caller's claimed node-ID label (may be empty)
offer    ``dht``                     up to :data:`MAX_BODY_ADDRS` ``[host, port]`` of the
                                     caller's DHT node, where the answer is pushed
offer    ``ch``                      ``[ordered, max_retransmits, max_packet_life_time]``
answer   ``sdp``, ``x``              compact answer, the callee's X25519 key
reject   ``why``                     text, at most :data:`MAX_WHY` characters kept
=======  ==========================  =================================================

Receiving checks, in order, each failure a :class:`Refused`:

1. the *second copy*: a record arrives twice, pushed straight from the sender and pushed
   by the storing nodes; the second is ``duplicate`` (the last ``max_seen`` records are
   remembered, as 16-byte hashes);
2. the record's signer must be the envelope's sender (``refused:signer-mismatch``),
   checked before the envelope is opened, because opening enters the envelope into the
   replay cache: a relay that re-signed someone's envelope first would otherwise get the
   genuine record refused as a replay;
3. the envelope itself (``refused:<reason>`` of
   :class:`~dhtsignal.errors.EnvelopeRejected`: ``malformed``, ``wrong-recipient``,
   ``bad-signature``, ``stale``, ``replay``, ``replay-full``, ``replay-quota``,
   ``decrypt-failed``);
4. the body schema (``refused:malformed-body``), validated here only;
5. an answer must be for a dial we make to that sender (:meth:`Inbox.expect`), else
   ``refused:unexpected-answer``. A malformed answer *to such a dial* is not refused
   silently: it becomes :class:`AnswerMalformed` so the dial fails at once.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.records import Record, RecordType, inbox_key
from dhtsignal.errors import EnvelopeRejected, ProtocolError
from dhtsignal.identity import Identity
from dhtsignal.signaling import envelope, sdp
from dhtsignal.signaling.envelope import MessageType, ReplayCache
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

log = logging.getLogger(__name__)

DEFAULT_TTL = 60.0
"""Lifetime of an inbox record, seconds (an envelope is stale after 30 s anyway)."""
DEFAULT_MAX_SEEN = 4096
"""Inbox records remembered to drop the second copy."""
MAX_BODY_ADDRS = 3
"""DHT addresses an offer lists, and the most a receiver reads."""
MAX_WHY = 200
"""Characters of a rejection's reason kept."""
_SEEN_KEY_SIZE = 16
_X25519_SIZE = 32


@dataclass(frozen=True)
class ChannelOptions:
    """Delivery guarantees of a session's ``data`` channel."""

    ordered: bool = True
    """Deliver in order."""
    max_retransmits: int | None = None
    """Partial reliability: give up after this many retransmissions."""
    max_packet_life_time: int | None = None
    """Partial reliability: give up after this many milliseconds."""

    def wire(self) -> list[Any]:
        """The body's ``ch`` value."""
        return [self.ordered, self.max_retransmits, self.max_packet_life_time]

    @classmethod
    def from_wire(cls, item: object) -> ChannelOptions:
        """The options of a body's ``ch`` value (defaults for anything out of shape).

        :param item: the decoded value.
        """
        if not isinstance(item, list) or len(item) != 3:
            return cls()
        ordered, rex, life = item
        return cls(
            ordered=bool(ordered),
            max_retransmits=rex if isinstance(rex, int) and 0 <= rex < 65536 else None,
            max_packet_life_time=life if isinstance(life, int) and 0 <= life < 65536 else None,
        )


@dataclass(frozen=True)
class OfferReceived:
    """A caller's offer, checked and decoded."""

    sender: bytes
    """The caller's Ed25519 key (the record's signer and the envelope's sender)."""
    session_id: bytes
    sdp: str
    """The expanded offer SDP."""
    x25519: bytes
    """The caller's X25519 key, to seal the answer to."""
    label: str
    """The node-ID label the caller claims (unverified; may be empty)."""
    dht: tuple[Addr, ...]
    """The caller's DHT addresses, where the answer may be pushed directly."""
    channel: ChannelOptions


@dataclass(frozen=True)
class AnswerReceived:
    """The answer to one of our dials."""

    sender: bytes
    session_id: bytes
    sdp: str
    """The expanded answer SDP."""


@dataclass(frozen=True)
class AnswerMalformed:
    """The callee of one of our dials answered with a body we cannot use."""

    sender: bytes
    session_id: bytes
    why: str


@dataclass(frozen=True)
class RejectReceived:
    """The callee of one of our dials refused it."""

    sender: bytes
    session_id: bytes
    why: str


@dataclass(frozen=True)
class Refused:
    """A record the inbox dropped; ``counter`` is the peer's counter name for it."""

    counter: str
    detail: str = ""


InboxEvent = OfferReceived | AnswerReceived | AnswerMalformed | RejectReceived


class Inbox:
    """Seals outgoing signaling messages and opens incoming ones for one identity.

    :param identity: the local key pair (records are signed and envelopes opened with it).
    :param ttl: lifetime of the records sealed, seconds.
    :param max_seen: records remembered to drop the second copy.
    :param replay: the envelope replay cache (a new one by default).
    :param network: the network id our records are signed for (the DHT's).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        ttl: float = DEFAULT_TTL,
        max_seen: int = DEFAULT_MAX_SEEN,
        replay: ReplayCache | None = None,
        network: str = records.DEFAULT_NETWORK,
    ) -> None:
        self.identity = identity
        self.network = network
        """The network id our INBOX records are signed for."""
        self.ttl = ttl
        self.max_seen = max_seen
        self.key = inbox_key(identity.public_key)
        """Our inbox key."""
        self._replay = replay or ReplayCache()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._expected: dict[bytes, bytes] = {}

    # -- dials --------------------------------------------------------------------------

    def expect(self, session_id: bytes, remote_key: bytes) -> None:
        """Accept an answer or rejection of ``session_id`` from ``remote_key`` from now on.

        :param session_id: our outgoing session.
        :param remote_key: the callee's Ed25519 key.
        """
        self._expected[session_id] = remote_key

    def forget(self, session_id: bytes) -> None:
        """Stop accepting answers to ``session_id`` (the dial ended).

        :param session_id: our outgoing session.
        """
        self._expected.pop(session_id, None)

    # -- sealing ------------------------------------------------------------------------

    def seal_offer(
        self,
        recipient_key: bytes,
        recipient_x25519: bytes,
        session_id: bytes,
        offer: str,
        *,
        label: str,
        dht: Sequence[Addr],
        channel: ChannelOptions,
        now: float,
    ) -> Record:
        """The INBOX record carrying our offer to ``recipient_key``.

        :param recipient_key: the callee's Ed25519 key.
        :param recipient_x25519: the callee's X25519 key (from its presence record).
        :param session_id: 8 bytes naming the session.
        :param offer: our local offer SDP.
        :param label: our node-ID label, or empty.
        :param dht: our DHT addresses (the first :data:`MAX_BODY_ADDRS` are sent).
        :param channel: the data channel's options.
        :param now: the wall clock, seconds since the Unix epoch.
        :raises UsageError: the SDP cannot be compacted.
        """
        body = {
            "sdp": sdp.compact(offer, "offer"),
            "x": self.identity.x25519_public,
            "id": label,
            "dht": [[host, port] for host, port in dht[:MAX_BODY_ADDRS]],
            "ch": channel.wire(),
        }
        return self._seal(recipient_key, recipient_x25519, session_id, MessageType.OFFER, body, now)

    def seal_answer(
        self,
        recipient_key: bytes,
        recipient_x25519: bytes,
        session_id: bytes,
        answer: str,
        now: float,
    ) -> Record:
        """The INBOX record carrying our answer to the caller's offer.

        :param recipient_key: the caller's Ed25519 key.
        :param recipient_x25519: the caller's X25519 key (from its offer).
        :param session_id: the caller's session.
        :param answer: our local answer SDP.
        :param now: the wall clock, seconds since the Unix epoch.
        """
        body = {"sdp": sdp.compact(answer, "answer"), "x": self.identity.x25519_public}
        return self._seal(
            recipient_key, recipient_x25519, session_id, MessageType.ANSWER, body, now
        )

    def seal_reject(
        self, recipient_key: bytes, recipient_x25519: bytes, session_id: bytes, why: str, now: float
    ) -> Record:
        """The INBOX record refusing the caller's offer.

        :param recipient_key: the caller's Ed25519 key.
        :param recipient_x25519: the caller's X25519 key (from its offer).
        :param session_id: the caller's session.
        :param why: the reason shown to the caller.
        :param now: the wall clock, seconds since the Unix epoch.
        """
        body = {"why": why[:MAX_WHY]}
        return self._seal(
            recipient_key, recipient_x25519, session_id, MessageType.REJECT, body, now
        )

    def _seal(
        self,
        recipient_key: bytes,
        recipient_x25519: bytes,
        session_id: bytes,
        msg_type: MessageType,
        body: dict[str, Any],
        now: float,
    ) -> Record:
        blob = envelope.seal(
            self.identity,
            recipient_key,
            recipient_x25519,
            session_id,
            msg_type,
            codec.pack(body),
            now,
        )
        return records.sign(
            self.identity,
            RecordType.INBOX,
            inbox_key(recipient_key),
            blob,
            seq=int(now * 1000),
            expires=now + self.ttl,
            sub=session_id + bytes([int(msg_type)]),
            network=self.network,
        )

    # -- receiving ----------------------------------------------------------------------

    def receive(self, rec: Record, now: float) -> InboxEvent | Refused | None:
        """Check and decode one record found in our inbox.

        :param rec: a record the DHT node verified (signature, key, expiry).
        :param now: the wall clock, seconds since the Unix epoch.
        :returns: the event, the refusal, or None for a record that is not a message to
            us (another type, a tombstone, a rejection of a dial we no longer make).
        """
        if rec.type != RecordType.INBOX or rec.is_tombstone:
            return None
        seen = hashlib.sha256(rec.raw).digest()[:_SEEN_KEY_SIZE]
        if seen in self._seen:
            return Refused("duplicate")
        self._seen[seen] = None
        if len(self._seen) > self.max_seen:
            self._seen.popitem(last=False)
        sender = rec.payload[envelope.AAD_END - 32 : envelope.AAD_END]
        if len(sender) == 32 and sender != rec.signer:
            return _refused("refused:signer-mismatch", f"record signed by {rec.signer.hex()[:16]}")
        try:
            opened = envelope.open_envelope(self.identity, rec.payload, now, self._replay)
        except EnvelopeRejected as exc:
            return _refused("refused:" + exc.reason, str(exc))
        if opened.sender_key != rec.signer:
            return _refused("refused:signer-mismatch", "envelope sender is not the signer")
        try:
            body = codec.unpack(opened.body)
        except codec.MalformedDatagram:
            body = None
        if not isinstance(body, dict):
            return _refused("refused:malformed-body", "not a map")
        sender, session_id = opened.sender_key, opened.session_id
        if opened.msg_type == MessageType.OFFER:
            return _offer(sender, session_id, body)
        if self._expected.get(session_id) != sender:
            if opened.msg_type == MessageType.ANSWER:
                return _refused("refused:unexpected-answer", f"session {session_id.hex()}")
            return None  # a rejection of a dial that has ended
        if opened.msg_type == MessageType.ANSWER:
            return _answer(sender, session_id, body)
        return RejectReceived(sender, session_id, str(body.get("why", "rejected"))[:MAX_WHY])


def _refused(counter: str, detail: str) -> Refused:
    log.debug("inbox record dropped: %s (%s)", counter, detail)
    return Refused(counter, detail)


def _expanded(blob: object, wanted: str) -> str | None:
    """The SDP text of a compact ``wanted`` description, or None if it is not one."""
    if not isinstance(blob, bytes):
        return None
    try:
        sdp_type, text = sdp.expand(blob)
    except ProtocolError:
        return None
    return text if sdp_type == wanted else None


def _offer(sender: bytes, session_id: bytes, body: dict[Any, Any]) -> OfferReceived | Refused:
    x, label = body.get("x"), body.get("id", "")
    if not isinstance(x, bytes) or len(x) != _X25519_SIZE:
        return _refused("refused:malformed-body", "offer without an X25519 key")
    text = _expanded(body.get("sdp"), "offer")
    if text is None:
        return _refused("refused:malformed-body", "offer without a compact SDP offer")
    return OfferReceived(
        sender,
        session_id,
        text,
        x,
        label if records.is_label(label) else "",
        tuple(_addrs(body.get("dht"))),
        ChannelOptions.from_wire(body.get("ch")),
    )


def _answer(
    sender: bytes, session_id: bytes, body: dict[Any, Any]
) -> AnswerReceived | AnswerMalformed:
    blob = body.get("sdp")
    if not isinstance(blob, bytes):
        return AnswerMalformed(sender, session_id, "answer carried no description")
    text = _expanded(blob, "answer")
    if text is None:
        return AnswerMalformed(sender, session_id, "answer is not an SDP answer")
    return AnswerReceived(sender, session_id, text)


def _addrs(item: object) -> list[Addr]:
    out: list[Addr] = []
    if isinstance(item, list):
        for a in item[:MAX_BODY_ADDRS]:
            if (
                isinstance(a, list)
                and len(a) == 2
                and isinstance(a[0], str)
                and isinstance(a[1], int)
                and 0 < a[1] < 65536
            ):
                out.append((a[0], a[1]))
    return out


__all__ = [
    "AnswerMalformed",
    "AnswerReceived",
    "ChannelOptions",
    "Inbox",
    "InboxEvent",
    "OfferReceived",
    "Refused",
    "RejectReceived",
]
