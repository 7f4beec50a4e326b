"""Presence records: what a peer publishes to be found, and who owns a node ID.

Theory of operation
-------------------
This module is the presence protocol without I/O: it reads no clock (every method takes
``now``, wall-clock UNIX seconds, the time records expire by) and sends nothing. The
asyncio driver is :class:`dhtsignal.presence.Presence`; the simulator drives the same
objects on virtual time.

Publishing. :class:`PresenceRecords` holds a peer's identity, label, rooms and lifetimes.
:meth:`PresenceRecords.publication` returns the record batches to put at ``now``, each a
separate put, in this order:

1. under ``node_key(label)``: the CLAIM (when it is due) followed by the PRESENCE record;
   this batch must be stored (a refusal means another key holds the label);
2. under ``node_key(self_id)``: the self-certifying PRESENCE (unless the label *is* the
   self-certifying ID);
3. one ROOM record under ``room_key(room)`` per room.

Failures of batches 2 and 3 are only logged by the drivers. Once batch 1 was stored the
driver calls :meth:`PresenceRecords.published`; the claim is then not due again until
half its lifetime has passed. Everything is refreshed every
:attr:`PresenceRecords.refresh_interval` (a third of the presence lifetime, default
:data:`DEFAULT_TTL` 60 s) after the previous publication ended.
:meth:`PresenceRecords.sign_off` returns one tombstone per presence and room record, each
put on its own, so the peer is offline for everyone at once.

Record payloads (msgpack maps)::

    CLAIM     {"id": label, "t": claimed-at}
    PRESENCE  {"id": label or self_id, "sid": self_id, "x": X25519 key,
               "a": [[host, port], ...], "r": rooms, "t": claimed-at,
               "c": 1 when its DHT node is in client mode (absent otherwise),
               "n": its NAT type, "open", "cone" or "symmetric" (absent: unknown),
               "h": [[host, port], ...] the DHT nodes holding its inbox subscription
                    (client mode: a caller stores an offer there at once)}
    ROOM      the PRESENCE fields with "id": label, plus "room": room

Sequence numbers are wall-clock milliseconds, strictly increasing per peer.

Reading. :func:`identify` turns what a get found under ``node_key(node_id)``
(:class:`~dhtsignal.dht.node.HeldRecords`) into a :class:`PeerInfo` or an error: it
picks the owner of the node ID (:func:`owner`: a key pinned in
:class:`~dhtsignal.datadir.KnownPeers` first; otherwise the key whose claim most storing
nodes hold, the oldest claim breaking ties), refuses presence from other keys, and fails
loudly when a pinned key changed (like SSH's known_hosts). It only reads pins; pinning
on first sight is the caller's (it writes a file).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.node import HeldRecords
from dhtsignal.dht.records import Record, RecordType, node_key, room_key
from dhtsignal.errors import PeerNotFound, PinnedKeyChanged, UsageError
from dhtsignal.identity import Identity, is_self_certifying, self_certifying_id
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

DEFAULT_ROOM = "lobby"
#: Default lifetime of presence and room records, seconds. A crashed peer stays listed
#: at most this long (``lookup`` shows ``refreshed_ago``; a dial reports it as not
#: responding within a second); it is refreshed every third of it (20 s), a put to 8
#: storing nodes per record, which also keeps NAT mappings (30 s unreplied) open.
DEFAULT_TTL = 60.0
#: Most addresses a presence record carries (and a reader keeps).
MAX_ADDRESSES = 4
#: NAT types a presence record may announce (``"n"``, see :mod:`dhtsignal.nat`).
NAT_TYPES = ("open", "cone", "symmetric")


@dataclass(frozen=True)
class PeerInfo:
    """One online peer, as read from its verified presence record."""

    node_id: str
    """The label it was looked up by (or its self-certifying ID)."""
    key: str
    """Hex of its Ed25519 public key."""
    self_id: str
    """Its self-certifying ID."""
    rooms: list[str]
    """Rooms it announced itself in."""
    addresses: list[tuple[str, int]]
    """Where its DHT node listens and where DHT nodes saw it from."""
    x25519: bytes
    """Its X25519 public key (for sealing signaling envelopes)."""
    expires_in: float
    """Seconds until its presence record expires unless refreshed."""
    client_mode: bool = False
    """Its DHT node runs in client mode (behind a NAT): an unsolicited push to its
    addresses may not arrive, so a dial does not read silence as a crash."""
    holders: list[tuple[str, int]] = field(default_factory=list)
    """The DHT nodes that hold its inbox subscription (client mode): storing an offer
    there reaches it at once through the mappings its keepalives hold open."""
    nat: str = "unknown"
    """Its NAT type as it classified itself (:mod:`dhtsignal.nat`): ``open``, ``cone``,
    ``symmetric`` or ``unknown``."""
    refreshed_ago: float = 0.0
    """Seconds since the presence record was signed (its last refresh; the record's
    sequence number is its signing time in wall-clock milliseconds). A live peer
    refreshes every third of its TTL; much more than that means it stopped refreshing
    (crashed) and its record has not expired yet."""

    @property
    def public_key(self) -> bytes:
        """The Ed25519 public key as bytes."""
        return bytes.fromhex(self.key)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (the ``--json`` output of ``peers`` and ``lookup``)."""
        return {
            "node_id": self.node_id,
            "key": self.key,
            "self_id": self.self_id,
            "rooms": list(self.rooms),
            "addresses": [[h, p] for h, p in self.addresses],
            "expires_in": round(self.expires_in, 1),
            "refreshed_ago": round(self.refreshed_ago, 1),
            "client_mode": self.client_mode,
            "nat": self.nat,
            "holders": [[h, p] for h, p in self.holders],
        }


