"""Signed records: the only kind of value dhtsignal nodes store for each other.

Theory of operation
-------------------
A record is a msgpack array::

    [version, network, rtype, key, signer, sub, seq, expires, payload, signature]

``version`` is 2; ``network`` is the network id of the DHT it is meant for (at most
:data:`MAX_NETWORK` bytes of UTF-8, :data:`DEFAULT_NETWORK` unless configured), so a record
of one network does not verify as a record of another: decoding refuses it as
``wrong-network`` before the signature is checked. Version 1 records, which did not carry
the network, are refused as ``bad-version``.
``rtype`` is a :class:`RecordType`; its high bit (:data:`TOMBSTONE`) marks a
tombstone, which empties its slot. ``key`` is the 20-byte DHT key. ``signer`` is
the 32-byte Ed25519 public key that signed it. A key holds many records, one per
*slot* ``(signer, rtype without the tombstone bit, sub)``; ``sub`` (at most 16
bytes, usually empty) lets one signer hold a few values under one key (an inbox
holds one envelope per session). A higher ``seq`` in the same slot replaces the
lower one. ``expires`` is wall-clock UNIX time; nobody keeps or serves a record
past it and publishers, not holders, refresh.

The signature covers a domain prefix and every field but itself, the network included. A record must
fit one datagram with room to spare: at most :data:`MAX_RECORD` bytes encoded.

Node-ID records (claim and presence) are stored under :func:`node_key` of their
label, so the same storing nodes see both and can enforce "first live claim
wins" (see :mod:`dhtsignal.dht.storage`).
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dhtsignal.errors import RecordRejected
from dhtsignal.identity import Identity, is_self_certifying, self_certifying_id, verify
from dhtsignal.wire import codec

VERSION = 2
"""Version 2 added the network id to the signed fields; version 1 records are refused."""
DEFAULT_NETWORK = "dhtsignal/1"
"""The network id of nodes and records unless configured (``NodeConfig.network``)."""
MAX_NETWORK = 64
"""Bytes of a network id, at most."""
KEY_BYTES = 20
MAX_RECORD = 1200
MAX_SUB = 16
MAX_SEQ = 2**63 - 1
TOMBSTONE = 0x80
_SIG_DOMAIN = b"dhtsignal/record/v2\x00"
_LABEL_RE = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
"""A label, matched whole (:meth:`re.Pattern.fullmatch`: ``$`` would also match before a
final newline)."""
_ANY_CASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HEX40_RE = re.compile(r"[0-9A-Fa-f]{40}")


class RecordType(enum.IntEnum):
    """What a record says. The value is on the wire."""

    CLAIM = 1  #: a long-lived claim of a node-ID label
    PRESENCE = 2  #: "I am online, reach me here"
    ROOM = 3  #: membership announcement in a room
    INBOX = 4  #: a sealed signaling envelope for the key's owner
    DATA = 5  #: an application value (``put``/``get`` of the library)


#: Maximum time to live per record type, seconds (storing nodes refuse longer).
MAX_TTL: dict[int, float] = {
    RecordType.CLAIM: 6 * 3600.0,
    RecordType.PRESENCE: 600.0,
    RecordType.ROOM: 600.0,
    RecordType.INBOX: 120.0,
    RecordType.DATA: 24 * 3600.0,
}
#: Clock skew tolerated between a publisher and a storing node, seconds.
CLOCK_SKEW = 30.0


def _typed_key(prefix: bytes, name: str) -> bytes:
    return hashlib.sha256(prefix + name.encode()).digest()[:KEY_BYTES]


def node_key(node_id: str) -> bytes:
    """DHT key of a node ID's claim and presence records."""
    return _typed_key(b"dhtsignal/node/", node_id)


def room_key(room: str) -> bytes:
    """DHT key of a room's announcements."""
    return _typed_key(b"dhtsignal/room/", room)


