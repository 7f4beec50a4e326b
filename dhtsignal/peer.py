"""The library API: a peer that dials node IDs and accepts sessions, with no signaling server.

Theory of operation
-------------------
A :class:`Peer` is a DHT node (:class:`~dhtsignal.aio.node.DhtNode`) plus an
identity, its published presence (:class:`~dhtsignal.presence.Presence`) and a
subscription to its own inbox key. :meth:`Peer.start` is the one start sequence, for
library users and the peer daemon alike: load the saved DHT state (when
:attr:`PeerConfig.keep_state`), bind, join, listen on the inbox, claim the node ID and
publish presence; :meth:`Peer.close` undoes it: tombstones, sessions, saved state, node.

Dialing ``bob``:

1. *resolve*: :func:`~dhtsignal.presence.resolve` finds bob's verified presence
   (his Ed25519 and X25519 keys and DHT addresses), honouring pinned keys;
2. *signaling*: aiortc gathers the offer; :class:`~dhtsignal.signaling.inbox.Inbox`
   compacts and seals it into an INBOX record signed by us, which is pushed straight to
   bob's DHT node with ``ds_notify`` and stored under bob's inbox key (unless the direct
   push settled the session within :attr:`PeerConfig.store_delay`), whose storing nodes
   push it to bob as well. Bob's inbox opens it; he answers the same way into ours;
3. *ICE* and *DTLS/SCTP* then run peer to peer. The SDP carries the DTLS
   fingerprint and is signed, so the connection is authenticated end to end.

Every attempt, dialing or answering, is driven through a
:class:`~dhtsignal.signaling.session.SessionMachine`: each step is fed to it as an input,
one timer is armed at :attr:`~dhtsignal.signaling.session.SessionMachine.deadline` and
re-armed after every input, and when it fires :meth:`SessionMachine.timer` decides the
failure (``resolve-timeout``, ``answer-timeout``, ``connect-timeout``). The machine's
:class:`~dhtsignal.signaling.session.SessionFailed` ends whatever the attempt awaits and
becomes a :class:`DialFailed` or :class:`ConnectFailed` with a reason and, for ICE, the
candidate types tried; :class:`~dhtsignal.signaling.session.SessionOpened` carries the
phase split the session reports. Two peers dialing each other at once end with one
session: :func:`~dhtsignal.signaling.session.glare_winner` picks which offer survives,
and the loser's ``connect()`` returns the session it answered.

Each session (:class:`~dhtsignal.session.Session`) has two pre-negotiated data channels:
``data`` for the user's messages and ``ctl`` for ping/pong and sync/synced.

4. *binding*: once the channels are open, each side sends on ``ctl`` its signature over
   both DTLS certificate fingerprints, the session id and both keys
   (:mod:`dhtsignal.signaling.binding`) and checks the remote's under the key it dialed or
   accepted; ``connect()`` and ``incoming()`` hand out a session only after that check,
   and a mismatch closes it with :class:`~dhtsignal.errors.BindingFailed`. The check runs
   inside the connect deadline, and the ``dtls_sctp`` phase includes it.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dhtsignal import ice, nat, portprobe
from dhtsignal.aio import rtc
from dhtsignal.aio.node import DhtNode, ignore_outcome, routing_id
from dhtsignal.datadir import KNOWN_PEERS_FILE, DataDirLock, KnownPeers
from dhtsignal.dht import records
from dhtsignal.dht.events import SubscriptionRenewed
from dhtsignal.dht.hosts import host_of
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record
from dhtsignal.errors import (
    BindingFailed,
    ConfigError,
    ConnectFailed,
    DhtSignalError,
    DhtTimeout,
    DialFailed,
    NodeIdTaken,
    SessionClosed,
    UsageError,
)
from dhtsignal.identity import Identity, self_certifying_id
from dhtsignal.presence import (
    DEFAULT_TTL,
    PeerInfo,
    Presence,
    claim_holder,
    label_owner,
    resolve,
)
from dhtsignal.rooms import RoomEvent
from dhtsignal.session import DEFAULT_MAX_UNREAD_BYTES, Session
from dhtsignal.signaling import inbox as inbox_protocol
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.signaling.inbox import (
    AnswerMalformed,
    AnswerReceived,
    ChannelOptions,
    Inbox,
    InboxEvent,
    OfferReceived,
    Refused,
    RejectReceived,
)
from dhtsignal.signaling.session import (
    SessionEvent,
    SessionFailed,
    SessionMachine,
    SessionOpened,
    SessionTimeouts,
    glare_winner,
)
from dhtsignal.wire.addr import Addr, parse_addr, show_addrs

log = logging.getLogger(__name__)

T = TypeVar("T")

#: An SDP with at least one candidate line.
_CANDIDATE_LINE = re.compile(r"^a=candidate:", re.M)
_RELAY_LINE = re.compile(r"^a=candidate:[^\r\n]* typ relay[^\r\n]*\r?\n", re.M)
NO_CANDIDATES = (
    "gathered no ICE candidates: no usable local address and no STUN/TURN server answered "
    "(check the ICE host addresses and the TURN credentials)"
)


class _Ack(enum.Enum):
    """What became of a dial's direct push (:meth:`Peer._acked`)."""

    ACKED = "acked"
    """The callee's node acknowledged it, or the answer arrived."""
    REFUSED = "refused"
    """Every address it went to refused datagrams: nothing listens there."""
    SILENT = "silent"
    """Neither, within the push acknowledgement timeout."""


