"""Node IDs, presence and rooms: who is online and how to reach them.

Theory of operation
-------------------
A peer with label ``alice`` publishes, under ``node_key("alice")``, a long-lived
CLAIM record and a short-lived PRESENCE record, both signed by its Ed25519 key.
Storing nodes refuse records of any other key under that node key while a live
claim exists (first live claim wins, :mod:`dhtsignal.dht.storage`). It also
publishes PRESENCE under ``node_key(self_id)`` (the self-certifying form, which
storing nodes and readers bind to the key's hash) and a ROOM record under
``room_key(room)`` for each of its rooms. :class:`Presence` refreshes all of them
at half their lifetime and, on :meth:`Presence.stop`, replaces them with
tombstones so the peer is offline for everyone at once. A crashed peer simply
stops refreshing and its records expire.

Readers (:func:`resolve`, :func:`room_peers`) verify everything again: they pick
the owner of a label (a key pinned in :class:`KnownPeers` first; otherwise the
key whose claim most storing nodes hold, the oldest claim breaking ties), refuse
presence from other keys, and fail loudly when a pinned key changed (like SSH's
known_hosts).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from dhtsignal.aio.node import DhtNode
from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.records import Record, RecordType, node_key, room_key
from dhtsignal.errors import PeerNotFound, PinnedKeyChanged, UsageError
from dhtsignal.identity import Identity, is_self_certifying, self_certifying_id
from dhtsignal.wire import codec

log = logging.getLogger(__name__)

DEFAULT_ROOM = "lobby"
#: Room members resolved at once by :func:`room_peers`.
ROOM_RESOLVE_CONCURRENCY = 8
_MAX_ADDRESSES = 4


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
        }


def _addresses(node: DhtNode) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    if node.address is not None and node.address[0] not in ("0.0.0.0", "::"):
        out.append(node.address)
    for addr, _ in node.observed.most_common(_MAX_ADDRESSES):
        if addr not in out:
            out.append(addr)
    return out[:_MAX_ADDRESSES]


class Presence:
    """Publishes and refreshes a peer's claim, presence and room records.

    :param node: the peer's DHT node.
    :param identity: the peer's key.
    :param node_id: its label (``--node-id``).
    :param rooms: rooms to announce itself in (default ``lobby``).
    :param ttl: lifetime of presence and room records, seconds.
    :param claim_ttl: lifetime of the node-ID claim, seconds.
    """

    def __init__(
        self,
        node: DhtNode,
        identity: Identity,
        node_id: str,
        rooms: list[str] | None = None,
        *,
        ttl: float = 120.0,
        claim_ttl: float = 3600.0,
    ) -> None:
        self.node = node
        self.identity = identity
        self.node_id = records.check_label(node_id)
        self.rooms = [records.check_label(r, "room") for r in (rooms or [DEFAULT_ROOM])]
        if ttl <= 0 or claim_ttl <= 0:
            raise UsageError("presence and claim TTLs must be positive")
        self.ttl = min(ttl, records.MAX_TTL[RecordType.PRESENCE])
        self.claim_ttl = min(claim_ttl, records.MAX_TTL[RecordType.CLAIM])
        self.claimed_at = node.wallclock()
        self._claim_due = 0.0
        self._task: asyncio.Task[Any] | None = None
        self._last_seq = 0

    def _seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, int(self.node.wallclock() * 1000))
        return self._last_seq

    def _payload(self, **extra: Any) -> bytes:
        fields = {
            "id": self.node_id,
            "sid": self.identity.self_id,
            "x": self.identity.x25519_public,
            "a": [[h, p] for h, p in _addresses(self.node)],
            "r": self.rooms,
            "t": self.claimed_at,
        }
        fields.update(extra)
        return codec.pack(fields)

    def _sign(self, rtype: RecordType, key: bytes, payload: bytes, ttl: float) -> Record:
        now = self.node.wallclock()
        return records.sign(self.identity, rtype, key, payload, seq=self._seq(), expires=now + ttl)

    async def publish(self) -> None:
        """Publish presence (and the claim when due) once.

        :raises NodeIdTaken: another key holds the node ID.
        """
        now = self.node.wallclock()
        label_key = node_key(self.node_id)
        batch = [self._sign(RecordType.PRESENCE, label_key, self._payload(), self.ttl)]
        if now >= self._claim_due:
            claim = codec.pack({"id": self.node_id, "t": self.claimed_at})
            batch.insert(0, self._sign(RecordType.CLAIM, label_key, claim, self.claim_ttl))
        puts = [self.node.put(batch)]
        if self.identity.self_id != self.node_id:
            sid_payload = self._payload(id=self.identity.self_id)
            sid_key = node_key(self.identity.self_id)
            puts.append(
                self.node.put([self._sign(RecordType.PRESENCE, sid_key, sid_payload, self.ttl)])
            )
        for room in self.rooms:
            rec = self._sign(RecordType.ROOM, room_key(room), self._payload(room=room), self.ttl)
            puts.append(self.node.put([rec]))
        results = await asyncio.gather(*puts, return_exceptions=True)
        if isinstance(results[0], BaseException):
            raise results[0]
        for r in results[1:]:
            if isinstance(r, BaseException):
                log.debug("presence put failed: %s", r)
        if len(batch) == 2:
            self._claim_due = now + self.claim_ttl / 2

    async def start(self) -> None:
        """Claim the node ID, publish, and keep refreshing at half the TTL.

        :raises NodeIdTaken: another key holds a live claim on the node ID.
        """
        await self.publish()
        self._task = self.node.spawn(self._refresh(), name="presence-refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 2)
            try:
                await self.publish()
            except Exception as exc:  # keep refreshing through transient failures
                log.warning("presence refresh failed: %s", exc)

    async def stop(self) -> None:
        """Replace presence and room records with tombstones (offline at once)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        keys = [(RecordType.PRESENCE, node_key(self.node_id))]
        if self.identity.self_id != self.node_id:
            keys.append((RecordType.PRESENCE, node_key(self.identity.self_id)))
        keys += [(RecordType.ROOM, room_key(room)) for room in self.rooms]
        now = self.node.wallclock()
        tombs = [
            records.sign(
                self.identity, t, k, b"", seq=self._seq(), expires=now + self.ttl, tombstone=True
            )
            for t, k in keys
        ]
        results = await asyncio.gather(*(self.node.put([t]) for t in tombs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.debug("tombstone put failed: %s", r)


def _owner(
    node_id: str, recs: list[Record], support: dict[bytes, int], known: KnownPeers | None
) -> bytes | None:
    """The key that owns ``node_id`` among verified records, applying pins.

    Storing nodes keep one claimant per node ID (the first live claim), so the owner is
    the claimant that the most storing nodes answered with (``support``). A claim's own
    time ``t`` is written by the claimant and could be backdated: it only breaks ties.
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


def _info(node: DhtNode, node_id: str, rec: Record) -> PeerInfo:
    f = rec.fields()
    addrs: list[tuple[str, int]] = []
    for a in f.get("a", [])[:_MAX_ADDRESSES] if isinstance(f.get("a"), list) else []:
        if isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int):
            addrs.append((a[0], a[1]))
    rooms = (
        [r for r in f.get("r", []) if isinstance(r, str)] if isinstance(f.get("r"), list) else []
    )
    x = f.get("x")
    return PeerInfo(
        node_id=node_id,
        key=rec.signer.hex(),
        self_id=self_certifying_id(rec.signer),
        rooms=rooms,
        addresses=addrs,
        x25519=x if isinstance(x, bytes) and len(x) == 32 else b"",
        expires_in=max(0.0, rec.expires - node.wallclock()),
    )


async def resolve(node: DhtNode, node_id: str, known: KnownPeers | None = None) -> PeerInfo:
    """Find the live presence of ``node_id`` (a label or a self-certifying ID).

    Pins the key on first sight when ``known`` is given.

    :raises PeerNotFound: offline (signed off or expired) or never seen.
    :raises PinnedKeyChanged: the pinned key no longer holds the node ID.
    """
    try:
        records.check_label(node_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    held = await node.get_held(node_key(node_id), include_tombstones=True)
    recs = held.records
    if is_self_certifying(node_id):
        recs = [r for r in recs if self_certifying_id(r.signer) == node_id]
    owner = _owner(node_id, recs, held.support, known)
    if owner is None:
        raise PeerNotFound(f"{node_id}: unknown (no claim or presence record in the DHT)")
    mine = [r for r in recs if r.signer == owner and r.type == RecordType.PRESENCE]
    if not mine:
        raise PeerNotFound(f"{node_id}: offline (its presence record expired)")
    if mine[0].is_tombstone:
        raise PeerNotFound(f"{node_id}: offline (signed off)")
    info = _info(node, node_id, mine[0])
    if not info.x25519:
        raise PeerNotFound(f"{node_id}: presence record carries no usable key")
    if known is not None:
        known.pin(node_id, info.key)
    return info


async def room_peers(node: DhtNode, room: str, known: KnownPeers | None = None) -> list[PeerInfo]:
    """The online peers of ``room``, each verified through its own node-ID records."""
    try:
        records.check_label(room, "room")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    recs = await node.get(room_key(room))
    members: dict[str, bytes] = {}
    for r in recs:
        label = r.fields().get("id")
        if isinstance(label, str) and r.type == RecordType.ROOM:
            members.setdefault(label, r.signer)
    sem = asyncio.Semaphore(ROOM_RESOLVE_CONCURRENCY)

    async def check(label: str, signer: bytes) -> PeerInfo | None:
        async with sem:
            try:
                info = await resolve(node, label, known)
            except (PeerNotFound, UsageError) as exc:
                log.debug("room member %s skipped: %s", label, exc)
                return None
        return info if info.public_key == signer else None

    found = await asyncio.gather(*(check(lb, s) for lb, s in sorted(members.items())))
    return [p for p in found if p is not None]
