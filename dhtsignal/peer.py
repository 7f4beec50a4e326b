"""The library API: a peer that dials node IDs and accepts sessions, with no signaling server.

Theory of operation
-------------------
A :class:`Peer` is a DHT node (:class:`~dhtsignal.aio.node.DhtNode`) plus an
identity, its published presence (:class:`~dhtsignal.presence.Presence`) and a
subscription to its own inbox key. Dialing ``bob``:

1. *resolve*: :func:`~dhtsignal.presence.resolve` finds bob's verified presence
   (his Ed25519 and X25519 keys and DHT addresses), honouring pinned keys;
2. *signaling*: aiortc gathers the offer; it is compacted
   (:mod:`~dhtsignal.signaling.sdp`), sealed to bob (:mod:`~dhtsignal.signaling.envelope`),
   wrapped in an INBOX record signed by us, pushed straight to bob's DHT node with
   ``ds_notify`` and stored under bob's inbox key, whose storing nodes push it to
   bob as well. Bob verifies, decrypts, answers the same way into our inbox;
3. *ICE* and *DTLS/SCTP* then run peer to peer. The SDP carries the DTLS
   fingerprint and is signed, so the connection is authenticated end to end.

Every session runs a :class:`~dhtsignal.signaling.session.SessionMachine` whose
deadlines turn silence into a :class:`ConnectFailed` with a reason and the
candidate types tried, in seconds. Two peers dialing each other at once end with
one session: :func:`~dhtsignal.signaling.session.glare_winner` picks which offer
survives, and the loser's ``connect()`` returns the session it answered.

Each session has two pre-negotiated data channels: ``data`` (id 0, the user's
messages, reliable and ordered unless asked otherwise) and ``ctl`` (id 1, JSON
control messages: ping/pong for round trips and sync/synced so a sender learns
the remote application received its messages).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from dhtsignal.aio import rtc
from dhtsignal.aio.node import DhtNode, ignore_outcome, routing_id
from dhtsignal.datadir import KNOWN_PEERS_FILE, KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType, inbox_key
from dhtsignal.errors import (
    ConnectFailed,
    DhtSignalError,
    DialFailed,
    EnvelopeRejected,
    PeerNotFound,
    SessionClosed,
    UsageError,
)
from dhtsignal.identity import Identity, self_certifying_id
from dhtsignal.presence import PeerInfo, Presence, resolve
from dhtsignal.signaling import envelope, sdp
from dhtsignal.signaling.envelope import MessageType, ReplayCache
from dhtsignal.signaling.session import (
    Phases,
    SessionMachine,
    SessionTimeouts,
    glare_winner,
)
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, parse_addr, show_addrs

log = logging.getLogger(__name__)

#: Lifetime of an inbox record, seconds (an envelope is stale after 30 s anyway).
INBOX_TTL = 60.0
#: Seconds an envelope pushed directly waits for the session to progress before it is
#: also stored in the DHT (the reliable path when the push or the recipient's address fails).
STORE_DELAY = 0.25
#: Seconds a resolved presence is reused by ``connect`` (dropped when a dial fails).
RESOLVE_CACHE_TTL = 30.0
#: Bytes (characters for text) received on a session and not yet read by the application;
#: past this the session is closed (counted as ``closed:unread-limit``).
MAX_UNREAD_BYTES = 16 * 1024 * 1024
#: Incoming handshakes in progress at once; more offers are dropped and counted.
MAX_PENDING_INCOMING = 32
#: Inbox records remembered to drop the second copy (direct push and DHT push).
MAX_SEEN = 4096
_DIRECT_PUSH_ADDRS = 2
#: An SDP with at least one candidate line.
_CANDIDATE_LINE = re.compile(r"^a=candidate:", re.M)
NO_CANDIDATES = (
    "gathered no ICE candidates: no usable local address and no STUN/TURN server answered "
    "(check the ICE host addresses and the TURN credentials)"
)


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
        return [self.ordered, self.max_retransmits, self.max_packet_life_time]

    @classmethod
    def from_wire(cls, item: object) -> ChannelOptions:
        if not isinstance(item, list) or len(item) != 3:
            return cls()
        ordered, rex, life = item
        return cls(
            ordered=bool(ordered),
            max_retransmits=rex if isinstance(rex, int) and 0 <= rex < 65536 else None,
            max_packet_life_time=life if isinstance(life, int) and 0 <= life < 65536 else None,
        )


class Session:
    """A data-channel session with one remote peer.

    Iterate it for incoming messages (``bytes`` or ``str``); the iteration ends
    when the session closes.
    """

    def __init__(
        self,
        peer: Peer,
        pc: Any,
        session_id: bytes,
        remote_key: bytes,
        remote_id: str,
        options: ChannelOptions,
    ) -> None:
        self.peer = peer
        self.session_id = session_id
        self.remote_key = remote_key
        self.remote_id = remote_id
        self.options = options
        self.phases: Phases | None = None
        self.path: tuple[str, str] | None = None
        self._pc = pc
        self.data, self.ctl = rtc.open_channels(
            pc, options.ordered, options.max_retransmits, options.max_packet_life_time
        )
        self._inbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._buffered = 0  # size of the messages received and not yet read
        self._received = 0
        self._sent = 0
        self._sync_waiters: dict[int, asyncio.Future[None]] = {}
        self._pending_syncs: list[int] = []
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._ping_seq = 0
        self._closed = asyncio.Event()
        self.data.on("message", self._on_data)
        self.ctl.on("message", self._on_ctl)
        self.data.on("close", self._on_close)
        pc.on("connectionstatechange", self._on_state)

    @property
    def is_open(self) -> bool:
        """Whether messages can be sent."""
        return not self._closed.is_set() and self.data.readyState == "open"

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._on_close()

    def _on_close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._inbox.put_nowait(None)
            waiters: list[asyncio.Future[Any]] = [*self._sync_waiters.values()]
            waiters += self._pongs.values()
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(SessionClosed("session closed"))
            self.peer._forget(self)

    def _on_data(self, message: bytes | str) -> None:
        if self._closed.is_set():
            return
        self._buffered += len(message)
        if self._buffered > MAX_UNREAD_BYTES:
            # The remote sends faster than the application reads: end the session rather
            # than grow without bound or drop messages of a reliable channel unseen.
            self.peer.stats["closed:unread-limit"] += 1
            log.warning(
                "session %s with %s closed: over %d unread bytes",
                self.session_id.hex(),
                self.remote_id,
                MAX_UNREAD_BYTES,
            )
            self._on_close()
            self.peer.node.spawn(self._pc.close(), name="close-overflowing")
            return
        self._received += 1
        self._inbox.put_nowait(message)
        if self._pending_syncs:
            done = [n for n in self._pending_syncs if n <= self._received]
            for n in done:
                self._pending_syncs.remove(n)
                self._ctl_send({"t": "synced", "n": n})

    def _ctl_send(self, msg: dict[str, Any]) -> None:
        if self.ctl.readyState == "open":
            self.ctl.send(json.dumps(msg))

    def _on_ctl(self, message: bytes | str) -> None:
        try:
            msg = json.loads(message)
            tag, n = msg["t"], msg["n"]
            if not isinstance(n, int):
                raise ValueError("n")
        except (ValueError, KeyError, TypeError, RecursionError):
            self.peer.stats["ctl-malformed"] += 1
            return
        if tag == "ping":
            self._ctl_send({"t": "pong", "n": n})
        elif tag == "pong":
            pong = self._pongs.pop(n, None)
            if pong is not None and not pong.done():
                pong.set_result(time.perf_counter())
        elif tag == "sync":
            if n <= self._received:
                self._ctl_send({"t": "synced", "n": n})
            elif len(self._pending_syncs) < 64:
                self._pending_syncs.append(n)
        elif tag == "synced":
            for m in [m for m in self._sync_waiters if m <= n]:
                synced = self._sync_waiters.pop(m)
                if not synced.done():
                    synced.set_result(None)

    def __aiter__(self) -> AsyncIterator[bytes | str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[bytes | str]:
        while True:
            msg = await self._inbox.get()
            if msg is None:
                self._inbox.put_nowait(None)  # later recv() calls and loops end too
                return
            self._buffered -= len(msg)
            yield msg

    async def recv(self, timeout: float | None = None) -> bytes | str:
        """The next message.

        :raises SessionClosed: the session closed first.
        :raises TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)
            raise SessionClosed("session closed")
        self._buffered -= len(msg)
        return msg

    async def send(self, data: bytes | str) -> None:
        """Queue one message on the data channel.

        :raises SessionClosed: the session is closed.
        """
        if not self.is_open:
            raise SessionClosed("session closed")
        self.data.send(data)
        self._sent += 1

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the remote application has received every message sent so far.

        :raises TimeoutError: no acknowledgement within ``timeout`` seconds.
        :raises SessionClosed: the session is closed.
        """
        if self._closed.is_set():
            raise SessionClosed("session closed")
        n = self._sent
        if n == 0:
            return
        fut = self._sync_waiters.get(n)
        if fut is None:  # concurrent flushes of the same messages share one sync
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(ignore_outcome)
            self._sync_waiters[n] = fut
            self._ctl_send({"t": "sync", "n": n})
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def ping(self, timeout: float = 5.0) -> float:
        """One round trip over the control channel; returns seconds.

        :raises SessionClosed: the session is closed.
        """
        if self._closed.is_set():
            raise SessionClosed("session closed")
        self._ping_seq += 1
        n = self._ping_seq
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs[n] = fut
        t0 = time.perf_counter()
        self._ctl_send({"t": "ping", "n": n})
        t1 = await asyncio.wait_for(fut, timeout)
        return t1 - t0

    async def close(self) -> None:
        """Close the connection."""
        self._on_close()
        await self._pc.close()

    def __repr__(self) -> str:
        return f"<Session {self.session_id.hex()} with {self.remote_id}>"


@dataclass
class _Dial:
    remote_key: bytes
    session_id: bytes
    answer: asyncio.Future[tuple[bytes, dict[str, Any]]]
    superseded: asyncio.Future[Session] | None = None


@dataclass
class PeerStats:
    """Counters of a peer (refusals by reason, sessions)."""

    counts: Counter[str] = field(default_factory=Counter)


class Peer:
    """A dhtsignal peer: dial node IDs, accept sessions.

    :param node_id: our node ID label; None for an anonymous peer (throwaway key,
        no presence, client mode), as the ``ping`` and ``send`` commands use.
    :param bootstrap: ``"HOST:PORT"`` strings or ``(host, port)`` of nodes to join through.
    :param listen: where our DHT node binds.
    :param rooms: rooms to announce ourselves in.
    :param data_dir: where the identity key and known peers live (None: a fresh key).
    :param ice_servers: STUN/TURN servers (``{"urls": ..., "username": ..., "credential": ...}``
        or URL strings); empty by default: never aiortc's public default.
    :param accept: node IDs allowed to open sessions to us; None accepts anyone.
    :param timeouts: session deadlines.
    :param presence_ttl: lifetime of our presence records, seconds.
    :param node_config: DHT parameters.
    :param known_peers: the pin file (default ``data_dir/known_peers`` if a data dir is given).
    :param node: a DHT node that someone else owns, already bound and joined (the peer
        daemon's). The peer then only handles sessions: :meth:`start` subscribes to the
        inbox, and :meth:`close` closes the sessions but neither the node nor any presence
        (the owner publishes and withdraws it). Requires ``identity``.
    :param identity: the key pair to use instead of the one in ``data_dir`` (or a fresh one).
    """

    def __init__(
        self,
        node_id: str | None = None,
        bootstrap: Sequence[str | Addr] = (),
        *,
        listen: str | Addr = "127.0.0.1:0",
        rooms: Sequence[str] | None = None,
        data_dir: str | Path | None = None,
        ice_servers: Sequence[dict[str, Any] | str] = (),
        accept: Sequence[str] | None = None,
        timeouts: SessionTimeouts | None = None,
        presence_ttl: float = 120.0,
        claim_ttl: float = 3600.0,
        node_config: NodeConfig | None = None,
        known_peers: str | Path | None = None,
        node: DhtNode | None = None,
        identity: Identity | None = None,
    ) -> None:
        if node is not None and identity is None:
            raise UsageError("Peer(node=...) needs the identity the node's records are signed with")
        if node_id is not None:
            records.check_label(node_id)
        self.node_id = node_id
        self.bootstrap_addrs = [parse_addr(b) if isinstance(b, str) else b for b in bootstrap]
        self.listen_addr = parse_addr(listen) if isinstance(listen, str) else listen
        self.rooms = list(rooms) if rooms else None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.ice_servers = list(ice_servers)
        self.accept = set(accept) if accept is not None else None
        self.timeouts = timeouts or SessionTimeouts()
        self.presence_ttl = presence_ttl
        self.claim_ttl = claim_ttl
        if identity is not None:
            self.identity = identity
        elif self.data_dir is not None:
            self.identity = Identity.load_or_create(self.data_dir)
        else:
            self.identity = Identity.generate()
        self._owns_node = node is None
        if node is None:
            cfg = node_config or NodeConfig()
            if node_id is None and not cfg.client_mode:
                cfg = replace(cfg, client_mode=True)
            node = DhtNode(routing_id(self.identity.public_key), cfg)
        self.node = node
        pins = Path(known_peers) if known_peers else None
        if pins is None and self.data_dir is not None:
            pins = self.data_dir / KNOWN_PEERS_FILE
        self.known = KnownPeers(pins)
        self.presence: Presence | None = None
        self.stats: Counter[str] = Counter()
        self._replay = ReplayCache()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._dials: dict[bytes, _Dial] = {}
        self._incoming: asyncio.Queue[Session] = asyncio.Queue()
        self._sessions: set[Session] = set()
        self._pending_incoming = 0
        self._resolved: dict[str, tuple[float, PeerInfo]] = {}
        self._inbox_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        """Our Ed25519 public key."""
        return self.identity.public_key

    @property
    def self_id(self) -> str:
        """Our self-certifying node ID."""
        return self.identity.self_id

    async def start(self) -> None:
        """Bind, join the DHT, claim the node ID, publish presence, listen on the inbox.

        :raises NodeIdTaken: another key holds our node ID.
        :raises DhtSignalError: no bootstrap node answered.
        """
        if not self._owns_node:
            await self._listen_inbox()
            self._started = True
            return
        await self.node.listen_udp(*self.listen_addr)
        if self.bootstrap_addrs:
            joined = await self.node.bootstrap(self.bootstrap_addrs)
            if joined == 0:
                await self.node.close()
                addrs = show_addrs(self.bootstrap_addrs)
                raise PeerNotFound(f"no bootstrap node answered ({addrs})")
        await self._listen_inbox()
        if self.node_id is not None:
            self.presence = Presence(
                self.node,
                self.identity,
                self.node_id,
                self.rooms,
                ttl=self.presence_ttl,
                claim_ttl=self.claim_ttl,
            )
            try:
                await self.presence.start()
            except BaseException:
                await self.node.close()
                raise
        self._started = True

    async def close(self) -> None:
        """Sign off (tombstones), close every session and the DHT node (once)."""
        if self._closed:
            return
        self._closed = True
        if self.presence is not None:
            try:
                await asyncio.wait_for(self.presence.stop(), 1.0)
            except (TimeoutError, DhtSignalError) as exc:
                log.debug("sign-off incomplete: %s", exc)
        for s in list(self._sessions):
            await s.close()
        if self._owns_node:
            await self.node.close()
        elif self._inbox_task is not None:
            self._inbox_task.cancel()
            await asyncio.gather(self._inbox_task, return_exceptions=True)

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _forget(self, session: Session) -> None:
        self._sessions.discard(session)

    async def incoming(self) -> AsyncIterator[Session]:
        """Sessions other peers opened to us (open and ready)."""
        while True:
            yield await self._incoming.get()

    # -- envelopes ----------------------------------------------------------------------

    def _deliver(
        self,
        recipient_key: bytes,
        recipient_x: bytes,
        session_id: bytes,
        msg_type: MessageType,
        body: dict[str, Any],
        direct: Sequence[Addr],
        settled: asyncio.Future[Any] | None = None,
    ) -> asyncio.Task[Any]:
        """Seal ``body`` into the recipient's inbox: pushed straight to the recipient's DHT
        node, and stored under its inbox key (whose storing nodes push it too) unless
        ``settled`` completes within :data:`STORE_DELAY` (the direct push worked)."""
        now = self.node.wallclock()
        blob = envelope.seal(
            self.identity, recipient_key, recipient_x, session_id, msg_type, codec.pack(body), now
        )
        key = inbox_key(recipient_key)
        rec = records.sign(
            self.identity,
            RecordType.INBOX,
            key,
            blob,
            seq=int(now * 1000),
            expires=now + INBOX_TTL,
            sub=session_id + bytes([int(msg_type)]),
        )
        for addr in direct[:_DIRECT_PUSH_ADDRS]:
            fut = self.node.request(addr, "ds_notify", self.node.ds_args(key, [rec.raw]))
            fut.add_done_callback(ignore_outcome)
        if settled is None or not direct:
            return self.node.spawn(self.node.put([rec]), name="inbox-put")
        return self.node.spawn(self._store_unless(settled, rec), name="inbox-put")

    async def _store_unless(self, settled: asyncio.Future[Any], rec: Record) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(settled), STORE_DELAY)
        except TimeoutError:
            await self.node.put([rec])
            return
        except BaseException:  # settled otherwise (failed, superseded): no store needed
            pass
        self.stats["inbox-store-skipped"] += 1

    def _my_addrs(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        if self.node.address is not None:
            out.append([self.node.address[0], self.node.address[1]])
        for a, _ in self.node.observed.most_common(2):
            if [a[0], a[1]] not in out:
                out.append([a[0], a[1]])
        return out[:3]

    async def _listen_inbox(self) -> None:
        self._inbox_task = self.node.spawn(self._inbox_loop(), name="inbox")
        # One turn of the loop: the inbox task registers its local listener before we
        # return, so an envelope pushed right after start() is not missed.
        await asyncio.sleep(0)

    async def _inbox_loop(self) -> None:
        # initial=False: records already stored are for a previous run of this key.
        async for rec in self.node.listen(inbox_key(self.public_key), initial=False):
            try:
                self._on_inbox(rec)
            except Exception as exc:  # remote input must never end the loop
                self.stats["inbox-error"] += 1
                log.debug("inbox record dropped: %r", exc)

    def _on_inbox(self, rec: Record) -> None:
        if rec.type != RecordType.INBOX or rec.is_tombstone:
            return
        if rec.raw in self._seen:
            self.stats["duplicate"] += 1
            return
        self._seen[rec.raw] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        sender = rec.payload[envelope.AAD_END - 32 : envelope.AAD_END]
        if len(sender) == 32 and sender != rec.signer:
            # Before open_envelope: it records the envelope in the replay cache, so a relay
            # re-signing someone's envelope first would get the genuine record refused.
            self.stats["refused:signer-mismatch"] += 1
            return
        try:
            opened = envelope.open_envelope(
                self.identity, rec.payload, self.node.wallclock(), self._replay
            )
        except EnvelopeRejected as exc:
            self.stats["refused:" + exc.reason] += 1
            log.debug("envelope refused: %s", exc)
            return
        if opened.sender_key != rec.signer:
            self.stats["refused:signer-mismatch"] += 1
            return
        try:
            body = codec.unpack(opened.body)
        except codec.MalformedDatagram:
            body = None
        if not isinstance(body, dict):
            self.stats["refused:malformed-body"] += 1
            return
        if opened.msg_type == MessageType.OFFER:
            self._on_offer(opened.sender_key, opened.session_id, body)
        elif opened.msg_type == MessageType.ANSWER:
            dial = self._dials.get(opened.session_id)
            if dial is None or dial.remote_key != opened.sender_key:
                self.stats["refused:unexpected-answer"] += 1
                return
            if not dial.answer.done():
                dial.answer.set_result((opened.sender_key, body))
        else:
            dial = self._dials.get(opened.session_id)
            if dial is not None and dial.remote_key == opened.sender_key:
                why = str(body.get("why", "rejected"))[:200]
                if not dial.answer.done():
                    dial.answer.set_exception(DialFailed("peer", "rejected", why))

    # -- answering ----------------------------------------------------------------------

    def _on_offer(self, sender: bytes, session_id: bytes, body: dict[str, Any]) -> None:
        for dial in self._dials.values():
            if dial.remote_key == sender and not dial.answer.done():
                if glare_winner(self.public_key, sender, dial.session_id, session_id):
                    self.stats["glare-kept-own"] += 1
                    return
                self.stats["glare-yielded"] += 1
                dial.superseded = asyncio.get_running_loop().create_future()
                dial.answer.set_exception(_Superseded())
                self.node.spawn(self._answer(sender, session_id, body, dial.superseded))
                return
        if self._pending_incoming >= MAX_PENDING_INCOMING:
            self.stats["refused:too-many-handshakes"] += 1
            return
        self.node.spawn(self._answer(sender, session_id, body, None), name="answer")

    async def _check_policy(self, sender: bytes, label: str) -> str | None:
        """The verified node ID of ``sender`` if the accept policy lets it in, else None."""
        sid = self_certifying_id(sender)
        if self.accept is not None and sid in self.accept:
            return sid
        if label and label != sid and (self.accept is None or label in self.accept):
            # The label is only the sender's claim: it must resolve to the sender's key.
            try:
                info = await asyncio.wait_for(
                    resolve(self.node, label, self.known), self.timeouts.resolve
                )
            except (TimeoutError, DhtSignalError):
                info = None
            if info is not None and info.public_key == sender:
                return label
        return sid if self.accept is None else None

    async def _answer(
        self,
        sender: bytes,
        session_id: bytes,
        body: dict[str, Any],
        superseded: asyncio.Future[Session] | None,
    ) -> None:
        self._pending_incoming += 1
        loop = asyncio.get_running_loop()
        machine = SessionMachine(time.monotonic(), caller=False, timeouts=self.timeouts)
        pc = None
        try:
            offer, x, label = body.get("sdp"), body.get("x"), body.get("id", "")
            if not isinstance(offer, bytes) or not isinstance(x, bytes) or len(x) != 32:
                self.stats["refused:malformed-body"] += 1
                return
            label = label if isinstance(label, str) else ""
            direct = _addrs(body.get("dht"))
            if self.accept is None:
                # Anyone may connect: verify the claimed label while ICE runs.
                verified = self.node.spawn(self._check_policy(sender, label), name="verify")
                remote_id: str | None = self_certifying_id(sender)
            else:
                verified = None
                remote_id = await self._check_policy(sender, label)
            if remote_id is None:
                self.stats["refused:policy"] += 1
                self._deliver(
                    sender, x, session_id, MessageType.REJECT, {"why": "not accepted"}, direct
                )
                return
            sdp_type, sdp_text = sdp.expand(offer)
            if sdp_type != "offer":
                self.stats["refused:malformed-body"] += 1
                return
            pc = rtc.new_connection(self.ice_servers)
            session = Session(
                self, pc, session_id, sender, remote_id, ChannelOptions.from_wire(body.get("ch"))
            )
            await rtc.apply_remote(pc, sdp_text, "offer")
            answer = await rtc.local_description(pc, offer=False)
            if _CANDIDATE_LINE.search(answer) is None:
                self.stats["incoming-failed:no-candidates"] += 1
                why = "the callee " + NO_CANDIDATES
                self._deliver(sender, x, session_id, MessageType.REJECT, {"why": why}, direct)
                log.warning("incoming session %s: %s", session_id.hex(), why)
                return
            opened: asyncio.Future[None] = loop.create_future()
            self._deliver(
                sender,
                x,
                session_id,
                MessageType.ANSWER,
                {"sdp": sdp.compact(answer, "answer"), "x": self.identity.x25519_public},
                direct,
                opened,
            )
            machine.answer_sent(time.monotonic())
            try:
                await self._open(session, machine)
            finally:
                if not opened.done():
                    opened.set_result(None)
            if verified is not None:
                session.remote_id = await verified or remote_id
            pc = None
            self._sessions.add(session)
            if superseded is not None:
                superseded.set_result(session)
            else:
                self._incoming.put_nowait(session)
        except (DhtSignalError, TimeoutError) as exc:
            self.stats["incoming-failed"] += 1
            log.info("incoming session %s failed: %s", session_id.hex(), exc)
            if superseded is not None and not superseded.done():
                superseded.set_exception(exc)
        finally:
            self._pending_incoming -= 1
            if pc is not None:
                await pc.close()

    async def _open(self, session: Session, machine: SessionMachine) -> None:
        """Wait for ICE and both data channels, within the connect deadline.

        :raises ConnectFailed: ICE or DTLS failed or the deadline passed, with the
            candidate types gathered and tried.
        """
        deadline = machine.deadline
        remaining = self.timeouts.connect if deadline is None else deadline - time.monotonic()
        ice_at = await rtc.wait_open(session._pc, [session.data, session.ctl], max(0.1, remaining))
        machine.ice_connected(ice_at)
        machine.channel_open(time.monotonic())
        session.phases = machine.phases
        session.path = rtc.selected_pair(session._pc)

    # -- dialing ------------------------------------------------------------------------

    async def _resolve(self, node_id: str) -> PeerInfo:
        """:func:`resolve`, reusing a recent answer (presence changes rarely)."""
        now = self.node.wallclock()
        hit = self._resolved.get(node_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = await resolve(self.node, node_id, self.known)
        self._resolved[node_id] = (now + min(RESOLVE_CACHE_TTL, info.expires_in), info)
        if len(self._resolved) > 1024:
            self._resolved.pop(next(iter(self._resolved)))
        return info

    async def connect(
        self,
        node_id: str,
        *,
        ordered: bool = True,
        max_retransmits: int | None = None,
        max_packet_life_time: int | None = None,
    ) -> Session:
        """Open a session to ``node_id`` (a label or a self-certifying ID).

        :raises PeerNotFound: the peer is offline or unknown (within the resolve deadline).
        :raises PinnedKeyChanged: the node ID is now held by another key than the pinned one.
        :raises ConnectFailed: no answer, or ICE/DTLS could not complete, with the reason.
        """
        if not self._started:
            raise UsageError("start the peer first (async with Peer(...) as peer)")
        loop = asyncio.get_running_loop()
        t = self.timeouts
        machine = SessionMachine(time.monotonic(), caller=True, timeouts=t)
        try:
            info = await asyncio.wait_for(self._resolve(node_id), t.resolve)
        except TimeoutError:
            raise DialFailed(
                node_id, "resolve-timeout", f"could not resolve within {t.resolve:.1f} s"
            ) from None
        machine.resolved(time.monotonic())
        options = ChannelOptions(ordered, max_retransmits, max_packet_life_time)
        session_id = os.urandom(8)
        dial = _Dial(info.public_key, session_id, loop.create_future())
        self._dials[session_id] = dial
        pc = rtc.new_connection(self.ice_servers)
        session = Session(self, pc, session_id, info.public_key, node_id, options)
        try:
            offer = await rtc.local_description(pc, offer=True)
            if dial.superseded is not None:  # glare: we yielded while gathering; send nothing
                await pc.close()
                return await dial.superseded
            if _CANDIDATE_LINE.search(offer) is None:
                raise DialFailed(node_id, "no-candidates", NO_CANDIDATES)
            body = {
                "sdp": sdp.compact(offer, "offer"),
                "x": self.identity.x25519_public,
                "id": self.node_id or "",
                "dht": self._my_addrs(),
                "ch": options.wire(),
            }
            put = self._deliver(
                info.public_key,
                info.x25519,
                session_id,
                MessageType.OFFER,
                body,
                info.addresses,
                dial.answer,
            )
            machine.offer_sent(time.monotonic())
            remaining = max(0.1, (machine.deadline or time.monotonic()) - time.monotonic())
            try:
                _, answer = await asyncio.wait_for(dial.answer, remaining)
            except _Superseded:
                await pc.close()
                assert dial.superseded is not None
                return await dial.superseded
            except DialFailed as exc:  # a REJECT: name the peer we dialed
                raise DialFailed(node_id, exc.reason, exc.detail) from None
            except TimeoutError:
                raise DialFailed(
                    node_id,
                    "answer-timeout",
                    f"no answer within {t.answer:.1f} s "
                    f"(offer {'stored in the DHT' if _put_ok(put) else 'NOT stored in the DHT'}"
                    f", pushed to {len(info.addresses[:_DIRECT_PUSH_ADDRS])} address(es))",
                ) from None
            blob = answer.get("sdp")
            if not isinstance(blob, bytes):
                raise DialFailed(node_id, "bad-answer", "answer carried no description")
            sdp_type, sdp_text = sdp.expand(blob)
            if sdp_type != "answer":
                raise DialFailed(node_id, "bad-answer", "answer is not an SDP answer")
            await rtc.apply_remote(pc, sdp_text, "answer")
            machine.answer_received(time.monotonic())
            await self._open(session, machine)
        except BaseException:
            self._resolved.pop(node_id, None)
            await pc.close()
            raise
        finally:
            self._dials.pop(session_id, None)
        self._sessions.add(session)
        return session


class _Superseded(Exception):
    """Glare: our offer gave way to the remote's; the answered session replaces it."""


def _put_ok(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _addrs(item: object) -> list[Addr]:
    out: list[Addr] = []
    if isinstance(item, list):
        for a in item[: _DIRECT_PUSH_ADDRS + 1]:
            if (
                isinstance(a, list)
                and len(a) == 2
                and isinstance(a[0], str)
                and isinstance(a[1], int)
                and 0 < a[1] < 65536
            ):
                out.append((a[0], a[1]))
    return out


__all__ = ["ChannelOptions", "ConnectFailed", "DialFailed", "Peer", "PeerInfo", "Session"]