@dataclass(frozen=True)
class PeerConfig:
    """Tunables of a :class:`Peer` (the DHT's are :class:`~dhtsignal.dht.params.NodeConfig`,
    the session deadlines :class:`~dhtsignal.signaling.session.SessionTimeouts`)."""

    max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES
    """Bytes (characters for text) received on a session and not yet read by the
    application; past this the session is closed (counted as ``closed:unread-limit``)."""
    direct_push_addrs: int = 2
    """Of the recipient's advertised DHT addresses, how many an envelope is pushed to
    directly with ``ds_notify`` (0: only through the DHT's storing nodes)."""
    store_delay: float = 0.25
    """Seconds an envelope pushed directly waits for the session to progress before it is
    also stored in the DHT (the reliable path when the push or the address fails)."""
    inbox_ttl: float = inbox_protocol.DEFAULT_TTL
    """Lifetime of an inbox record, seconds (an envelope is stale after 30 s anyway)."""
    resolve_cache_ttl: float = 30.0
    """Seconds a resolved presence is reused by ``connect`` (dropped when a dial fails)."""
    max_pending_incoming: int = 32
    """Incoming handshakes in progress at once; more offers are dropped and counted
    (``refused:too-many-handshakes``)."""
    max_pending_incoming_per_host: int = 8
    """Incoming handshakes in progress at once whose offer one host delivered (IPv4
    address, IPv6 /64); more are dropped and counted (``refused:too-many-from-host``)."""
    max_seen: int = inbox_protocol.DEFAULT_MAX_SEEN
    """Inbox records remembered to drop the second copy (direct push and DHT push)."""
    keep_state: bool = False
    """Load the DHT state (contacts, stored records) from the data directory at start and
    save it at close, as the peer daemon does. Needs a data directory."""
    sign_off_timeout: float = 1.0
    """Seconds :meth:`Peer.close` spends publishing tombstones at most."""
    push_ack_timeout: float | None = 0.8
    """Seconds a dial waits for the callee's own DHT node to acknowledge the offer pushed
    to it directly (``ds_notify`` answered by the node listening on the callee's inbox).
    Without an acknowledgement and without an answer by then, the dial fails with
    :class:`DialFailed` reason ``not-responding`` (a crashed peer whose presence has not
    expired yet). The default, twice the DHT's ``rpc_timeout``, leaves room for the first
    try and one retry of the push. None: wait for the answer deadline instead (for callees
    whose DHT node cannot be reached unsolicited). Not applied when the presence says the
    callee's node runs in client mode or is behind a cone or symmetric NAT (where
    unsolicited pushes may be filtered). A presence reused from the resolve cache is read
    again before the verdict (the callee may have restarted at another address)."""
    probe_closed_ports: bool = True
    """While waiting for that acknowledgement, also send one STUN Binding request from a
    connected socket to each address the offer was pushed to (:mod:`dhtsignal.portprobe`):
    when every one of them is refused with an ICMP port unreachable, nothing listens there
    any more (the callee's process is gone, its host is up) and the dial fails as
    ``not-responding`` at once instead of after :attr:`push_ack_timeout`. Silence proves
    nothing and changes nothing. False: wait for the acknowledgement only."""
    keepalive_interval: float | None = 15.0
    """Client mode or behind a NAT (:attr:`Peer.behind_nat`): seconds between keepalive
    pings to the DHT nodes that hold our inbox subscription, so that the NAT mappings they
    push offers through stay open (home routers drop idle UDP mappings after 20-30 s).
    None: none."""
    subscribe_wait: float = 2.0
    """Client mode or behind a NAT: seconds :meth:`Peer.start` waits for the inbox
    subscription to be accepted, so that the first presence names the nodes holding it."""
    prefer_direct: bool = True
    """When both sides know their NAT allows a direct path (open or cone, not
    symmetric), a dial leaves TURN out (no relay candidates on either side), so ICE cannot
    settle on a relay while the direct pair is being punched. False: always offer relay
    candidates when TURN is configured."""
    dht_stun: bool = True
    """Use a DHT node that answered recently as the sessions' STUN server when none is
    configured (:mod:`dhtsignal.ice`): server-reflexive candidates without any
    third-party server. False: host candidates only, unless a STUN server is configured."""
    join_retry_interval: float | None = None
    """When no bootstrap node answers at :meth:`Peer.start`: None fails at once
    (:class:`DhtTimeout`); a number keeps trying every so many seconds, as the peer
    daemon does (``--rejoin-interval``)."""

    def __post_init__(self) -> None:
        for name in (
            "max_unread_bytes",
            "max_pending_incoming",
            "max_pending_incoming_per_host",
            "max_seen",
        ):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"peer.{name}", "must be at least 1")
        if not self.direct_push_addrs >= 0:
            raise ConfigError("peer.direct_push_addrs", "must not be negative")
        for name in ("store_delay", "resolve_cache_ttl", "sign_off_timeout"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"peer.{name}", "must not be negative")
        for name in ("push_ack_timeout", "join_retry_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"peer.{name}", "must be a positive number of seconds or None")
        if not self.inbox_ttl > 0:
            raise ConfigError("peer.inbox_ttl", "must be a positive number of seconds")


# -- what an observer sees ---------------------------------------------------------------


@dataclass(frozen=True)
class SignalSent:
    """We sent a signaling message (pushed and/or stored)."""

    session_id: bytes
    msg_type: MessageType
    record: Record


@dataclass(frozen=True)
class SignalReceived:
    """The inbox handled a record; ``outcome`` is what :meth:`Inbox.receive` made of it."""

    record: Record
    outcome: InboxEvent | Refused | None


@dataclass(frozen=True)
class IncomingFailed:
    """An incoming handshake failed (counted as ``incoming-failed``)."""

    session_id: bytes
    remote_key: bytes
    error: DhtSignalError


PeerEvent = SignalSent | SignalReceived | IncomingFailed
Observer = Callable[[PeerEvent], None]
ConnectionFactory = Callable[[Sequence[rtc.IceServerSpec]], rtc.PeerConnection]


# -- driving the session machine -----------------------------------------------------------


class _StageEnded(Exception):
    """The session machine failed or ended while a stage was awaited."""

    def __init__(self, event: SessionEvent) -> None:
        super().__init__(repr(event))
        self.event = event

    @property
    def reason(self) -> str:
        return self.event.reason if isinstance(self.event, SessionFailed) else "closed"


class _Drive:
    """One attempt's :class:`SessionMachine`, driven: inputs are fed with the time, one
    timer is armed at the machine's deadline and re-armed after every input, and the
    machine's end (failure by timer or input, or closure) cuts short what is awaited."""

    def __init__(self, machine: SessionMachine) -> None:
        self.machine = machine
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[SessionEvent] = self._loop.create_future()
        """Completes with :class:`SessionFailed` or :class:`SessionEnded`."""
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    @property
    def live(self) -> bool:
        return self.machine.state not in (SessionMachine.State.CLOSED, SessionMachine.State.FAILED)

    def input(
        self, step: Callable[[float], SessionEvent], now: float | None = None
    ) -> SessionEvent:
        """Feed one input (a bound method of the machine) at ``now`` (default: the clock)."""
        event = step(time.monotonic() if now is None else now)
        self._on_event(event)
        return event

    def fail(self, reason: str) -> None:
        """Feed ``failed(reason)`` unless the session has ended already."""
        if self.live:
            self.input(lambda now: self.machine.failed(now, reason))

    def abandon(self, reason: str) -> None:
        """Feed ``failed(reason)`` if the session is still being set up (not yet open)."""
        if self.live and self.machine.state is not SessionMachine.State.OPEN:
            self.fail(reason)

    def close(self) -> None:
        """Feed ``closed`` unless the session has ended already."""
        if self.live:
            self.input(self.machine.closed)

    async def within(self, work: Awaitable[T]) -> T:
        """Await ``work`` unless the machine ends first.

        :raises _StageEnded: the machine failed (its timer fired) or ended first; ``work``
            is cancelled if it was a coroutine.
        """
        fut = asyncio.ensure_future(work)
        owned = fut is not work
        try:
            if not self.ended.done():
                await asyncio.wait((fut, self.ended), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if owned:
                fut.cancel()
            raise
        if self.ended.done() and not fut.done():
            if owned:
                fut.cancel()
                await asyncio.gather(fut, return_exceptions=True)
            raise _StageEnded(self.ended.result())
        return fut.result()  # done first, or in the same turn as the end: the work counts

    def _on_event(self, event: SessionEvent) -> None:
        if not self.live and not self.ended.done():
            self.ended.set_result(event)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.machine.deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        event = self.machine.timer(time.monotonic())
        if event is None:  # early by the clocks' granularity: wait the rest
            self._arm()
        else:
            log.debug("session deadline passed: %s", event)
            self._on_event(event)


@dataclass
class _Dial:
    remote_key: bytes
    session_id: bytes
    answer: asyncio.Future[AnswerReceived]
    superseded: asyncio.Future[Session] | None = None


class Peer:
    """A dhtsignal peer: dial node IDs, accept sessions.

    :param node_id: our node ID label; None for an anonymous peer (throwaway key,
        no presence, client mode), as the ``ping`` and ``send`` commands use.
    :param bootstrap: ``"HOST:PORT"`` strings or ``(host, port)`` of nodes to join through.
    :param listen: where our DHT node binds.
    :param rooms: rooms to announce ourselves in.
    :param data_dir: where the identity key and known peers live, and the saved DHT state
        with :attr:`PeerConfig.keep_state`. None: for a peer with a ``node_id``, its own
        directory in the CLI's data home (``$XDG_DATA_HOME/dhtsignal/peers/NODE_ID``,
        :func:`default_data_dir`), locked while the peer runs, so that a program run
        again keeps its key and so its node ID; an anonymous peer gets a fresh key.
    :param ice_servers: STUN/TURN servers (``{"urls": ..., "username": ..., "credential": ...}``
        or URL strings); empty by default: never aiortc's public default.
    :param accept: node IDs allowed to open sessions to us; None accepts anyone.
    :param timeouts: session deadlines.
    :param presence_ttl: lifetime of our presence records, seconds.
    :param claim_ttl: lifetime of our node-ID claim, seconds.
    :param node_config: DHT parameters.
    :param known_peers: the pin file (default ``data_dir/known_peers`` if a data dir is given).
    :param identity: the key pair to use instead of the one in ``data_dir`` (or a fresh one).
    :param config: the peer's tunables.
    :param observer: called synchronously with every signaling record sent and received and
        every failed incoming handshake (tracing, metrics, tests); must not raise.
    :param connection_factory: makes each session's connection from the ICE server list
        (default :func:`dhtsignal.aio.rtc.new_connection`).
    :raises UsageError: the default data directory of ``node_id`` is in use (by another
        ``Peer`` or process).
    :raises ConfigError: the data directory is unusable.
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
        presence_ttl: float = DEFAULT_TTL,
        claim_ttl: float = 3600.0,
        node_config: NodeConfig | None = None,
        known_peers: str | Path | None = None,
        identity: Identity | None = None,
        config: PeerConfig | None = None,
        observer: Observer | None = None,
        connection_factory: ConnectionFactory = rtc.new_connection,
    ) -> None:
        if node_id is not None:
            records.check_label(node_id)
        self.config = config or PeerConfig()
        self.node_id = node_id
        self.bootstrap_addrs = [parse_addr(b) if isinstance(b, str) else b for b in bootstrap]
        self.listen_addr = parse_addr(listen) if isinstance(listen, str) else listen
        self.rooms = list(rooms) if rooms else None
        self._lock: DataDirLock | None = None
        if data_dir is None and node_id is not None and identity is None:
            data_dir = default_data_dir(node_id)
            self._lock = DataDirLock(data_dir)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.config.keep_state and self.data_dir is None:
            raise UsageError("PeerConfig(keep_state=True) needs a data_dir")
        self.ice_servers = list(ice_servers)
        self.accept = set(accept) if accept is not None else None
        self.timeouts = timeouts or SessionTimeouts()
        self.presence_ttl = presence_ttl
        self.claim_ttl = claim_ttl
        if identity is not None:
            self.identity = identity
        elif self.data_dir is not None:
            if self._lock is not None:
                self._lock.acquire()  # released by close() (or below if __init__ fails)
            try:
                self.identity = Identity.load_or_create(self.data_dir)
            except BaseException:
                self._release()
                raise
        else:
            self.identity = Identity.generate()
        cfg = node_config or NodeConfig()
        if node_id is None and not cfg.client_mode:
            cfg = replace(cfg, client_mode=True)
        self.node = DhtNode(routing_id(self.identity.public_key), cfg)
        pins = Path(known_peers) if known_peers else None
        if pins is None and self.data_dir is not None:
            pins = self.data_dir / KNOWN_PEERS_FILE
        self.known = KnownPeers(pins, cfg.network)
        self.presence: Presence | None = None
        self.stats: Counter[str] = Counter()
        self.inbox = Inbox(
            self.identity,
            ttl=self.config.inbox_ttl,
            max_seen=self.config.max_seen,
            network=cfg.network,
        )
        self.nat = nat.UNKNOWN
        """Our NAT type (:mod:`dhtsignal.nat`), classified when the peer starts."""
        self._observer = observer
        self._new_connection = connection_factory
        self._dials: dict[bytes, _Dial] = {}
        self._incoming: asyncio.Queue[Session] = asyncio.Queue()
        self._sessions: set[Session] = set()
        self._pending_incoming = 0
        #: handshakes in progress per host that delivered their offer
        self._pending_by_host: Counter[str] = Counter()
        self._resolved: dict[str, tuple[float, PeerInfo]] = {}
        self._state_loaded = False
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

    @property
    def pending_incoming(self) -> int:
        """Incoming handshakes in progress (being answered, not yet open)."""
        return self._pending_incoming

    @property
    def dialing(self) -> int:
        """Outgoing dials in progress."""
        return len(self._dials)

    async def start(self) -> None:
        """Load the saved state (with :attr:`PeerConfig.keep_state`), bind, join the DHT,
        listen on the inbox, claim the node ID and publish presence. On failure the peer
        is closed.

        :raises ConfigError: the saved state is corrupt, or the listen address unusable.
        :raises DhtTimeout: no bootstrap node answered.
        :raises NodeIdTaken: another key holds our node ID.
        """
        try:
            if self.config.keep_state:
                self._load_state()
            await self.node.listen_udp(*self.listen_addr)
            if self.bootstrap_addrs:
                await self._join()
                await self.detect_nat()
            await self._listen_inbox()
            if self.behind_nat and self.bootstrap_addrs:
                if self.node_id is not None:  # the presence names the holders
                    await self._subscribed(self.config.subscribe_wait)
                if self.config.keepalive_interval is not None:
                    self.node.spawn(
                        self._keepalive(self.config.keepalive_interval), name="keepalive"
                    )
            if self.node_id is not None:
                presence = Presence(
                    self.node,
                    self.identity,
                    self.node_id,
                    self.rooms,
                    ttl=self.presence_ttl,
                    claim_ttl=self.claim_ttl,
                    nat=self.nat,
                    holders=self.inbox_holders if self.behind_nat else None,
                )
                try:
                    await presence.start()
                except NodeIdTaken:
                    raise await claim_holder(self.node, self.node_id, self.public_key) from None
                self.presence = presence
        except BaseException:
            await self.close()
            raise
        self._started = True

    @property
    def behind_nat(self) -> bool:
        """Whether our DHT node runs in client mode or found itself behind a NAT (cone or
        symmetric): then keepalives hold our mappings toward the nodes that push to us,
        and our presence names them."""
        return self.node.config.client_mode or self.nat in (nat.CONE, nat.SYMMETRIC)

    def inbox_holders(self) -> list[Addr]:
        """The DHT nodes that accepted our inbox subscription (they push to us)."""
        return self.node.subscription_holders(self.inbox.key)

    async def _subscribed(self, timeout: float) -> bool:
        """Wait until some node accepted our inbox subscription (at most ``timeout``)."""
        if self.inbox_holders():
            return True
        renewed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def seen(event: Any) -> None:
            mine = isinstance(event, SubscriptionRenewed) and event.key == self.inbox.key
            if mine and event.accepted and not renewed.done():
                renewed.set_result(None)

        remove = self.node.observe(seen)
        try:
            await asyncio.wait_for(renewed, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            remove()

    async def _keepalive(self, interval: float) -> None:
        """Ping the nodes holding our inbox subscription every ``interval`` seconds, so
        that our NAT keeps the mappings they push through (counted ``keepalive``)."""
        while True:
            await asyncio.sleep(interval)
            for addr in self.inbox_holders():
                try:
                    fut = self.node.request(addr, "ds_ping", self.node.ds_args())
                except DhtSignalError:
                    break
                fut.add_done_callback(ignore_outcome)
                self.stats["keepalive"] += 1

    async def detect_nat(self) -> str:
        """Classify our NAT from what the bootstrap nodes and recent contacts saw
        (:func:`dhtsignal.nat.detect`); the next presence refresh announces it.

        :returns: ``open``, ``cone``, ``symmetric`` or ``unknown``.
        """
        targets = nat.public_nodes(self.node, self.bootstrap_addrs, self.node.loop.time())
        self.nat = await nat.detect(self.node, targets)
        if self.presence is not None:
            self.presence.records.nat = self.nat
        log.info("NAT type: %s (asked %s)", self.nat, show_addrs(targets))
        return self.nat

    def ice_servers_now(self) -> list[rtc.IceServer]:
        """The STUN/TURN servers the next session uses (:func:`dhtsignal.ice.choose`):
        the configured ones, and a DHT node that answered recently as the STUN server
        unless one is configured or :attr:`PeerConfig.dht_stun` is off.

        :raises ConfigError: a configured server is malformed.
        """
        return ice.choose(
            self.ice_servers,
            self.node,
            self.bootstrap_addrs,
            name=self.node_id or self.self_id,
            now=self.node.loop.time(),
            wallclock=self.node.wallclock(),
            dht_stun=self.config.dht_stun,
        )

    async def _explain(
        self,
        pc: rtc.PeerConnection,
        servers: Sequence[rtc.IceServer],
        remote_nat: str,
        remote: str,
    ) -> str:
        """What a failed connection lacked: both NAT types, the servers that gave no
        candidate, and whether only TURN can help."""
        local, remote_types, _ = rtc.candidate_types(pc)
        parts = [f"NAT here: {self.nat}, at {remote}: {remote_nat}"]
        ours, theirs = rtc.candidate_families(pc)
        if ours and theirs and not ours & theirs:
            parts.append(
                f"no candidate pair was possible: we offered IPv{min(ours)} candidates only, "
                f"{remote} IPv{min(theirs)} only (gather on both: --ice-host, or no --ice-host)"
            )
        parts += await ice.gathering_problems(pc, servers)
        relayed = "relay" in local or "relay" in remote_types
        nats = {self.nat, remote_nat}
        if not relayed and nat.SYMMETRIC in nats and nat.OPEN not in nats:
            both = self.nat == remote_nat == nat.SYMMETRIC
            parts.append(
                ("both sides are behind symmetric NATs" if both else "a symmetric NAT")
                + ": a TURN server is needed (--ice-server turn:HOST:PORT with "
                "--ice-username/--ice-credential, or --ice-secret)"
                if not any(s.is_turn for s in servers)
                else "a working TURN server is needed"
            )
        elif "srflx" not in local and not relayed and not any(not s.is_turn for s in servers):
            parts.append("no STUN server was used: only host candidates were offered")
        return "; ".join(parts)

    async def _join(self) -> None:
        """Join through the bootstrap addresses; with
        :attr:`PeerConfig.join_retry_interval`, keep trying until one answers.

        :raises DhtTimeout: none answered (and no retries are configured).
        """
        began = time.monotonic()
        retry = self.config.join_retry_interval
        shown = show_addrs(self.bootstrap_addrs)
        while await self._join_once() == 0:
            why = self.node.core.why_unanswered()
            if retry is None:
                raise self.node.core.all_other_network() or DhtTimeout(
                    f"joining the DHT (no bootstrap node answered: {shown}{why})",
                    time.monotonic() - began,
                )
            if self.stats["join-retries"] == 0:
                log.warning(
                    "no bootstrap node answered (%s%s); retrying every %g s", shown, why, retry
                )
            self.stats["join-retries"] += 1
            await asyncio.sleep(retry)
        if self.stats["join-retries"]:
            log.warning("joined the DHT after %.1f s", time.monotonic() - began)

    async def _join_once(self) -> int:
        """One try at joining; returns the routing table's size afterwards.

        An anonymous peer (a throwaway dialer in client mode: nobody routes through it)
        only pings the bootstrap nodes: its lookups start from them, and it skips the
        lookup of its own ID, which would only fill a table it never serves from (and
        costs a soft timeout for every dead contact it meets). A peer with a node ID
        joins as every node does (:meth:`DhtNode.bootstrap`).
        """
        if self.node_id is not None:
            return await self.node.bootstrap(self.bootstrap_addrs)
        addrs = await self.node.resolve(self.bootstrap_addrs)
        await asyncio.gather(*(self.node.ping(a) for a in addrs), return_exceptions=True)
        return len(self.node.table)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _load_state(self) -> None:
        assert self.data_dir is not None
        try:
            restored = self.node.load_state(self.data_dir)
        except UsageError as exc:  # corrupt: never saved over, so the file is kept
            raise ConfigError("data_dir", str(exc)) from None
        self._state_loaded = True
        log.info("data directory %s: restored %d records", self.data_dir, restored)

    def save_state(self) -> None:
        """Write the DHT state to the data directory (with :attr:`PeerConfig.keep_state`,
        once it was loaded); a failure to write is logged, not raised."""
        if not self._state_loaded or self.data_dir is None:
            return
        try:
            self.node.save_state(self.data_dir)
        except OSError as exc:
            log.warning("cannot save state to %s: %s", self.data_dir, exc)

    async def close(self) -> None:
        """Sign off (tombstones), close every session, save the state, close the DHT node
        (once)."""
        if self._closed:
            return
        self._closed = True
        if self.presence is not None:
            try:
                await asyncio.wait_for(self.presence.stop(), self.config.sign_off_timeout)
            except (TimeoutError, DhtSignalError) as exc:
                log.info("sign-off incomplete (records will expire): %r", exc)
        for s in list(self._sessions):
            await s.close()
        self.save_state()
        await self.node.close()
        self._release()

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

    async def incoming(self) -> AsyncIterator[Session]:
        """Sessions other peers opened to us (open, and their channel binding checked)."""
        while True:
            yield await self._incoming.get()

    def room_events(self, room: str) -> AsyncIterator[RoomEvent]:
        """Joins and leaves of ``room`` as the DHT pushes them (the current members first),
        like PeerJS/Trystero's ``onPeerJoin``/``onPeerLeave``::

            async for event in peer.room_events("lab"):
                if isinstance(event, PeerJoined): ...

        See :func:`dhtsignal.rooms.watch_room`.

        :raises UsageError: ``room`` is not a valid room name.
        """
        from dhtsignal.rooms import watch_room

        return watch_room(self.node, room, self.known)

    def _observe(self, event: PeerEvent) -> None:
        if self._observer is not None:
            self._observer(event)

    def _count(self, name: str) -> None:
        self.stats[name] += 1

    def _session(
        self,
        pc: rtc.PeerConnection,
        session_id: bytes,
        remote_key: bytes,
        remote_id: str,
        options: ChannelOptions,
        drive: _Drive,
    ) -> Session:
        def closed(session: Session) -> None:
            self._sessions.discard(session)
            drive.close()

        return Session(
            pc,
            session_id,
            remote_key,
            remote_id,
            options,
            on_closed=closed,
            count=self._count,
            spawn=lambda coro: self.node.spawn(coro, name="session-close"),
            max_unread_bytes=self.config.max_unread_bytes,
            identity=self.identity,
        )

    # -- envelopes ----------------------------------------------------------------------

    def _deliver(
        self,
        rec: Record,
        msg_type: MessageType,
        direct: Sequence[Addr],
        settled: asyncio.Future[Any] | None = None,
        pushes: list[asyncio.Future[Any]] | None = None,
        holders: Sequence[Addr] = (),
    ) -> asyncio.Task[Any]:
        """Push ``rec`` straight to the recipient's DHT node, and store it under its inbox
        key (whose storing nodes push it too) unless ``settled`` completes within
        :attr:`PeerConfig.store_delay` (the direct push worked).

        :param pushes: if given, the replies of the direct pushes are appended to it
            (``True`` from the node that listens on the recipient's inbox).
        :param holders: the nodes holding the recipient's inbox subscription (its
            presence names them when it is behind a NAT): ``rec`` is stored there at once,
            and they push it to the recipient; if one of them stored it, the delayed store
            in the DHT is skipped (it would reach the same nodes).
        """
        sent = self._push(rec, direct[: self.config.direct_push_addrs])
        held: list[asyncio.Future[Any]] = []
        for addr in holders:
            try:
                stored = self.node.request(addr, "ds_store", self.node.ds_args([rec.raw]))
            except DhtSignalError:  # too many RPCs in flight: the DHT store remains
                break
            stored.add_done_callback(ignore_outcome)
            held.append(stored)
        if pushes is not None:
            pushes.extend(sent)
        self._observe(SignalSent(rec.sub[:-1], msg_type, rec))
        if settled is None or not direct:
            return self.node.spawn(self.node.put([rec]), name="inbox-put")
        return self.node.spawn(self._store_unless(settled, rec, held), name="inbox-put")

    def _push(self, rec: Record, addrs: Sequence[Addr]) -> list[asyncio.Future[Any]]:
        """Push ``rec`` with ``ds_notify`` to each of ``addrs``; returns the replies'
        futures (their failures need not be retrieved)."""
        out: list[asyncio.Future[Any]] = []
        for addr in addrs:
            fut = self.node.request(addr, "ds_notify", self.node.ds_args(rec.key, [rec.raw]))
            fut.add_done_callback(ignore_outcome)
            out.append(fut)
        return out

    async def _store_unless(
        self, settled: asyncio.Future[Any], rec: Record, held: Sequence[asyncio.Future[Any]] = ()
    ) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(settled), self.config.store_delay)
        except TimeoutError:
            if any(_stored_ok(f) for f in held):
                self.stats["inbox-stored-at-holders"] += 1
                return
            await self.node.put([rec])
            return
        except BaseException:  # settled otherwise (failed, superseded): no store needed
            pass
        self.stats["inbox-store-skipped"] += 1

    def _reject(self, offer: OfferReceived, why: str, via: Addr | None) -> None:
        rec = self.inbox.seal_reject(
            offer.sender, offer.x25519, offer.session_id, why, self.node.wallclock()
        )
        self._deliver(rec, MessageType.REJECT, reply_addrs(offer, via))

    def _my_addrs(self) -> list[Addr]:
        out: list[Addr] = []
        mine = [self.node.address] if self.node.address is not None else []
        for a in [*mine, *(a for a, _ in self.node.observed.most_common(2))]:
            # A wildcard bind (0.0.0.0, ::) is no address anyone can send to: a callee
            # pushing there reaches itself (a response from the wrong address).
            if (a[0], a[1]) not in out and not _unspecified(a[0]):
                out.append((a[0], a[1]))
        return out[: inbox_protocol.MAX_BODY_ADDRS]

    async def _listen_inbox(self) -> None:
        self.node.spawn(self._inbox_loop(), name="inbox")
        # One turn of the loop: the inbox task registers its local listener before we
        # return, so an envelope pushed right after start() is not missed.
        await asyncio.sleep(0)

    async def _inbox_loop(self) -> None:
        # initial=False: records already stored are for a previous run of this key.
        async for rec in self.node.listen(self.inbox.key, initial=False):
            try:
                self._on_record(rec)
            except Exception as exc:  # remote input must never end the loop
                self.stats["inbox-error"] += 1
                log.debug("inbox record dropped: %r", exc)

    def _on_record(self, rec: Record) -> None:
        outcome = self.inbox.receive(rec, self.node.wallclock())
        if isinstance(outcome, Refused):
            self.stats[outcome.counter] += 1
        elif isinstance(outcome, OfferReceived):
            self._on_offer(outcome, self.node.core.pushed_by(rec))
        elif outcome is not None:
            dial = self._dials.get(outcome.session_id)
            if dial is not None and not dial.answer.done():
                if isinstance(outcome, AnswerReceived):
                    dial.answer.set_result(outcome)
                elif isinstance(outcome, AnswerMalformed):
                    dial.answer.set_exception(DialFailed("peer", "bad-answer", outcome.why))
                elif isinstance(outcome, RejectReceived):
                    dial.answer.set_exception(DialFailed("peer", "rejected", outcome.why))
        self._observe(SignalReceived(rec, outcome))

    # -- answering ----------------------------------------------------------------------

    def _on_offer(self, offer: OfferReceived, via: Addr | None) -> None:
        """An offer, pushed to us by ``via`` (None: found by a poll)."""
        for dial in self._dials.values():
            if dial.remote_key == offer.sender and not dial.answer.done():
                if glare_winner(self.public_key, offer.sender, dial.session_id, offer.session_id):
                    self.stats["glare-kept-own"] += 1
                    return
                self.stats["glare-yielded"] += 1
                dial.superseded = asyncio.get_running_loop().create_future()
                dial.answer.set_exception(_Superseded())
                self._pending_incoming += 1
                self._pending_by_host[_host(via)] += 1
                self.node.spawn(self._answer(offer, dial.superseded, via), name="answer")
                return
        if self._pending_incoming >= self.config.max_pending_incoming:
            self.stats["refused:too-many-handshakes"] += 1
            log.info(
                "incoming session %s from %s refused: over %d handshakes in progress",
                offer.session_id.hex(),
                self_certifying_id(offer.sender),
                self.config.max_pending_incoming,
            )
            return
        host = _host(via)
        if self._pending_by_host[host] >= self.config.max_pending_incoming_per_host:
            self.stats["refused:too-many-from-host"] += 1
            log.info(
                "incoming session %s from %s refused: over %d handshakes delivered by %s",
                offer.session_id.hex(),
                self_certifying_id(offer.sender),
                self.config.max_pending_incoming_per_host,
                host or "polls",
            )
            return
        self._pending_incoming += 1
        self._pending_by_host[host] += 1
        self.node.spawn(self._answer(offer, None, via), name="answer")

    async def _check_policy(self, sender: bytes, label: str) -> str | None:
        """The verified node ID of ``sender`` if the accept policy lets it in, else None."""
        sid = self_certifying_id(sender)
        if self.accept is not None and sid in self.accept:
            return sid
        if label and label != sid and (self.accept is None or label in self.accept):
            # The label is only the sender's claim: it must be held by the sender's key
            # (read, never pinned: a stranger's message must not make us pin anything).
            try:
                holder = await asyncio.wait_for(
                    label_owner(self.node, label, self.known), self.timeouts.resolve
                )
            except (TimeoutError, DhtSignalError) as exc:
                log.debug("cannot verify the label %r of %s: %r", label, sid, exc)
                holder = None
            if holder != sender:
                self.stats["label-unverified"] += 1
            if holder == sender:
                return label
        return sid if self.accept is None else None

    async def _answer(
        self,
        offer: OfferReceived,
        superseded: asyncio.Future[Session] | None,
        via: Addr | None,
    ) -> None:
        """Answer ``offer`` (``_pending_incoming`` was counted up for it). The answer or
        reject is pushed directly only to ``via``, the node that pushed the offer, and
        only if the offer names it as the caller's (:func:`reply_addrs`); else it only
        goes through the DHT (the caller's inbox key)."""
        loop = asyncio.get_running_loop()
        drive = _Drive(SessionMachine(time.monotonic(), caller=False, timeouts=self.timeouts))
        machine = drive.machine
        sender, session_id = offer.sender, offer.session_id
        pc: rtc.PeerConnection | None = None
        try:
            if self.accept is None:
                # Anyone may connect: verify the claimed label while ICE runs.
                verified = self.node.spawn(self._check_policy(sender, offer.label), name="verify")
                remote_id: str | None = self_certifying_id(sender)
            else:
                verified = None
                remote_id = await drive.within(self._check_policy(sender, offer.label))
            if remote_id is None:
                self.stats["refused:policy"] += 1
                log.info(
                    "incoming session %s from %s (claims %r) refused: not in the accept list",
                    session_id.hex(),
                    self_certifying_id(sender),
                    offer.label,
                )
                self._reject(offer, "not accepted", via)
                drive.fail("refused")
                return
            servers = self.ice_servers_now()
            pc = self._new_connection(servers)
            session = self._session(pc, session_id, sender, remote_id, offer.channel, drive)
            await drive.within(rtc.apply_remote(pc, offer.sdp, "offer"))
            answer = await drive.within(rtc.local_description(pc, offer=False))
            if _CANDIDATE_LINE.search(answer) is None:
                self.stats["incoming-failed:no-candidates"] += 1
                why = "the callee " + NO_CANDIDATES
                self._reject(offer, why, via)
                log.warning("incoming session %s: %s", session_id.hex(), why)
                drive.fail("no-candidates")
                return
            opened: asyncio.Future[None] = loop.create_future()
            rec = self.inbox.seal_answer(
                sender, offer.x25519, session_id, answer, self.node.wallclock()
            )
            self._deliver(rec, MessageType.ANSWER, reply_addrs(offer, via), opened)
            drive.input(machine.answer_sent)
            try:
                await self._open(session, drive, servers, nat.UNKNOWN)
            finally:
                if not opened.done():
                    opened.set_result(None)
            if verified is not None:
                session.remote_id = await verified or session.remote_id
            pc = None
            self._sessions.add(session)
            if superseded is not None:
                superseded.set_result(session)
            else:
                self._incoming.put_nowait(session)
        except (DhtSignalError, TimeoutError, _StageEnded) as exc:
            error = _answer_error(exc, sender, self.timeouts)
            drive.fail(getattr(error, "reason", "error"))
            self.stats["incoming-failed"] += 1
            log.info("incoming session %s failed: %s", session_id.hex(), error)
            self._observe(IncomingFailed(session_id, sender, error))
            if superseded is not None and not superseded.done():
                superseded.set_exception(error)
        finally:
            self._pending_incoming -= 1
            host = _host(via)
            self._pending_by_host[host] -= 1
            if self._pending_by_host[host] <= 0:
                del self._pending_by_host[host]
            drive.abandon("cancelled")
            if pc is not None:
                await pc.close()

    async def _open(
        self,
        session: Session,
        drive: _Drive,
        servers: Sequence[rtc.IceServer] = (),
        remote_nat: str = nat.UNKNOWN,
    ) -> None:
        """Wait for ICE and both data channels, within the machine's connect deadline.

        :raises ConnectFailed: ICE or DTLS failed, the connection closed or the deadline
            passed, with the candidate types gathered and tried.
        """
        machine = drive.machine
        started = time.monotonic()
        try:
            ice_at = await drive.within(rtc.wait_open(session.pc, [session.data, session.ctl]))
            await self._bind(session, drive, started)
        except ConnectFailed as exc:
            drive.fail(exc.reason)
            if type(exc) is not ConnectFailed:
                raise
            hint = await self._explain(session.pc, servers, remote_nat, session.remote_id)
            raise ConnectFailed(
                exc.reason,
                exc.seconds,
                exc.local_types,
                exc.remote_types,
                exc.tried,
                hint=hint,
            ) from None
        except _StageEnded as exc:
            reason = "timeout" if exc.reason == "connect-timeout" else exc.reason
            raise ConnectFailed(
                reason,
                time.monotonic() - started,
                *rtc.candidate_types(session.pc),
                hint=await self._explain(session.pc, servers, remote_nat, session.remote_id),
            ) from None
        if drive.live:
            drive.input(machine.ice_connected, ice_at)
            event = drive.input(machine.channel_open)
            assert isinstance(event, SessionOpened)
            session.phases = event.phases
        else:
            # The remote closed as soon as the channels opened (a one-shot ``send``): the
            # session still opened, and what it received is still delivered.
            session.phases = machine.phases
        session.path = rtc.selected_pair(session.pc)

    async def _bind(self, session: Session, drive: _Drive, started: float) -> None:
        """The channel binding (:mod:`dhtsignal.signaling.binding`): send our signature,
        wait for the remote's (within the connect deadline) and check it under the key we
        dialed or accepted.

        :raises BindingFailed: the remote's signature does not verify (counted as
            ``closed:binding-failed``).
        :raises ConnectFailed: the session closed before the remote's signature came.
        """
        if not session.binding_sent:  # normally sent as soon as ``ctl`` opened
            session.send_binding(self.identity)
        try:
            signature = await drive.within(session.remote_binding)
        except SessionClosed:
            raise ConnectFailed(
                "closed", time.monotonic() - started, *rtc.candidate_types(session.pc)
            ) from None
        if not session.binding_holds(self.public_key, signature):
            self.stats["closed:binding-failed"] += 1
            error = BindingFailed(session.remote_id, session.remote_key, time.monotonic() - started)
            log.warning("session %s: %s", session.session_id.hex(), error)
            raise error

    # -- dialing ------------------------------------------------------------------------

    async def _resolve(self, node_id: str, *, cached: bool = True) -> tuple[PeerInfo, bool]:
        """:func:`resolve` (pinning: a dial is the user's own), reusing a recent answer
        (presence changes rarely) unless ``cached`` is False; the flag says whether it was
        just read from the DHT."""
        now = self.node.wallclock()
        hit = self._resolved.get(node_id)
        if cached and hit is not None and hit[0] > now:
            return hit[1], False
        info = await resolve(self.node, node_id, self.known, pin=True)
        self._resolved[node_id] = (now + min(self.config.resolve_cache_ttl, info.expires_in), info)
        if len(self._resolved) > 1024:
            self._resolved.pop(next(iter(self._resolved)))
        return info, True

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
        :raises DialFailed: no answer (``answer-timeout``), a refusal (``rejected``), or the
            presence not found in time (``resolve-timeout``).
        :raises ConnectFailed: ICE/DTLS could not complete, with the reason.
        :raises BindingFailed: the connection opened, but the other end is not the key
            ``node_id`` resolved to (see :mod:`dhtsignal.signaling.binding`).
        """
        if not self._started:
            raise UsageError("start the peer first (async with Peer(...) as peer)")
        options = ChannelOptions(ordered, max_retransmits, max_packet_life_time)
        drive = _Drive(SessionMachine(time.monotonic(), caller=True, timeouts=self.timeouts))
        try:
            return await self._dial(node_id, options, drive)
        except BaseException as exc:
            drive.abandon(getattr(exc, "reason", type(exc).__name__))
            raise

    async def _dial(self, node_id: str, options: ChannelOptions, drive: _Drive) -> Session:
        t = self.timeouts
        machine = drive.machine
        try:
            info, fresh = await drive.within(self._resolve(node_id))
        except _StageEnded:
            raise DialFailed(
                node_id, "resolve-timeout", f"could not resolve within {t.resolve:.1f} s"
            ) from None
        drive.input(machine.resolved)
        session_id = os.urandom(8)
        answered: asyncio.Future[AnswerReceived] = asyncio.get_running_loop().create_future()
        answered.add_done_callback(ignore_outcome)
        dial = _Dial(info.public_key, session_id, answered)
        self._dials[session_id] = dial
        self.inbox.expect(session_id, info.public_key)
        servers = self.ice_servers_now()
        direct = self._direct_works(info.nat) and any(s.is_turn for s in servers)
        if direct:  # prefer the direct pair: no relay candidate on either side
            servers = [s for s in servers if not s.is_turn]
            self.stats["relay-skipped"] += 1
        pc = self._new_connection(servers)
        session = self._session(pc, session_id, info.public_key, node_id, options, drive)
        put: asyncio.Task[Any] | None = None
        watch: asyncio.Task[None] | None = None
        try:
            try:
                offer = await drive.within(rtc.local_description(pc, offer=True))
                if dial.superseded is not None:  # glare: we yielded while gathering; send nothing
                    await pc.close()
                    return await dial.superseded
                if _CANDIDATE_LINE.search(offer) is None:
                    problems = await ice.gathering_problems(pc, servers)
                    raise DialFailed(
                        node_id, "no-candidates", "; ".join([NO_CANDIDATES, *problems])
                    )
                rec = self.inbox.seal_offer(
                    info.public_key,
                    info.x25519,
                    session_id,
                    offer,
                    label=self.node_id or "",
                    dht=self._my_addrs(),
                    channel=options,
                    now=self.node.wallclock(),
                )
                pushes: list[asyncio.Future[Any]] = []
                put = self._deliver(
                    rec, MessageType.OFFER, info.addresses, dial.answer, pushes, info.holders
                )
                drive.input(machine.offer_sent)
                ack_timeout = self.config.push_ack_timeout
                natted = info.client_mode or info.nat in (nat.CONE, nat.SYMMETRIC)
                if pushes and ack_timeout is not None and not natted:
                    watch = self.node.spawn(
                        self._expect_ack(
                            node_id, rec, info, fresh, pushes, dial.answer, ack_timeout
                        ),
                        name="push-ack",
                    )
                try:
                    answer = await drive.within(dial.answer)
                except _Superseded:
                    await pc.close()
                    assert dial.superseded is not None
                    return await dial.superseded
                except DialFailed as exc:  # a REJECT or a bad answer: name the peer we dialed
                    raise DialFailed(node_id, exc.reason, exc.detail) from None
                sdp = _RELAY_LINE.sub("", answer.sdp) if direct else answer.sdp
                await drive.within(rtc.apply_remote(pc, sdp, "answer"))
            except _StageEnded as exc:
                raise self._answer_timeout(node_id, exc, put, info) from None
            if drive.live:  # else ICE failed at once (no pair possible): _open says why
                drive.input(machine.answer_received)
            await self._open(session, drive, servers, info.nat)
        except BaseException:
            self._resolved.pop(node_id, None)
            await pc.close()
            raise
        finally:
            if watch is not None:
                watch.cancel()
            self._dials.pop(session_id, None)
            self.inbox.forget(session_id)
        self._sessions.add(session)
        return session

    def _direct_works(self, remote_nat: str) -> bool:
        """Whether a direct pair works for sure with a callee behind ``remote_nat``: no
        side is behind a symmetric NAT and both know their type (RFC 4787
        endpoint-independent mapping on both sides, so hole punching succeeds). Then a
        dial uses no TURN: aioice nominates the first pair whose check succeeds, which
        can be a relay pair while the direct one is still being punched."""
        good = (nat.OPEN, nat.CONE)
        return (
            self.config.prefer_direct
            and self.nat in good
            and remote_nat in good
            and bool(rtc.host_addresses())
        )

    async def _expect_ack(
        self,
        node_id: str,
        rec: Record,
        info: PeerInfo,
        fresh: bool,
        pushes: list[asyncio.Future[Any]],
        answer: asyncio.Future[AnswerReceived],
        timeout: float,
    ) -> None:
        """Fail the dial as ``not-responding`` unless one direct push of the offer is
        acknowledged by the callee's own node (``ds_notify`` answered ``True``: it
        listens on the callee's inbox) or the answer arrives within ``timeout`` seconds.

        A crashed peer's presence stays in the DHT until it expires; its node no longer
        answers, which this notices in about a second instead of at the answer deadline,
        or within a round trip when the pushed addresses refuse datagrams (the process is
        gone, its host is up: :attr:`PeerConfig.probe_closed_ports`). When ``info`` came
        from the resolve cache (not ``fresh``), the presence is read again first: a callee
        that restarted elsewhere gets the offer pushed to its new addresses (and another
        ``timeout``), one that signed off meanwhile fails as offline, one now in client
        mode is not judged.
        """
        addrs = info.addresses[: len(pushes)]
        verdict = await self._acked(pushes, answer, timeout, self._probe(addrs, timeout))
        if verdict is _Ack.ACKED:
            return
        if not fresh:  # refused or silent: it may have moved
            try:
                now_info, _ = await self._resolve(node_id, cached=False)
            except DhtSignalError as exc:  # offline now, or its pinned key changed
                if not answer.done():
                    answer.set_exception(exc)
                return
            if now_info.client_mode or now_info.nat in (nat.CONE, nat.SYMMETRIC):
                return
            moved = [
                a for a in now_info.addresses[: self.config.direct_push_addrs] if a not in addrs
            ]
            if moved and now_info.public_key == info.public_key:
                addrs = moved
                pushed = self._push(rec, moved)
                verdict = await self._acked(pushed, answer, timeout, self._probe(moved, timeout))
                if verdict is _Ack.ACKED:
                    return
        if answer.done():
            return
        self.stats["dial-failed:not-responding"] += 1
        if verdict is _Ack.REFUSED:
            self.stats["not-responding:port-closed"] += 1
            why = (
                "not responding: nothing listens on its DHT address any more (pushed to "
                f"{show_addrs(addrs)}: port unreachable; crashed or stopped)"
            )
        else:
            why = (
                f"not responding: its DHT node did not acknowledge the offer within "
                f"{timeout:.1f} s (pushed to {show_addrs(addrs)}; crashed, or not reachable "
                "from here)"
            )
        answer.set_exception(DialFailed(node_id, "not-responding", why))

    def _probe(self, addrs: Sequence[Addr], timeout: float) -> asyncio.Task[bool] | None:
        """With :attr:`PeerConfig.probe_closed_ports`, a task telling whether every one of
        ``addrs`` refuses datagrams (:func:`dhtsignal.portprobe.refused`)."""
        if not self.config.probe_closed_ports or not addrs:
            return None
        return self.node.spawn(portprobe.refused(addrs, timeout), name="port-probe")

    @staticmethod
    async def _acked(
        pushes: list[asyncio.Future[Any]],
        answer: asyncio.Future[AnswerReceived],
        timeout: float,
        probe: asyncio.Task[bool] | None = None,
    ) -> _Ack:
        """Whether one of ``pushes`` is answered ``True`` or ``answer`` completes within
        ``timeout`` seconds (:attr:`_Ack.ACKED`), or ``probe`` found every pushed address
        closed first (:attr:`_Ack.REFUSED`), or neither (:attr:`_Ack.SILENT`). Pushes that
        end unacknowledged leave the answer (the DHT path) its chance until the deadline.
        ``probe`` is cancelled on return."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting: set[asyncio.Future[Any]] = set(pushes)
        if probe is not None:
            waiting.add(probe)
        try:
            # Bounded: each round ends a future of ``waiting`` or reaches the deadline.
            while not answer.done() and (left := deadline - loop.time()) > 0:
                done, _ = await asyncio.wait(
                    {*waiting, answer}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in done - {answer}:
                    waiting.discard(fut)
                    if fut.cancelled() or fut.exception() is not None:
                        continue  # RpcTimeout, too many RPCs in flight; a failed probe
                    if fut is probe:
                        if fut.result() is True and not answer.done():
                            return _Ack.REFUSED
                    elif fut.result() is True:
                        return _Ack.ACKED
            return _Ack.ACKED if answer.done() else _Ack.SILENT
        finally:
            if probe is not None:
                probe.cancel()

    def _answer_timeout(
        self, node_id: str, exc: _StageEnded, put: asyncio.Task[Any] | None, info: PeerInfo
    ) -> DialFailed:
        if exc.reason != "answer-timeout":
            return DialFailed(node_id, exc.reason, f"session {exc.reason} before the answer")
        within = f"no answer within {self.timeouts.answer:.1f} s"
        if put is None:
            return DialFailed(node_id, exc.reason, f"{within} (offer not sent: still gathering)")
        pushed = len(info.addresses[: self.config.direct_push_addrs])
        stored = "stored in the DHT" if _put_ok(put) else "NOT stored in the DHT"
        return DialFailed(
            node_id, exc.reason, f"{within} (offer {stored}, pushed to {pushed} address(es))"
        )


def reply_addrs(offer: OfferReceived, via: Addr | None) -> list[Addr]:
    """Where an answer or reject to ``offer`` may be pushed directly: the node that
    pushed the offer to us, if the offer names it as the caller's DHT address. Never an
    address the offer merely names: a sealed offer from a throwaway key could name a
    victim's (issue 10, item 7). Anything else goes through the DHT only.

    :param via: the address that pushed the offer (None: found by a poll).
    """
    if via is None:
        return []
    return [a for a in offer.dht if (a[0], a[1]) == (via[0], via[1])][:1]


def _host(via: Addr | None) -> str:
    return "" if via is None else host_of(via)


def _unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_unspecified
    except ValueError:
        return False


def default_data_dir(node_id: str, environ: Mapping[str, str] | None = None) -> Path:
    """The data directory a :class:`Peer` with ``node_id`` and no ``data_dir`` uses:
    ``$XDG_DATA_HOME/dhtsignal/peers/NODE_ID`` (``~/.local/share`` when the variable is
    unset), beside the CLI's daemons' directories. One per node ID: two labelled peers
    of one program must not share a key (they would share an inbox).

    :param node_id: the peer's label (already checked: no path separators).
    :param environ: the environment (default ``os.environ``).
    """
    from dhtsignal.config import data_home

    return data_home(os.environ if environ is None else environ) / "peers" / node_id


class _Superseded(Exception):
    """Glare: our offer gave way to the remote's; the answered session replaces it."""


def _stored_ok(fut: asyncio.Future[Any]) -> bool:
    """Whether a ``ds_store`` of one record was answered as stored."""
    if not fut.done() or fut.cancelled() or fut.exception() is not None:
        return False
    result = fut.result()
    return isinstance(result, list) and result == ["ok"]


def _put_ok(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _answer_error(
    exc: DhtSignalError | TimeoutError | _StageEnded, sender: bytes, timeouts: SessionTimeouts
) -> DhtSignalError:
    """What a failed incoming handshake reports (to a glare loser's ``connect()`` too)."""
    if isinstance(exc, DhtSignalError):
        return exc
    who = self_certifying_id(sender)
    if isinstance(exc, _StageEnded) and exc.reason == "answer-timeout":
        return DialFailed(who, exc.reason, f"could not answer within {timeouts.answer:.1f} s")
    reason = exc.reason if isinstance(exc, _StageEnded) else "timeout"
    return DialFailed(who, reason, f"incoming session ended ({reason})")


__all__ = [
    "ChannelOptions",
    "ConnectFailed",
    "DialFailed",
    "IncomingFailed",
    "Observer",
    "Peer",
    "PeerConfig",
    "PeerEvent",
    "PeerInfo",
    "Session",
    "SignalReceived",
    "SignalSent",
    "default_data_dir",
]
