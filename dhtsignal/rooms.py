"""Room events: who joins and leaves a room, as it happens (``peers --watch``).

Theory of operation
-------------------
A peer announces itself in a room with a ROOM record under ``room_key(room)`` (one slot
per signer) and refreshes it at half its lifetime; signing off replaces it with a
tombstone. :func:`watch_room` subscribes to that key with
:meth:`DhtNode.listen <dhtsignal.aio.node.DhtNode.listen>`, so storing nodes push every
change, and turns the slots into events:

- a ROOM record of a new slot is verified as :func:`~dhtsignal.presence.room_peers`
  does (the label must resolve to the record's signer) and becomes :class:`PeerJoined`;
  a presence not yet readable is retried for :data:`VERIFY_WINDOW` seconds;
- a tombstone of a known slot becomes :class:`PeerLeft` (``signed-off``); a slot whose
  record passes its expiry without a refresh becomes :class:`PeerLeft` (``expired``).

Refreshes (the same slot with a higher sequence number) only move the expiry. The
members tracked are bounded by :data:`MAX_MEMBERS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dhtsignal.aio.node import DhtNode
from dhtsignal.datadir import KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.records import Record, RecordType, room_key
from dhtsignal.errors import DhtSignalError, UsageError
from dhtsignal.presence import PeerInfo, resolve

log = logging.getLogger(__name__)

#: Members one watch tracks; records of further signers are ignored (counted in the log).
MAX_MEMBERS = 1024
#: Seconds a new member's presence is retried before its ROOM record is ignored.
VERIFY_WINDOW = 5.0
#: Seconds between two tries.
VERIFY_RETRY = 0.5


@dataclass(frozen=True)
class PeerJoined:
    """A verified peer announced itself in ``room``."""

    room: str
    peer: PeerInfo

    def to_json(self) -> dict[str, object]:
        """``{"event": "peer-joined", "room", "peer": {...}}`` (``peers --watch --json``)."""
        return {"event": "peer-joined", "room": self.room, "peer": self.peer.to_json()}


@dataclass(frozen=True)
class PeerLeft:
    """A member of ``room`` signed off (``why`` = ``signed-off``) or its record expired."""

    room: str
    node_id: str
    key: str
    why: str

    def to_json(self) -> dict[str, object]:
        """``{"event": "peer-left", "room", "node_id", "key", "why"}``."""
        return {
            "event": "peer-left",
            "room": self.room,
            "node_id": self.node_id,
            "key": self.key,
            "why": self.why,
        }


RoomEvent = PeerJoined | PeerLeft


@dataclass
class _Member:
    label: str
    signer: bytes
    expires: float
    info: PeerInfo | None = None


async def watch_room(
    node: DhtNode, room: str, known: KnownPeers | None = None
) -> AsyncIterator[RoomEvent]:
    """The joins and leaves of ``room``, pushed by the DHT; the current members come
    first as joins. Runs until the caller stops iterating.

    :raises UsageError: ``room`` is not a valid room name.
    """
    try:
        records.check_label(room, "room")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out: asyncio.Queue[RoomEvent] = asyncio.Queue()
    members: dict[tuple[bytes, int, bytes], _Member] = {}
    verifying: set[asyncio.Task[None]] = set()
    changed = asyncio.Event()

    async def verify(slot: tuple[bytes, int, bytes], m: _Member) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + VERIFY_WINDOW
        while members.get(slot) is m:
            try:
                info = await resolve(node, m.label, known)
            except DhtSignalError as exc:
                info = None
                why = str(exc)
            else:
                why = "presence held by another key"
            if info is not None and info.public_key == m.signer:
                if members.get(slot) is m:
                    m.info = info
                    out.put_nowait(PeerJoined(room, info))
                return
            if loop.time() + VERIFY_RETRY > until:
                log.debug("room %s: member %s not verified: %s", room, m.label, why)
                return
            await asyncio.sleep(VERIFY_RETRY)

    def on_record(rec: Record) -> None:
        if rec.type != RecordType.ROOM:
            return
        slot = rec.slot
        m = members.get(slot)
        if rec.is_tombstone:
            if m is not None:
                del members[slot]
                if m.info is not None:
                    out.put_nowait(PeerLeft(room, m.info.node_id, m.info.key, "signed-off"))
            return
        label = rec.fields().get("id")
        if not isinstance(label, str):
            return
        if m is not None and m.label == label:
            m.expires = rec.expires  # a refresh
            changed.set()
            return
        if m is None and len(members) >= MAX_MEMBERS:
            log.debug("room %s: over %d members, %s ignored", room, MAX_MEMBERS, label)
            return
        m = members[slot] = _Member(label, rec.signer, rec.expires)
        changed.set()
        task = asyncio.create_task(verify(slot, m), name="room-verify")
        verifying.add(task)
        task.add_done_callback(verifying.discard)

    async def pump() -> None:
        async for rec in node.listen(room_key(room), initial=True):
            on_record(rec)

    async def expire() -> None:
        while True:
            changed.clear()
            now = node.wallclock()
            for slot, m in list(members.items()):
                if m.expires <= now:
                    del members[slot]
                    if m.info is not None:
                        out.put_nowait(PeerLeft(room, m.info.node_id, m.info.key, "expired"))
            soonest = min((m.expires for m in members.values()), default=now + 60.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.05, soonest - now))

    tasks = [
        asyncio.create_task(pump(), name="room-listen"),
        asyncio.create_task(expire(), name="room-expire"),
    ]
    getting: asyncio.Future[RoomEvent] | None = None
    try:
        while True:
            getting = asyncio.ensure_future(out.get())
            done, _ = await asyncio.wait([getting, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if getting in done:
                yield getting.result()
                continue
            getting.cancel()
            for t in tasks:  # the listen or the expiry task ended: report why
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return
    finally:
        if getting is not None:
            getting.cancel()
        for t in [*tasks, *verifying]:
            t.cancel()
        await asyncio.gather(*tasks, *verifying, return_exceptions=True)


__all__ = ["MAX_MEMBERS", "PeerJoined", "PeerLeft", "RoomEvent", "watch_room"]