def node_addresses(address: Addr | None, observed: Counter[Addr]) -> list[tuple[str, int]]:
    """The addresses a presence record announces: where the node listens (unless it is a
    wildcard), then where other nodes saw it from most often; at most
    :data:`MAX_ADDRESSES`.

    :param address: the node's bound address.
    :param observed: how often DHT nodes reported each source address of ours.
    """
    out: list[tuple[str, int]] = []
    if address is not None and address[0] not in ("0.0.0.0", "::"):
        out.append(address)
    for addr, _ in observed.most_common(MAX_ADDRESSES):
        if addr not in out:
            out.append(addr)
    return out[:MAX_ADDRESSES]


@dataclass(frozen=True)
class Publication:
    """The record batches of one publication (see :meth:`PresenceRecords.publication`)."""

    now: float
    """Wall-clock time it was made at."""
    batches: list[list[Record]]
    """One put each; the first (claim when due, presence under the label) must succeed."""

    @property
    def claims(self) -> bool:
        """Whether the first batch carries the claim."""
        return self.batches[0][0].type == RecordType.CLAIM


class PresenceRecords:
    """The records a peer publishes to be found (claim, presence, rooms), and its
    tombstones. Takes the time as an argument; does no I/O.

    :param identity: the peer's key.
    :param node_id: its label (``--node-id``).
    :param rooms: rooms to announce itself in (default ``lobby``).
    :param ttl: lifetime of presence and room records, seconds (capped at the maximum
        lifetime of presence records).
    :param claim_ttl: lifetime of the node-ID claim, seconds (capped likewise).
    :param claimed_at: wall-clock time of the claim (the ``t`` of every record).
    :param client_mode: the peer's DHT node runs in client mode (behind a NAT): its
        presence says so (``"c": 1``), and dialers do not expect it to acknowledge an
        unsolicited push.
    :param network: the network id the records are signed for (the DHT's).
    :param nat: the peer's NAT type (``"n"``; ``unknown`` is left out); may be changed
        between publications (:attr:`nat`).
    :raises UsageError: a TTL is not positive.
    :raises ValueError: a label or room is not a valid label.
    """

    def __init__(
        self,
        identity: Identity,
        node_id: str,
        rooms: list[str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        claim_ttl: float = 3600.0,
        claimed_at: float,
        client_mode: bool = False,
        network: str = records.DEFAULT_NETWORK,
        nat: str = "unknown",
    ) -> None:
        self.identity = identity
        self.client_mode = client_mode
        self.nat = nat
        """The NAT type the next publication announces."""
        self.network = network
        """The network id the records are signed for."""
        self.node_id = records.check_label(node_id)
        self.rooms = [records.check_label(r, "room") for r in (rooms or [DEFAULT_ROOM])]
        if ttl <= 0 or claim_ttl <= 0:
            raise UsageError("presence and claim TTLs must be positive")
        self.ttl = min(ttl, records.MAX_TTL[RecordType.PRESENCE])
        self.claim_ttl = min(claim_ttl, records.MAX_TTL[RecordType.CLAIM])
        self.claimed_at = claimed_at
        self.claim_due = 0.0
        """Wall-clock time from which a publication carries the claim again."""
        self._last_seq = 0
        self._holders: list[list[Any]] = []

    @property
    def refresh_interval(self) -> float:
        """Seconds from the end of one publication to the next: a third of the lifetime,
        so that a record outlives one failed refresh with a third of its life to spare."""
        return self.ttl / 3

    def _seq(self, now: float) -> int:
        self._last_seq = max(self._last_seq + 1, int(now * 1000))
        return self._last_seq

    def _payload(self, addresses: list[tuple[str, int]], **extra: Any) -> bytes:
        fields = {
            "id": self.node_id,
            "sid": self.identity.self_id,
            "x": self.identity.x25519_public,
            "a": [[h, p] for h, p in addresses],
            "r": self.rooms,
            "t": self.claimed_at,
        }
        if self.client_mode:
            fields["c"] = 1
        if self.nat in NAT_TYPES:
            fields["n"] = self.nat
        if self._holders:
            fields["h"] = self._holders
        fields.update(extra)
        return codec.pack(fields)

    def _sign(
        self, rtype: RecordType, key: bytes, payload: bytes, ttl: float, now: float
    ) -> Record:
        return records.sign(
            self.identity,
            rtype,
            key,
            payload,
            seq=self._seq(now),
            expires=now + ttl,
            network=self.network,
        )

    def publication(
        self,
        now: float,
        addresses: list[tuple[str, int]],
        holders: list[tuple[str, int]] | None = None,
    ) -> Publication:
        """The batches to put now (see the module docstring for their order).

        :param now: wall-clock time.
        :param addresses: the node's addresses (:func:`node_addresses`).
        :param holders: the nodes holding its inbox subscription (``"h"``, client mode).
        """
        self._holders = [[h, p] for h, p in (holders or [])[:MAX_ADDRESSES]]
        label_key = node_key(self.node_id)
        first = [
            self._sign(RecordType.PRESENCE, label_key, self._payload(addresses), self.ttl, now)
        ]
        if now >= self.claim_due:
            claim = codec.pack({"id": self.node_id, "t": self.claimed_at})
            first.insert(0, self._sign(RecordType.CLAIM, label_key, claim, self.claim_ttl, now))
        batches = [first]
        if self.identity.self_id != self.node_id:
            sid_payload = self._payload(addresses, id=self.identity.self_id)
            sid_key = node_key(self.identity.self_id)
            batches.append([self._sign(RecordType.PRESENCE, sid_key, sid_payload, self.ttl, now)])
        for room in self.rooms:
            payload = self._payload(addresses, room=room)
            batches.append([self._sign(RecordType.ROOM, room_key(room), payload, self.ttl, now)])
        return Publication(now, batches)

    def published(self, publication: Publication) -> None:
        """The first batch of ``publication`` was stored: a claim in it is not due again
        for half its lifetime.

        :param publication: from :meth:`publication`.
        """
        if publication.claims:
            self.claim_due = publication.now + self.claim_ttl / 2

    def sign_off(self, now: float) -> list[Record]:
        """Tombstones for every presence and room record, each to be put on its own.

        :param now: wall-clock time.
        """
        keys = [(RecordType.PRESENCE, node_key(self.node_id))]
        if self.identity.self_id != self.node_id:
            keys.append((RecordType.PRESENCE, node_key(self.identity.self_id)))
        keys += [(RecordType.ROOM, room_key(room)) for room in self.rooms]
        return [
            records.sign(
                self.identity,
                t,
                k,
                b"",
                seq=self._seq(now),
                expires=now + self.ttl,
                tombstone=True,
                network=self.network,
            )
            for t, k in keys
        ]


def owner(
    node_id: str, recs: list[Record], support: dict[bytes, int], known: KnownPeers | None
) -> bytes | None:
    """The key that owns ``node_id`` among verified records, applying pins.

    Storing nodes keep one claimant per node ID (the first live claim), so the owner is
    the claimant that the most storing nodes answered with (``support``). A claim's own
    time ``t`` is written by the claimant and could be backdated: it only breaks ties.

    :param node_id: the label or self-certifying ID.
    :param recs: the records found under its node key.
    :param support: per signer, how many storing nodes answered with its records.
    :param known: pinned keys (only read).
    :raises PinnedKeyChanged: the pinned key no longer claims the node ID.
    """
    claims: dict[bytes, tuple[int, float, bytes]] = {}
    for r in recs:
        if r.type in (RecordType.CLAIM, RecordType.PRESENCE) and not r.is_tombstone:
            t = r.fields().get("t")
            at = float(t) if isinstance(t, int | float) else float("inf")
            rank = (-support.get(r.signer, 0), at, r.signer)
            claims[r.signer] = min(rank, claims.get(r.signer, rank))
    pinned = known.get(node_id) if known is not None else None
    if pinned is not None:
        if bytes.fromhex(pinned) in claims:
            return bytes.fromhex(pinned)
        if claims:
            raise PinnedKeyChanged(node_id, pinned, min(claims.values())[2].hex())
        return bytes.fromhex(pinned)
    if not claims:
        # Only tombstones (signed off) or nothing at all.
        tomb = next((r.signer for r in recs if r.is_tombstone), None)
        return tomb
    return min(claims.values())[2]


def peer_info(node_id: str, rec: Record, now: float) -> PeerInfo:
    """What a presence record says, defensively parsed (bad fields read as empty).

    :param node_id: the node ID it was looked up by.
    :param rec: a verified PRESENCE record.
    :param now: wall-clock time (for ``expires_in``).
    """
    f = rec.fields()
    addrs: list[tuple[str, int]] = []
    for a in f.get("a", [])[:MAX_ADDRESSES] if isinstance(f.get("a"), list) else []:
        if isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int):
            addrs.append((a[0], a[1]))
    rooms = (
        [r for r in f.get("r", []) if isinstance(r, str)] if isinstance(f.get("r"), list) else []
    )
    x = f.get("x")
    holders: list[tuple[str, int]] = []
    for a in f.get("h", [])[:MAX_ADDRESSES] if isinstance(f.get("h"), list) else []:
        if isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int):
            holders.append((a[0], a[1]))
    return PeerInfo(
        node_id=node_id,
        key=rec.signer.hex(),
        self_id=self_certifying_id(rec.signer),
        rooms=rooms,
        addresses=addrs,
        x25519=x if isinstance(x, bytes) and len(x) == 32 else b"",
        expires_in=max(0.0, rec.expires - now),
        refreshed_ago=max(0.0, now - rec.seq / 1000),
        client_mode=f.get("c") == 1,
        nat=f["n"] if f.get("n") in NAT_TYPES else "unknown",
        holders=holders,
    )