def inbox_key(public_key: bytes) -> bytes:
    """DHT key of the signaling inbox of the holder of ``public_key``."""
    return hashlib.sha256(b"dhtsignal/inbox/" + public_key).digest()[:KEY_BYTES]


def data_key(name: str) -> bytes:
    """DHT key of an application value named ``name``."""
    return _typed_key(b"dhtsignal/data/", name)


def check_label(label: object, what: str = "node id") -> str:
    """Return ``label`` if it is a valid node ID or room name, else raise ValueError
    saying why.

    A label is 1-64 characters of lower-case letters, digits, ``.``, ``_``, ``-`` and
    ``@``, starting with a letter or digit, matched whole (no trailing newline). Upper
    case is refused rather than folded: labels are compared byte for byte, so ``Alice``
    and ``alice`` would be two names a reader takes for one. 40 hex digits are a
    self-certifying ID (see :func:`~dhtsignal.identity.is_self_certifying`) and must be
    written in lower case: in upper case they would be a plain label anyone can claim.
    """
    if isinstance(label, str) and _LABEL_RE.fullmatch(label):
        return label
    shown = repr(label)
    if isinstance(label, str) and _ANY_CASE_RE.fullmatch(label):
        if _HEX40_RE.fullmatch(label):
            raise ValueError(
                f"{what} {shown} is invalid: 40 hex digits are a self-certifying ID and must "
                f"be lower case ({label.lower()!r}); in upper case they would be a plain "
                "label anyone could claim"
            )
        raise ValueError(
            f"{what} {shown} is invalid: labels are lower case only (they are compared byte "
            f"for byte, so a mixed-case name would be another name); use {label.lower()!r}"
        )
    if isinstance(label, str) and any(not c.isprintable() for c in label):
        raise ValueError(
            f"{what} {shown} is invalid: it contains a control character such as a newline"
        )
    raise ValueError(
        f"{what} {shown} is invalid: 1-64 characters of lower-case letters, digits, '.', '_',"
        " '-', '@', starting with a letter or digit"
    )


def is_label(label: object) -> bool:
    """Whether :func:`check_label` accepts ``label`` (for data from the network)."""
    return isinstance(label, str) and _LABEL_RE.fullmatch(label) is not None


@dataclass(frozen=True, slots=True)
class Record:
    """A decoded, signature-checked record. Build with :func:`sign`, read with :func:`decode`."""

    rtype: int
    key: bytes
    signer: bytes
    sub: bytes
    seq: int
    expires: float
    payload: bytes
    signature: bytes
    raw: bytes
    network: str = DEFAULT_NETWORK
    """The network id the record was signed for."""

    @property
    def type(self) -> int:
        """The record type without the tombstone bit."""
        return self.rtype & ~TOMBSTONE

    @property
    def is_tombstone(self) -> bool:
        """Whether this record empties its slot."""
        return bool(self.rtype & TOMBSTONE)

    @property
    def slot(self) -> tuple[bytes, int, bytes]:
        """The slot this record occupies under its key."""
        return (self.signer, self.rtype & ~TOMBSTONE, self.sub)

    def fields(self) -> dict[str, Any]:
        """The payload decoded as a msgpack map (empty for tombstones or non-maps)."""
        if not self.payload:
            return {}
        try:
            obj = codec.unpack(self.payload)
        except codec.MalformedDatagram:
            return {}
        return obj if isinstance(obj, dict) else {}


def _signed_part(
    network: str,
    rtype: int,
    key: bytes,
    signer: bytes,
    sub: bytes,
    seq: int,
    expires: float,
    payload: bytes,
) -> bytes:
    fields = [VERSION, network, rtype, key, signer, sub, seq, expires, payload]
    return _SIG_DOMAIN + codec.pack(fields)


