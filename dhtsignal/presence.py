"""Node IDs, presence and rooms: who is online and how to reach them (the asyncio side).

Theory of operation
-------------------
A peer with label ``alice`` publishes, under ``node_key("alice")``, a long-lived
CLAIM record and a short-lived PRESENCE record, both signed by its Ed25519 key.
Storing nodes refuse records of any other key under that node key while a live
claim exists (first live claim wins, :mod:`dhtsignal.dht.storage`). It also
publishes PRESENCE under ``node_key(self_id)`` (the self-certifying form, which
storing nodes and readers bind to the key's hash) and a ROOM record under
``room_key(room)`` for each of its rooms. :class:`Presence` refreshes all of them
every third of their lifetime and, on :meth:`Presence.stop`, replaces them with
tombstones so the peer is offline for everyone at once. A crashed peer simply
stops refreshing and its records expire.

Readers (:func:`resolve`, :func:`room_peers`) verify everything again: they pick
the owner of a label (a key pinned in :class:`KnownPeers` first; otherwise the
key whose claim most storing nodes hold, the oldest claim breaking ties), refuse
presence from other keys, and fail loudly when a pinned key changed (like SSH's
known_hosts).

What to publish when, and what a get's records mean, is decided without I/O in
:mod:`dhtsignal.signaling.presence` (:class:`PresenceRecords`, :func:`identify`);
this module only puts, gets, sleeps and gathers on a :class:`DhtNode`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from dhtsignal.aio.node import DhtNode
from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.records import RecordType, node_key, room_key
from dhtsignal.errors import (
    DhtSignalError,
    NodeIdTaken,
    PeerNotFound,
    PinnedKeyChanged,
    UsageError,
)
from dhtsignal.identity import Identity, is_self_certifying, self_certifying_id
from dhtsignal.signaling.presence import (
    DEFAULT_ROOM,
    DEFAULT_TTL,
    PeerInfo,
    PresenceRecords,
    identify,
    node_addresses,
    owner,
)
from dhtsignal.wire.addr import Addr

__all__ = [
    "DEFAULT_ROOM",
    "DEFAULT_TTL",
    "ROOM_RESOLVE_CONCURRENCY",
    "PeerInfo",
    "Presence",
    "claim_holder",
    "label_owner",
    "resolve",
    "room_peers",
]

log = logging.getLogger(__name__)

#: Room members resolved at once by :func:`room_peers`.
ROOM_RESOLVE_CONCURRENCY = 8


class Presence:
    """Publishes and refreshes a peer's claim, presence and room records.

    :param node: the peer's DHT node.
    :param identity: the peer's key.
    :param node_id: its label (``--node-id``).
    :param rooms: rooms to announce itself in (default ``lobby``).
    :param ttl: lifetime of presence and room records, seconds.
    :param claim_ttl: lifetime of the node-ID claim, seconds.
    :param nat: the peer's NAT type (:mod:`dhtsignal.nat`).
    :param holders: returns the DHT nodes holding the inbox subscription (client mode).
    """

    def __init__(
        self,
        node: DhtNode,
        identity: Identity,
        node_id: str,
        rooms: list[str] | None = None,
        *,
        ttl: float = DEFAULT_TTL,
        claim_ttl: float = 3600.0,
        nat: str = "unknown",
        holders: Callable[[], list[Addr]] | None = None,
    ) -> None:
        self.node = node
        self.holders = holders
        """Called at each publication: the nodes holding our inbox subscription."""
        self.records = PresenceRecords(
            identity,
            node_id,
            rooms,
            ttl=ttl,
            claim_ttl=claim_ttl,
            claimed_at=node.wallclock(),
            client_mode=node.config.client_mode,
            network=node.config.network,
            nat=nat,
        )
        self._task: asyncio.Task[Any] | None = None

    @property
    def identity(self) -> Identity:
        """The peer's key."""
        return self.records.identity

    @property
    def node_id(self) -> str:
        """Its label."""
        return self.records.node_id

    @property
    def rooms(self) -> list[str]:
        """The rooms it announces itself in."""
        return self.records.rooms

    @property
    def ttl(self) -> float:
        """Lifetime of presence and room records, seconds."""
        return self.records.ttl

    @property
    def claim_ttl(self) -> float:
        """Lifetime of the node-ID claim, seconds."""
        return self.records.claim_ttl

    @property
    def claimed_at(self) -> float:
        """Wall-clock time of the claim (written into every record)."""
        return self.records.claimed_at

    @claimed_at.setter
    def claimed_at(self, value: float) -> None:
        self.records.claimed_at = value

    async def publish(self) -> None:
        """Publish presence (and the claim when due) once.

        :raises NodeIdTaken: another key holds the node ID.
        """
        node = self.node
        holders = self.holders() if self.holders is not None else None
        pub = self.records.publication(
            node.wallclock(), node_addresses(node.address, node.observed), holders
        )
        results = await asyncio.gather(
            *(node.put(batch) for batch in pub.batches), return_exceptions=True
        )
        if isinstance(results[0], BaseException):
            raise results[0]
        for r in results[1:]:
            if isinstance(r, BaseException):
                log.debug("presence put failed: %s", r)
        self.records.published(pub)

    async def start(self) -> None:
        """Claim the node ID, publish, and keep refreshing every third of the TTL.

        :raises NodeIdTaken: another key holds a live claim on the node ID.
        """
        await self.publish()
        self._task = self.node.spawn(self._refresh(), name="presence-refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.records.refresh_interval)
            try:
                await self.publish()
            except Exception as exc:  # keep refreshing through transient failures
                log.warning("presence refresh failed: %s", exc)

    async def stop(self) -> None:
        """Replace presence and room records with tombstones (offline at once)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        tombs = self.records.sign_off(self.node.wallclock())
        results = await asyncio.gather(*(self.node.put([t]) for t in tombs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.debug("tombstone put failed: %s", r)


async def resolve(
    node: DhtNode, node_id: str, known: KnownPeers | None = None, *, pin: bool = False
) -> PeerInfo:
    """Find the live presence of ``node_id`` (a label or a self-certifying ID).

    Pinned keys in ``known`` are always honoured. A new pin is written only with ``pin``:
    on the user's own dials and lookups, never for what a stranger's message or a room
    listing names (a stranger could otherwise make us pin whatever key holds a label
    right now).

    :raises PeerNotFound: offline (signed off or expired) or never seen.
    :raises PinnedKeyChanged: the pinned key no longer holds the node ID (naming the pin
        file and ``dhtsignal pins forget``).
    """
    try:
        records.check_label(node_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    held = await node.get_held(
        node_key(node_id), include_tombstones=True, k=node.config.name_replicas
    )
    try:
        info = identify(node_id, held, known, node.wallclock())
    except PinnedKeyChanged as exc:
        if known is None:
            raise
        raise known.changed(exc.node_id, exc.pinned, exc.seen) from None
    if known is not None and pin:
        known.pin(node_id, info.key)
    return info


async def label_owner(node: DhtNode, node_id: str, known: KnownPeers | None = None) -> bytes | None:
    """The key that holds ``node_id`` (its claim), online or not; None if nobody does.

    What an inbound check needs: whether the sender's claimed label is its own. Unlike
    :func:`resolve` it does not require a live presence (the sender may have signed off
    by the time the check completes, as a one-shot ``send`` does), and it never pins.

    :raises PinnedKeyChanged: ``known`` pins another key than the DHT's holder.
    :raises UsageError: not a valid label.
    """
    try:
        records.check_label(node_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    held = await node.get_held(
        node_key(node_id), include_tombstones=True, k=node.config.name_replicas
    )
    recs = held.records
    if is_self_certifying(node_id):
        recs = [r for r in recs if self_certifying_id(r.signer) == node_id]
    if all(r.is_tombstone for r in recs):
        return None  # no live claim or presence: nobody holds it
    return owner(node_id, recs, held.support, known)


async def claim_holder(node: DhtNode, node_id: str, mine: bytes) -> NodeIdTaken:
    """The error for ``node_id`` taken by another key than ``mine``: names the holder's
    key and until when its claim lasts (the latest expiry of its live claims found),
    when the DHT shows them.

    :param node: a joined DHT node.
    :param node_id: the label we could not claim.
    :param mine: our Ed25519 public key.
    """
    now = node.wallclock()
    try:
        recs = await node.get(node_key(node_id))
    except DhtSignalError as exc:
        log.debug("cannot read the claims of %s: %s", node_id, exc)
        recs = []
    claims = [r for r in recs if r.type == RecordType.CLAIM and r.signer != mine]
    base = f"node id {node_id!r} is taken: another key holds a live claim on it"
    if not claims:
        return NodeIdTaken(base, node_id=node_id)
    latest = max(claims, key=lambda r: r.expires)
    until = latest.expires
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    left = max(0.0, until - now)
    return NodeIdTaken(
        f"{base} (key {latest.signer.hex()[:16]}…) until {when}, in {_duration(left)} unless "
        "its owner refreshes it; use another node ID, or the data directory holding that key",
        node_id=node_id,
        holder=latest.signer.hex(),
        until=until,
    )


def _duration(seconds: float) -> str:
    """``59 min 12 s``, ``42 s``."""
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    if whole >= 60:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole} s"


async def room_peers(node: DhtNode, room: str, known: KnownPeers | None = None) -> list[PeerInfo]:
    """The online peers of ``room``, each verified through its own node-ID records.

    Pins in ``known`` are honoured; none is written (a room lists what anyone announced).
    """
    try:
        records.check_label(room, "room")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    recs = await node.get(room_key(room))
    members: dict[str, bytes] = {}
    for r in recs:
        label = r.fields().get("id")
        if records.is_label(label) and r.type == RecordType.ROOM:
            assert isinstance(label, str)
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