def identify(node_id: str, held: HeldRecords, known: KnownPeers | None, now: float) -> PeerInfo:
    """The live presence of ``node_id`` in what a get of ``node_key(node_id)`` found
    (tombstones included).

    :param node_id: a label or a self-certifying ID (already checked as a label).
    :param held: the get's records and per-signer support.
    :param known: pinned keys (only read; the caller pins the result).
    :param now: wall-clock time.
    :raises PeerNotFound: offline (signed off or expired) or never seen.
    :raises PinnedKeyChanged: the pinned key no longer holds the node ID.
    """
    recs = held.records
    if is_self_certifying(node_id):
        recs = [r for r in recs if self_certifying_id(r.signer) == node_id]
    key = owner(node_id, recs, held.support, known)
    if key is None:
        raise PeerNotFound(f"{node_id}: unknown (no claim or presence record in the DHT)")
    mine = [r for r in recs if r.signer == key and r.type == RecordType.PRESENCE]
    if not mine:
        raise PeerNotFound(f"{node_id}: offline (its presence record expired)")
    if mine[0].is_tombstone:
        raise PeerNotFound(f"{node_id}: offline (signed off)")
    info = peer_info(node_id, mine[0], now)
    if not info.x25519:
        raise PeerNotFound(f"{node_id}: presence record carries no usable key")
    return info