def sign(
    identity: Identity,
    rtype: int,
    key: bytes,
    payload: bytes,
    *,
    seq: int,
    expires: float,
    sub: bytes = b"",
    tombstone: bool = False,
    network: str = DEFAULT_NETWORK,
) -> Record:
    """Build and sign a record.

    :param identity: the signer.
    :param rtype: a :class:`RecordType`.
    :param key: the 20-byte DHT key.
    :param payload: the payload bytes (msgpack map by convention; empty for tombstones).
    :param seq: sequence number; higher replaces lower in the same slot.
    :param expires: wall-clock UNIX time after which the record is dead.
    :param sub: slot discriminator, at most 16 bytes.
    :param tombstone: build a tombstone for the slot instead of a value.
    :param network: the network id of the DHT the record is for.
    :raises RecordRejected: ``oversized`` if it would not fit a datagram.
    """
    if len(key) != KEY_BYTES or len(sub) > MAX_SUB or not 0 <= seq <= MAX_SEQ:
        raise RecordRejected("bad-field", "key must be 20 bytes, sub at most 16, seq >= 0")
    t = (int(rtype) | TOMBSTONE) if tombstone else int(rtype)
    body = b"" if tombstone else payload
    expires = float(expires)
    if not math.isfinite(expires):
        raise RecordRejected("bad-field", "expires must be a finite time")
    if len(network.encode()) > MAX_NETWORK:
        raise RecordRejected("bad-field", f"a network id is at most {MAX_NETWORK} bytes")
    signer = identity.public_key
    sig = identity.sign(_signed_part(network, t, key, signer, sub, seq, expires, body))
    raw = codec.pack([VERSION, network, t, key, signer, sub, seq, expires, body, sig])
    if len(raw) > MAX_RECORD:
        raise RecordRejected("oversized", f"record is {len(raw)} bytes, limit {MAX_RECORD}")
    return Record(t, key, signer, sub, seq, expires, body, sig, raw, network)


def decode(raw: Any, network: str = DEFAULT_NETWORK) -> Record:
    """Parse and verify one record from the wire.

    Checks shape, version, network, sizes, type and signature; not freshness or key
    binding (see :func:`validate`).

    :param raw: the record as received.
    :param network: the network id the record must have been signed for.
    :raises RecordRejected: with a reason tag (``bad-version`` for a version 1 record,
        ``wrong-network`` for one of another network).
    """
    if type(raw) is not bytes:
        raise RecordRejected("malformed", "record is not bytes")
    if len(raw) > MAX_RECORD:
        raise RecordRejected("oversized", f"{len(raw)} bytes")
    try:
        obj = codec.unpack(raw)
    except codec.MalformedDatagram:
        raise RecordRejected("malformed", "undecodable") from None
    if type(obj) is not list or not obj:
        raise RecordRejected("malformed", "not an array")
    version = obj[0]
    if type(version) is not int or version != VERSION:  # True == 1, but is not a version
        raise RecordRejected("bad-version", f"{version!r} (this node reads {VERSION})")
    if len(obj) != 10:
        raise RecordRejected("malformed", "not a 10-field array")
    _, net, t, key, signer, sub, seq, expires, payload, sig = obj
    if type(net) is not str:
        raise RecordRejected("malformed", "network id not text")
    if net != network:
        raise RecordRejected("wrong-network", f"signed for network {net[:MAX_NETWORK]!r}")
    if (
        type(t) is not int
        or type(key) is not bytes
        or type(signer) is not bytes
        or type(sub) is not bytes
        or type(seq) is not int
        or type(expires) is not float
        or type(payload) is not bytes
        or type(sig) is not bytes
    ):
        raise RecordRejected("malformed", "field types")
    if codec.pack(obj) != raw:
        # One record, one encoding: msgpack also reads e.g. int16 for a uint16 seq,
        # which would give the same signed content under different bytes.
        raise RecordRejected("malformed", "not canonically encoded")
    if not math.isfinite(expires):  # a NaN expiry never compares as past: kept forever
        raise RecordRejected("malformed", "expires not finite")
    if len(key) != KEY_BYTES or len(signer) != 32 or len(sub) > MAX_SUB or len(sig) != 64:
        raise RecordRejected("malformed", "field sizes")
    if not 0 <= seq <= MAX_SEQ:
        raise RecordRejected("malformed", "seq out of range")
    if (t & ~TOMBSTONE) not in MAX_TTL:
        raise RecordRejected("bad-type", str(t))
    if t & TOMBSTONE and payload:
        raise RecordRejected("malformed", "tombstone with payload")
    if not verify(signer, _signed_part(net, t, key, signer, sub, seq, expires, payload), sig):
        raise RecordRejected("bad-signature")
    return Record(t, key, signer, sub, seq, expires, payload, sig, raw, net)


def validate(record: Record, now: float) -> None:
    """Check freshness, TTL bound and key binding of a verified record.

    :param now: wall-clock UNIX time.
    :raises RecordRejected: ``expired``, ``ttl-too-long``, ``wrong-key`` or ``bad-label``
        (a node ID or room name that :func:`check_label` refuses: labels are checked
        again after every unpack).
    """
    if not record.expires > now:  # also refuses a NaN expiry
        raise RecordRejected("expired")
    if record.expires > now + MAX_TTL[record.type] + CLOCK_SKEW:
        raise RecordRejected("ttl-too-long")
    if record.type in (RecordType.CLAIM, RecordType.PRESENCE) and not record.is_tombstone:
        label = record.fields().get("id")
        if isinstance(label, str) and not is_label(label):
            raise RecordRejected("bad-label", f"node id {label[:80]!r} is not a valid label")
        if not isinstance(label, str) or node_key(label) != record.key:
            raise RecordRejected("wrong-key", "node-id record not under node_key(id)")
        if is_self_certifying(label) and self_certifying_id(record.signer) != label:
            raise RecordRejected("wrong-key", "self-certifying id does not match signer")
    elif record.type == RecordType.ROOM and not record.is_tombstone:
        room = record.fields().get("room")
        if isinstance(room, str) and not is_label(room):
            raise RecordRejected("bad-label", f"room {room[:80]!r} is not a valid label")
        if not isinstance(room, str) or room_key(room) != record.key:
            raise RecordRejected("wrong-key", "room record not under room_key(room)")


def check_all(
    raws: Iterable[Any],
    now: float,
    counts: Counter[str] | None = None,
    prefix: str = "refused:",
    *,
    key: bytes | None = None,
    network: str = DEFAULT_NETWORK,
) -> list[Record | str]:
    """Decode and validate each of ``raws`` (the one decode-validate-count loop).

    :param raws: records as received (anything: each is checked).
    :param now: wall-clock UNIX time (freshness).
    :param counts: where refusals are counted as ``prefix + reason`` (None: not counted).
    :param prefix: the counter prefix.
    :param key: if given, a record under another key is refused as ``wrong-key``.
    :param network: the network id records must be signed for (else ``wrong-network``).
    :returns: per input, in order, the record or the reason it was refused.
    """
    out: list[Record | str] = []
    for raw in raws:
        try:
            rec = decode(raw, network)
            validate(rec, now)
            if key is not None and rec.key != key:
                raise RecordRejected("wrong-key", "record under another key")
        except RecordRejected as exc:
            if counts is not None:
                counts[prefix + exc.reason] += 1
            out.append(exc.reason)
            continue
        out.append(rec)
    return out


def checked(
    raws: Iterable[Any],
    now: float,
    counts: Counter[str] | None = None,
    prefix: str = "refused:",
    *,
    key: bytes | None = None,
    network: str = DEFAULT_NETWORK,
) -> list[Record]:
    """The records of ``raws`` that pass :func:`check_all` (refusals counted, dropped)."""
    checks = check_all(raws, now, counts, prefix, key=key, network=network)
    return [r for r in checks if type(r) is Record]


def newest(records: list[Record]) -> list[Record]:
    """Merge records from several holders: the highest ``seq`` per slot wins."""
    best: dict[tuple[bytes, int, bytes], Record] = {}
    for r in records:
        cur = best.get(r.slot)
        if cur is None or r.seq > cur.seq:
            best[r.slot] = r
    return list(best.values())
