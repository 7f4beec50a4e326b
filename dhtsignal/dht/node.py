"""A DHT node without I/O: datagrams, times and operations in; datagrams and events out.

Theory of operation
-------------------
:class:`Node` is the whole protocol of one DHT node, in the manner of aioquic's
``QuicConnection``. It owns no socket, no task and no clock:

* the driver hands it every datagram with :meth:`Node.receive_datagram` (``data``,
  source address, monotonic ``now``); a request's reply comes back as the return
  value, to be sent to the source at once (the hot path allocates nothing beyond the
  reply); everything else the node wants sent waits in :attr:`Node.outgoing`, taken
  with :meth:`Node.datagrams_to_send`;
* it says when it next needs to run with :meth:`Node.get_timer` and is run then with
  :meth:`Node.handle_timer`; :attr:`Node.timer_changed` says the earliest timer moved
  earlier since the driver last looked;
* operations are started on it (:meth:`Node.send_request`, :meth:`Node.start_lookup`,
  :meth:`Node.start_put`, :meth:`Node.start_get`, :meth:`Node.start_ping`,
  :meth:`Node.start_bootstrap`, :meth:`Node.listen`) and end as events
  (:class:`RequestAnswered`, :class:`LookupFinished`, :class:`RecordsStored`,
  :class:`OperationFailed`, ...), taken with :meth:`Node.next_event` or read off
  :attr:`Node.events`.

Clocks: ``now`` (monotonic seconds) is an argument of every entry point; the wall
clock for record expiry is a callable given at construction (the simulator passes a
virtual one), which :class:`~dhtsignal.dht.rpc.RequestHandler` shares.

Inside, one heap of ``(when, seq, kind, arg)`` timers serves every deadline; an entry
whose purpose has gone (an RPC answered, a lookup over) fires as a no-op.

* RPCs: a pending table keyed by message id. First tries all wait ``rpc_timeout``,
  so they fall due in the table's insertion order and one timer entry serves them
  all (an RPC answered in time costs none); a retried RPC has its own entry, the
  n-th try waiting ``n * rpc_timeout``; after ``rpc_retries`` retries it fails with
  :class:`~dhtsignal.errors.RpcTimeout` (counted ``rpc-timeout``).
* Requests are rate-limited per source host and prefix
  (:class:`~dhtsignal.dht.ratelimit.HostRateLimiter`) and answered by the I/O-free
  :class:`~dhtsignal.dht.rpc.RequestHandler`; a contact waiting for a full bucket's
  place makes the node ping that bucket's head (one ping per head at a time); new
  records are pushed to subscribers (``ds_notify``), within a
  :class:`~dhtsignal.dht.listen.PushBudget` per listener host and prefix. The last
  ``inflight_reserve`` places of the pending table are for those pings and pushes.
* Lookups drive :class:`~dhtsignal.dht.lookup.Lookup` machines: each answer is
  parsed (:mod:`~dhtsignal.dht.replies`), fed to the machine, and the
  machine's next step sent at once; or, with :attr:`Node.batch_lookups` (the asyncio
  adapter), once per batch of datagrams, when the driver calls
  :meth:`Node.drive_lookups`. Record pages beyond the first are fetched while
  the lookup runs; the result waits for them. A lookup's closest nodes are cached
  for ``lookup_cache_ttl`` to start the next lookup of the same key from.
* A put is a storing lookup (``ds_store_find``); the node stores its own copy if it
  is among the closest, and :func:`~dhtsignal.dht.putpolicy.put_result` turns the
  storing nodes' refusal tags into :class:`~dhtsignal.errors.NodeIdTaken`,
  :class:`~dhtsignal.errors.StoreLimitExceeded` or
  :class:`~dhtsignal.errors.PutFailed`.
* Listening (:class:`~dhtsignal.dht.listen.Listening`, which the node composes):
  one subscription cycle per key, however many listeners: subscribe (lookup, then
  ``ds_listen`` to the closest), refresh at half ``listen_ttl``; with no storing node
  accepting, poll every ``poll_interval`` and, once a subscription is accepted again,
  poll once more to catch up; the last listener leaving sends ``ds_unlisten``. Pushed
  and polled records come out as :class:`RecordsReceived`.
* Maintenance every ``maintenance_interval``: expiry, rate-limiter pruning, cache
  expiry, and lookups refreshing stale buckets.
* Liveness (BEP 5; :mod:`~dhtsignal.dht.routing`): find replies name only contacts heard
  from within ``good_for``; the questionable ones (passed over in a reply, silent
  since ``good_for``, or with a failed RPC) are pinged in rounds of at most
  ``liveness_pings`` every ``liveness_interval``, and evicted after ``max_failures``.
  A ``ds_leave`` hides its sender's contact at once and is confirmed by one ping before
  eviction. :meth:`Node.leave` sends our own notices when we stop.
* Lookups avoid, for ``recent_failure_ttl`` or until it answers, a contact whose query
  just passed a lookup's soft timeout or went unanswered; their soft timeout follows the
  smoothed round-trip time (``adaptive_timeouts``); put and get lookups are strict
  (``strict_wait``): they end only once the k closest answered or failed (a get only
  until half of ``replicas`` storing nodes answered with records). A join's self-lookup
  is followed, within ``join_fill_delay``, by small lookups at the distances where the
  table knows almost nobody (:mod:`~dhtsignal.dht.join`). A join that found nobody is
  tried again (``rejoin_delay`` doubling to ``rejoin_max``), and a lookup on an empty
  table joins first (``join_first_wait``).
* :meth:`Node.snapshot` / :meth:`Node.restore`: the persistent state as plain data
  (the adapter writes and reads the file).

Nothing a remote party sends raises out of :meth:`Node.receive_datagram`: every
refusal is counted in :attr:`Node.stats` by reason.

Around it, in modules of their own: the events and results it reports
(:mod:`~dhtsignal.dht.events`), the per-host and per-prefix rate limiter
(:mod:`~dhtsignal.dht.ratelimit`), reply parsing (:mod:`~dhtsignal.dht.replies`) and
the put-result policy (:mod:`~dhtsignal.dht.putpolicy`), each pure; and the listen
cycle (:mod:`~dhtsignal.dht.listen`), which works through this node. This module
re-exports the names that were importable from it before.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from dhtsignal.dht import join, records
from dhtsignal.dht.events import (
    Bootstrapped,
    Event,
    HeldRecords,
    LookupFinished,
    LookupResult,
    OperationFailed,
    PingAnswered,
    PutResult,
    RecordsFound,
    RecordsReceived,
    RecordsStored,
    RequestAnswered,
    RequestFailed,
    SubscriptionRenewed,
    Then,
    ignore,
)
from dhtsignal.dht.hosts import prefix_if_any, public_prefix
from dhtsignal.dht.listen import Listening, PushBudget
from dhtsignal.dht.lookup import Finished, Lookup, Query, Wait
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.putpolicy import STORE_LIMITS, put_result
from dhtsignal.dht.ratelimit import HostRateLimiter, RateLimiter
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.dht.replies import (
    MAX_PAGE_RECORDS,
    closer_contacts,
    collect_records,
    ping_reply,
    shaped,
    value_page,
)
from dhtsignal.dht.routing import DIALECT_DS, DIALECT_STOCK, Contact, RoutingTable
from dhtsignal.dht.rpc import (
    FLAG_CLIENT,
    MAX_STORE_BATCH,
    WRONG_NETWORK,
    RequestHandler,
    parse_contact,
)
from dhtsignal.dht.storage import LegacyStore, RecordStore, Subscriptions
from dhtsignal.dht.validation import AddressBook
from dhtsignal.errors import (
    DhtSignalError,
    LimitExceeded,
    PutFailed,
    RecordRejected,
    RpcTimeout,
    UsageError,
    WrongNetwork,
)
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, show_addrs

# Re-exported: what was importable from this module before it was carved stays so.
__all__ = [
    "MAX_PAGE_RECORDS",
    "STORE_LIMITS",
    "Bootstrapped",
    "Event",
    "HeldRecords",
    "HostRateLimiter",
    "LookupFinished",
    "LookupResult",
    "Node",
    "OperationFailed",
    "PingAnswered",
    "PutResult",
    "RateLimiter",
    "RecordsFound",
    "RecordsReceived",
    "RecordsStored",
    "RequestAnswered",
    "RequestFailed",
    "SubscriptionRenewed",
    "Then",
    "routing_id",
    "value_page",
]

log = logging.getLogger(__name__)

#: Bytes a first find request is padded to: 3x of it holds the largest answer (a
#: datagram) beside the validation ping (RFC 9000 section 8.1's 3x, section 14.1's padding).
PAD_TO = (codec.MAX_DATAGRAM + 100) // 3 + codec.HEADER_BYTES

_FIRST, _RETRY, _LOOKUP, _MAINT, _LISTEN, _LIVE, _JOINED, _FILL, _REJOIN, _JOIN_FIRST = range(10)


def routing_id(public_key: bytes) -> bytes:
    """A node's 20-byte routing ID, derived from its identity key (stable across restarts)."""
    return hashlib.sha256(b"dhtsignal/routing/" + public_key).digest()[:20]


def _diversity(cfg: NodeConfig) -> Callable[[Contact], str | None] | None:
    """The per-prefix diversity group of a contact under ``cfg`` (None: no limit)."""
    if cfg.max_per_prefix <= 0:
        return None
    prefix = prefix_if_any if cfg.diversity_on_private else public_prefix
    return lambda c: prefix(c.ip)


def replicas_for(cfg: NodeConfig, recs: Iterable[Record]) -> int:
    """Storing nodes of a put of ``recs``: ``name_replicas`` for node-ID records."""
    if any(r.type in (RecordType.CLAIM, RecordType.PRESENCE) for r in recs):
        return max(cfg.replicas, cfg.name_replicas)
    return cfg.replicas


class _Rpc:
    """One outstanding RPC; ``then`` None: report it as an event."""

    __slots__ = ("addr", "data", "name", "peer", "retries", "started", "then", "tries")

    def __init__(
        self,
        addr: Addr,
        data: bytes,
        name: str,
        started: float,
        then: Then | None,
        retries: int,
        peer: bytes | None,
    ):
        self.addr = addr
        self.data = data
        self.name = name
        self.started = started
        self.then = then
        self.tries = 1
        self.retries = retries
        #: the routing ID of a lookup query's contact (recently-failed bookkeeping)
        self.peer = peer


class _LookupOp:
    __slots__ = (
        "chains",
        "dirty",
        "done",
        "found",
        "holders",
        "key",
        "lk",
        "op_id",
        "pages",
        "remember",
        "step",
        "store",
        "stored",
        "then",
        "timer_at",
        "want_value",
    )

    def __init__(
        self,
        op_id: int,
        key: bytes,
        lk: Lookup,
        want_value: bool,
        remember: bool,
        store: list[bytes] | None,
        then: Then | None,
    ) -> None:
        self.op_id = op_id
        self.key = key
        self.lk = lk
        self.want_value = want_value
        self.remember = remember
        self.store = store
        self.then = then
        self.found: dict[bytes, set[bytes]] = {}
        #: nodes that answered with records (a get relaxes its strictness at a quorum)
        self.holders = 0
        self.stored: dict[bytes, Any] = {}
        self.done = False
        #: answered since it was last driven, waiting in Node._dirty (batched drive)
        self.dirty = False
        self.step: Finished | None = None
        self.pages = 0
        self.chains = 0
        self.timer_at: float | None = None


class _Gather:
    """Answers awaited from several nodes."""

    __slots__ = ("left", "ok")

    def __init__(self, left: int) -> None:
        self.left = left
        self.ok = 0


class Node:
    """One DHT node, without I/O.

    :param node_id: 20-byte routing ID (see :func:`routing_id`).
    :param config: protocol parameters.
    :param wallclock: wall-clock UNIX time (record expiry); the simulator passes a virtual one.
    """

    __slots__ = (
        "_boot_addrs",
        "_closed",
        "_dirty",
        "_first_armed",
        "_flags",
        "_join_waiters",
        "_listens",
        "_live_armed",
        "_live_last",
        "_lookup_cache",
        "_lookups",
        "_next_op",
        "_pending",
        "_ping_size",
        "_ping_sizes",
        "_pinging",
        "_pushes",
        "_recent",
        "_rejoin_armed",
        "_rejoin_wait",
        "_rttvar",
        "_seq",
        "_srtt",
        "_stats",
        "_timers",
        "_validating",
        "address",
        "addrs",
        "batch_lookups",
        "config",
        "events",
        "handler",
        "id",
        "legacy",
        "observed",
        "other_networks",
        "outgoing",
        "randbytes",
        "rate",
        "store",
        "stun_responder",
        "subs",
        "table",
        "timer_changed",
        "wallclock",
    )

    def __init__(
        self, node_id: bytes, config: NodeConfig | None = None, *, wallclock: Callable[[], float]
    ) -> None:
        self.config = cfg = config or NodeConfig()
        self.id = node_id
        self.wallclock = wallclock
        self.table = RoutingTable(
            node_id,
            cfg.ksize,
            cfg.max_failures,
            cfg.replacements,
            good_for=cfg.good_for,
            max_suspects=cfg.max_suspects,
        )
        self.store = RecordStore(cfg.limits)
        self.legacy = LegacyStore(cfg.limits)
        self.subs = Subscriptions(cfg.limits)
        self.handler = RequestHandler(
            node_id,
            cfg.network,
            self.table,
            self.store,
            self.legacy,
            self.subs,
            wallclock,
            accept_stock=cfg.accept_stock,
        )
        self._stats: Counter[str] = self.handler._stats
        self.rate = HostRateLimiter(
            cfg.rate_per_source,
            cfg.rate_burst,
            cfg.rate_per_prefix,
            cfg.rate_prefix_burst,
            cfg.max_rate_entries,
        )
        #: validated addresses and the amplification limit (:mod:`~dhtsignal.dht.validation`)
        self.addrs = AddressBook(
            cfg.amplification_factor,
            cfg.validated_size,
            cfg.unvalidated_size,
            cfg.validation_pings,
        )
        #: bytes of our largest validation ping (``ds_ping``), kept free in a reply's
        #: allowance
        self._ping_size = codec.HEADER_BYTES + len(
            codec.pack(["ds_ping", [cfg.network, node_id, 0xFF]])
        )
        #: bytes of our validation ping in each dialect (stock ``ping``, ``ds_ping``)
        self._ping_sizes = tuple(
            codec.HEADER_BYTES + len(codec.pack(body))
            for body in (
                ["ping", [node_id]],
                ["ds_ping", [cfg.network, node_id, FLAG_CLIENT if cfg.client_mode else 0]],
            )
        )
        #: addresses a validation ping is outstanding to
        self._validating: dict[Addr, None] = {}
        #: our address as the driver bound it (None: not yet)
        self.address: Addr | None = None
        #: our address as others saw it (``ds_ping`` answers), counted
        self.observed: Counter[Addr] = Counter()
        #: answers a STUN datagram (the driver sets it: :mod:`dhtsignal.aio.stun`); None
        #: drops STUN
        self.stun_responder: Callable[[bytes, Addr], bytes | None] | None = None
        #: datagrams to send: (data, address)
        self.outgoing: list[tuple[bytes, Addr]] = []
        #: events not yet taken
        self.events: list[Event] = []
        #: the earliest timer moved earlier since the driver last cleared this
        self.timer_changed = False
        #: drive lookups once per batch of datagrams: an answer only marks its lookup,
        #: and the driver calls :meth:`drive_lookups` after the batch (see there)
        self.batch_lookups = False
        self._dirty: list[_LookupOp] = []
        self._flags = FLAG_CLIENT if cfg.client_mode else 0
        self._pending: dict[bytes, _Rpc] = {}
        self._pinging: dict[bytes, None] = {}
        #: contacts whose lookup query went unanswered: ID -> until when to avoid them
        self._recent: dict[bytes, float] = {}
        self._live_armed = False
        self._live_last = float("-inf")
        #: the addresses of the last bootstrap, tried again while the table is empty
        self._boot_addrs: list[Addr] = []
        self._rejoin_wait = 0.0  # the last wait before a re-join (0: none armed)
        self._rejoin_armed = False
        #: addresses we pinged that answered they serve another network (at most 16)
        self.other_networks: dict[Addr, WrongNetwork] = {}
        #: lookups waiting for a join started because the table was empty (None: none)
        self._join_waiters: list[Callable[[float], None]] | None = None
        #: smoothed round-trip time of first tries answered, and its deviation (RFC 6298)
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._listens = Listening(self, _LISTEN)
        self._pushes = PushBudget(
            cfg.max_pushes, cfg.max_pushes_per_host, cfg.max_pushes_per_prefix
        )
        self.handler.on_notify = self._listens.on_notify
        self._lookup_cache: dict[bytes, tuple[float, list[Contact]]] = {}
        self._lookups: dict[int, _LookupOp] = {}
        self._timers: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._next_op = 0
        self._first_armed = False
        self._closed = False
        #: random bytes for bucket-refresh targets (the simulator passes a seeded source)
        self.randbytes: Callable[[int], bytes] = os.urandom

    @property
    def stats(self) -> Counter[str]:
        """Counters by reason: requests answered (``rpc:NAME``), refusals (``drop:REASON``,
        ``refused:REASON``), retries and timeouts."""
        return self.handler.stats

    # -- driver interface ---------------------------------------------------------------

    def start(self, address: Addr | None, now: float) -> None:
        """The driver has bound ``address``: start maintenance.

        :param address: our address (as the driver bound it).
        :param now: monotonic time, seconds.
        """
        self.address = address
        self._schedule(now + self.config.maintenance_interval, _MAINT, None)

    def close(self) -> None:
        """Stop: forget every RPC, operation, subscription and timer (no events)."""
        self._closed = True
        self._pending = {}
        self._validating = {}
        self._lookups = {}
        self._dirty = []
        self._listens.clear()
        self._pushes.clear()
        self._timers = []
        self.outgoing = []

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        """Take the datagrams waiting to be sent.

        :param now: monotonic time, seconds (unused: datagrams are never held back).
        """
        out = self.outgoing
        if out:
            self.outgoing = []
        return out

    def next_event(self) -> Event | None:
        """Take the oldest event not yet taken (None: none)."""
        return self.events.pop(0) if self.events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run (monotonic seconds), or None."""
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        """Run every timer due by ``now``.

        :param now: monotonic time, seconds.
        """
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, arg = heapq.heappop(timers)
            if self._closed:
                return
            if kind == _FIRST:
                self._first_armed = False
                self._first_tries_due(max(now, when))
            elif kind == _RETRY:
                self._retry(arg, now)
            elif kind == _LOOKUP:
                if not arg.done and arg.timer_at == when:
                    arg.timer_at = None
                    self._drive(arg, now)
            elif kind == _MAINT:
                self._maintain(now)
            elif kind == _LISTEN:
                self._listens.timer_due(arg, now)
            elif kind == _LIVE:
                self._live_armed = False
                self._liveness_round(now)
            elif kind == _JOINED:
                self._refresh_after_join(now)
            elif kind == _FILL:
                self._fill_after_join(now)
            elif kind == _REJOIN:
                self._rejoin(now)
            elif kind == _JOIN_FIRST:
                self.start_bootstrap(
                    self._boot_addrs, now, then=functools.partial(self._joined, arg)
                )
        if self._dirty:
            self.drive_lookups(now)

    @property
    def lookups_due(self) -> bool:
        """Whether lookups answered since :meth:`drive_lookups` last ran wait for it
        (only with :attr:`batch_lookups`)."""
        return bool(self._dirty)

    def drive_lookups(self, now: float) -> None:
        """Take the next step of every lookup answered since this last ran.

        With :attr:`batch_lookups` set, an answer (or a failed query) only updates its
        lookup's machine and marks it; the driver calls this once it has handed over a
        batch of datagrams (:meth:`handle_timer` calls it itself), so a lookup answered
        several times in one batch is driven once, as a lookup woken by its answers
        would be. Without :attr:`batch_lookups`, every answer drives its lookup at once
        and this has nothing to do.

        :param now: monotonic time, seconds.
        """
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for op in dirty:
            op.dirty = False
            self._drive(op, now)

    def _schedule(self, when: float, kind: int, arg: Any) -> None:
        self._seq += 1
        timers = self._timers
        heapq.heappush(timers, (when, self._seq, kind, arg))
        if timers[0][0] == when:
            self.timer_changed = True

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> bytes | None:
        """Handle one datagram.

        :param data: the datagram.
        :param addr: where it came from, ``(host, port)``.
        :param now: monotonic time, seconds.
        :returns: the reply to send to ``addr`` at once, if any (other datagrams wait in
            :attr:`outgoing`).
        """
        if self._closed:
            return None
        try:
            if codec.is_stun(data):
                return self._stun(data, addr, now)
            try:
                msg = codec.decode(data)
            except codec.MalformedDatagram as exc:
                self._stats["drop:" + exc.reason] += 1
                log.debug("%s: dropped datagram from %s: %s", self, addr, exc.reason)
                return None
            if type(msg) is codec.Response:
                self._on_response(msg, addr, now)
                return None
            assert type(msg) is codec.Request
            if not self.rate.admit(addr, now):
                self._stats["drop:rate-limited"] += 1
                return None
            book = self.addrs
            handler = self.handler
            trusted, handler.confirmed = book.touch(addr)
            if trusted:
                handler.limit = None
            else:
                # Not validated: everything sent to it is charged to 3x what it sent,
                # keeping room for the ping that validates it.
                allowance = book.received(addr, len(data)) - codec.HEADER_BYTES
                if addr not in self._validating:
                    allowance -= self._ping_size
                handler.limit = allowance
            out = handler.handle(msg, addr, now)
            if out.ping is not None:
                self._ping_head(out.ping, now)
            if out.leaving is not None:
                self._confirm_leave(out.leaving, now)
            if self.table.suspects and not self._live_armed:
                self._arm_liveness(now)
            if out.notify:
                for listener, key, raws in out.notify:
                    self._send_notify(listener, key, raws, now)
            reply = None
            if out.has_reply:
                reply = b"\x01" + msg.msg_id + out.body()
                if not trusted and not book.spend(addr, len(reply)):
                    self._stats["drop:amplification"] += 1
                    reply = None
            # Ping to validate when a reply had to be cut or a listen refused, or to admit
            # a newcomer (its answer names the ID that enters the table).
            if out.cut or out.newcomer is not None:
                dialect = DIALECT_DS if msg.name.startswith("ds_") else DIALECT_STOCK
                self._validate_sender(addr, dialect, out, now)
            return reply
        except Exception as exc:  # the guarantee: nothing escapes the handler
            self._stats["drop:internal"] += 1
            log.debug("%s: internal error on datagram from %s: %r", self, addr, exc)
            return None

    def subscription_holders(self, key: bytes) -> list[Addr]:
        """The storing nodes that accepted our last subscription of ``key`` (a NATed
        node keeps its mappings toward them open: they push to it)."""
        return self._listens.holders(key)

    def _stun(self, data: bytes, addr: Addr, now: float) -> bytes | None:
        """Answer a STUN datagram with :attr:`stun_responder` (rate-limited per source as
        requests are; counted ``stun:answered`` or ``drop:stun``)."""
        responder = self.stun_responder
        if responder is None or not self.rate.admit(addr, now):
            self._stats["drop:stun"] += 1
            return None
        reply = responder(data, addr)
        self._stats["stun:answered" if reply is not None else "drop:stun"] += 1
        return reply

    def __repr__(self) -> str:
        return f"<Node {self.id.hex()[:8]}>"

    # -- address validation (issue 10 items 1 and 5) -------------------------------------

    def _validate_sender(self, addr: Addr, dialect: int, out: Any, now: float) -> None:
        """Ping a sender not yet validated, or not yet a contact (``out.newcomer``): its
        answer validates the address and, for a newcomer, admits the ID it answers with.
        One ping per address at a time, ``validation_pings`` per second at most, and
        within the address's byte allowance."""
        if self._closed or addr in self._validating or addr == self.address:
            return
        if len(self._pending) > self.config.max_inflight // 2:
            return
        if dialect == DIALECT_DS:
            name, args = "ds_ping", self.ds_args()
        else:
            name, args = "ping", [self.id]
        book = self.addrs
        size = self._ping_sizes[dialect]
        allowance = book.allowance(addr)
        if allowance is not None and allowance < size:
            self._stats["validation-skipped"] += 1
            return
        if not book.may_ping(now):
            self._stats["validation-rate-limited"] += 1
            return
        book.spend(addr, size)
        self._validating[addr] = None
        self._stats["validation-ping"] += 1
        admit = None if out.newcomer is None else out.newcomer
        then = functools.partial(self._sender_pinged, addr, dialect, admit)
        try:
            self._rpc(addr, name, args, now, then, retries=0)
        except LimitExceeded:
            self._validating.pop(addr, None)
            self._stats["validation-skipped"] += 1

    def _sender_pinged(
        self,
        addr: Addr,
        dialect: int,
        admit: int | None,
        reply: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        self._validating.pop(addr, None)
        if not self._validating:
            self._validating = {}
        if error is not None:
            self._stats["validation-failed"] += 1
            return
        if dialect == DIALECT_DS:
            parsed = ping_reply(reply)
            nid = None if parsed is None else parsed[0]
        else:
            nid = reply if type(reply) is bytes and len(reply) == 20 else None
        if nid is None:
            self._stats["drop:bad-reply"] += 1
            return
        if admit is not None and nid != self.id:
            # The ID it answered with, at the address that answered: not what a
            # (possibly spoofed) request claimed.
            known = self.table.get(nid)
            self._learned(Contact(nid, addr[0], addr[1], known.dialect if known else admit), now)

    # -- RPCs ---------------------------------------------------------------------------

    def ds_args(self, *rest: Any) -> list[Any]:
        """Arguments of one of our RPCs: network, our ID, flags, then ``rest``."""
        return [self.config.network, self.id, self._flags, *rest]

    def send_request(self, addr: Addr, name: str, args: list[Any], now: float) -> bytes:
        """Send an RPC; it ends as :class:`RequestAnswered` or :class:`RequestFailed`.

        :param addr: where to.
        :param name: the RPC.
        :param args: its arguments.
        :param now: monotonic time, seconds.
        :returns: the request id (the message id).
        :raises LimitExceeded: too many RPCs outstanding, or the request is too large.
        """
        return self._rpc(addr, name, args, now, None)

    def outstanding(self, addr: Addr | None = None) -> int:
        """RPCs awaiting an answer (to ``addr`` only, if given)."""
        if addr is None:
            return len(self._pending)
        return sum(1 for p in self._pending.values() if p.addr == addr)

    def _rpc(
        self,
        addr: Addr,
        name: str,
        args: list[Any],
        now: float,
        then: Then | None,
        *,
        retries: int | None = None,
        peer: bytes | None = None,
        pad: bool = False,
        reserved: bool = False,
    ) -> bytes:
        cfg = self.config
        cap = cfg.max_inflight if reserved else cfg.max_inflight - cfg.inflight_reserve
        if len(self._pending) >= cap:
            raise LimitExceeded(
                f"{cap} RPCs already outstanding (max_inflight less inflight_reserve)"
                if not reserved
                else f"{cap} RPCs already outstanding (max_inflight)"
            )
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        # A first request to an address (it has not answered us, so it has most likely
        # not validated us either) whose answer may be large is padded so the answer
        # fits 3x of it (issue 10; QUIC's padded first packet).
        pad_to = PAD_TO if pad and not self.addrs.is_validated(addr) else 0
        data = codec.encode_request(msg_id, name, args, pad_to)
        if len(data) > codec.MAX_DATAGRAM:
            raise LimitExceeded(f"{name} request is {len(data)} bytes, over {codec.MAX_DATAGRAM}")
        self._pending[msg_id] = _Rpc(
            addr, data, name, now, then, cfg.rpc_retries if retries is None else retries, peer
        )
        self.outgoing.append((data, addr))
        if not self._first_armed:
            self._first_armed = True
            self._schedule(now + cfg.rpc_timeout, _FIRST, None)
        return msg_id

    def _on_response(self, msg: codec.Response, src: Addr, now: float) -> None:
        p = self._pending.get(msg.msg_id)
        if p is None:
            self._stats["drop:unexpected-response"] += 1
            return
        if p.addr != src:
            self._stats["drop:response-from-wrong-address"] += 1
            return
        self._forget(msg.msg_id)
        # It answered a request of ours from that address: validated.
        self.addrs.validate(src)
        if p.tries == 1:
            sample = now - p.started
            srtt = self._srtt
            if srtt is None:
                self._srtt, self._rttvar = sample, sample / 2
            else:
                self._rttvar += (abs(srtt - sample) - self._rttvar) / 4
                self._srtt = srtt + (sample - srtt) / 8
        if p.peer is not None and self._recent:
            self._recent.pop(p.peer, None)
        if p.then is None:
            self.events.append(RequestAnswered(msg.msg_id, msg.result))
        else:
            p.then(msg.result, None, now)

    def _first_tries_due(self, now: float) -> None:
        """Retry every RPC whose first try is ``rpc_timeout`` old, then wait for the next.

        First tries all wait the same time, so in the (insertion-ordered) pending table
        they fall due in order: one timer serves them all. Later tries have their own.
        """
        timeout = self.config.rpc_timeout
        due: list[bytes] = []
        next_at: float | None = None
        for msg_id, p in self._pending.items():
            if p.tries > 1:
                continue
            if p.started + timeout > now:
                next_at = p.started + timeout
                break
            due.append(msg_id)
        for msg_id in due:
            self._retry(msg_id, now)
        if next_at is not None and not self._first_armed:
            self._first_armed = True
            self._schedule(next_at, _FIRST, None)

    def _forget(self, msg_id: bytes) -> None:
        del self._pending[msg_id]
        if not self._pending:
            # A dict keeps its largest size: an idle node should not keep a join's burst.
            self._pending = {}

    def _retry(self, msg_id: bytes, now: float) -> None:
        p = self._pending.get(msg_id)
        if p is None:
            return
        cfg = self.config
        if p.tries == 1 and p.peer is not None:
            self._failed_recently(p.peer, now)
        if p.tries <= p.retries:
            p.tries += 1
            self._stats["rpc-retry"] += 1
            self.outgoing.append((p.data, p.addr))
            self._schedule(now + cfg.rpc_timeout * p.tries, _RETRY, msg_id)
            return
        self._forget(msg_id)
        self._stats["rpc-timeout"] += 1
        self.addrs.invalidate(p.addr)
        error = RpcTimeout(p.name, p.addr, now - p.started)
        self.events.append(RequestFailed(msg_id, error))
        if p.then is not None:
            p.then(None, error, now)

    def _learned(self, contact: Contact, now: float) -> None:
        """A contact answered us: add it to the table (unless we are a pure client)."""
        self.addrs.confirm(contact.addr, contact.id)
        head = self.table.add_contact(contact, now)
        if head is not None:
            self._ping_head(head, now)

    def _ping_head(self, head: Contact, now: float) -> None:
        """Ping the least-recently-seen contact of a full bucket; evict it if it fails.
        One ping per head at a time, however many newcomers wait for its place."""
        if self._closed or head.id in self._pinging:
            return
        cfg = self.config
        if (
            len(self._pinging) >= cfg.inflight_reserve // 2
            or len(self._pending) >= cfg.max_inflight
        ):
            self._stats["ping-skipped"] += 1
            return
        self._pinging[head.id] = None
        then = functools.partial(self._head_pinged, head)
        if head.dialect == DIALECT_DS:
            self._rpc(head.addr, "ds_ping", self.ds_args(), now, then, reserved=True)
        else:
            self._rpc(head.addr, "ping", [self.id], now, then, reserved=True)

    def _head_pinged(
        self, head: Contact, result: Any, error: DhtSignalError | None, now: float
    ) -> None:
        self._pinging.pop(head.id, None)
        if not self._pinging:
            self._pinging = {}
        if error is None:
            self._learned(head, now)
        else:
            # Not yet evicted: queued again (RoutingTable.failed), pinged next round.
            self.table.failed(head.id)
            if self.table.suspects and not self._live_armed:
                self._arm_liveness(now)

    # -- liveness -----------------------------------------------------------------------

    def _arm_liveness(self, now: float) -> None:
        """Schedule the next round of liveness pings: at once, unless the last round was
        less than ``liveness_interval`` ago."""
        if self._closed:
            return
        self._live_armed = True
        self._schedule(max(now, self._live_last + self.config.liveness_interval), _LIVE, None)

    def _liveness_round(self, now: float) -> None:
        """Ping up to ``liveness_pings`` questionable contacts (the oldest queued first)."""
        self._live_last = now
        table = self.table
        sus = table.suspects
        started = 0
        while sus and started < self.config.liveness_pings:
            nid = next(iter(sus))
            c = sus.pop(nid)
            if table.get(nid) is not c or table.is_good(c, now) or nid in self._pinging:
                continue
            self._ping_head(c, now)
            started += 1
        if not sus:
            table.suspects = {}  # a dict keeps its largest size
        else:
            self._arm_liveness(now)

    def _confirm_leave(self, c: Contact, now: float) -> None:
        """A contact said it leaves: one ping (``leave_confirm_retries`` retries); evict it
        unless it answers."""
        if self._closed or c.id in self._pinging:
            return
        if len(self._pending) > self.config.max_inflight // 2:
            return
        self._stats["leave-notice"] += 1
        self._pinging[c.id] = None
        then = functools.partial(self._leave_confirmed, c)
        self._rpc(
            c.addr, "ds_ping", self.ds_args(), now, then, retries=self.config.leave_confirm_retries
        )

    def _leave_confirmed(
        self, c: Contact, result: Any, error: DhtSignalError | None, now: float
    ) -> None:
        self._pinging.pop(c.id, None)
        if not self._pinging:
            self._pinging = {}
        if error is None:
            self._learned(c, now)  # still there: the notice was stale or forged
            return
        if self.table.get(c.id) is c:
            self._stats["left"] += 1
            self.table.remove(c.id)

    def _failed_recently(self, nid: bytes, now: float) -> None:
        """A lookup query to ``nid`` passed its soft timeout or went unanswered: other
        lookups avoid it for a while (until it answers)."""
        cfg = self.config
        recent = self._recent
        recent.pop(nid, None)
        recent[nid] = now + cfg.recent_failure_ttl
        while len(recent) > cfg.recent_failures_size:
            del recent[next(iter(recent))]

    def soft_timeout(self) -> float:
        """The soft per-peer timeout lookups start with now (see ``adaptive_timeouts``)."""
        cfg = self.config
        if not cfg.adaptive_timeouts or self._srtt is None:
            return cfg.peer_timeout
        rto = self._srtt + 4 * self._rttvar
        return min(cfg.peer_timeout, max(cfg.min_peer_timeout, rto))

    def avoided(self, nid: bytes, now: float) -> bool:
        """Whether lookups avoid ``nid`` now (its query went unanswered lately)."""
        until = self._recent.get(nid)
        return until is not None and until > now

    def leave(self, now: float) -> int:
        """Tell routing contacts that this node stops: one ``ds_leave`` datagram each (no
        answer awaited), to at most ``leave_notices`` of them, the closest to our ID
        first, then the most recently seen. Returns how many were queued in
        :attr:`outgoing`; the driver sends them before it closes its socket."""
        cfg = self.config
        if self._closed or cfg.client_mode or cfg.leave_notices <= 0:
            return 0
        table = self.table
        half = cfg.leave_notices // 2
        chosen: dict[bytes, Contact] = {c.id: c for c in table.closest(self.id, half)}
        for c in sorted(table.contacts(), key=lambda c: c.last_seen, reverse=True):
            if len(chosen) >= cfg.leave_notices:
                break
            chosen.setdefault(c.id, c)
        data = codec.encode_request(os.urandom(codec.MSG_ID_BYTES), "ds_leave", self.ds_args())
        sent = 0
        for c in chosen.values():
            if c.dialect == DIALECT_DS:
                self.outgoing.append((data, c.addr))
                sent += 1
        self._stats["leave-sent"] += sent
        return sent

    def _send_notify(self, listener: Addr, key: bytes, raws: list[bytes], now: float) -> None:
        if not self.addrs.is_validated(listener):
            # It stopped answering (an RPC of ours timed out) or was forgotten: no push
            # to an address that did not just prove it asks.
            self._stats["notify-unvalidated"] += 1
            self.subs.remove(key, listener)
            return
        if (
            self._closed
            or len(self._pending) >= self.config.max_inflight
            or not self._pushes.take(listener)
        ):
            self._stats["notify-skipped"] += 1
            return
        then = functools.partial(self._notified, key, listener)
        self._rpc(listener, "ds_notify", self.ds_args(key, raws), now, then, reserved=True)

    def _notified(
        self, key: bytes, listener: Addr, result: Any, error: DhtSignalError | None, now: float
    ) -> None:
        self._pushes.release(listener)
        if error is not None or result is False:
            self.subs.remove(key, listener)

    def _done(
        self,
        op_id: int,
        then: Then | None,
        kind: Callable[[int, Any], Event],
        result: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        """End an operation: call its continuation, or report it as an event."""
        if then is not None:
            then(result, error, now)
        elif error is not None:
            self.events.append(OperationFailed(op_id, error))
        else:
            self.events.append(kind(op_id, result))

    def _new_op(self) -> int:
        self._next_op += 1
        return self._next_op

    # -- ping & bootstrap ---------------------------------------------------------------

    def start_ping(self, addr: Addr, now: float, then: Then | None = None) -> int:
        """Ping ``addr`` with our RPC and add it as a contact; ends as
        :class:`PingAnswered` (its routing ID) or :class:`OperationFailed`.

        :raises LimitExceeded: too many RPCs outstanding.
        """
        op_id = self._new_op()
        self._rpc(
            addr, "ds_ping", self.ds_args(), now, functools.partial(self._pinged, op_id, addr, then)
        )
        return op_id

    def _pinged(
        self,
        op_id: int,
        addr: Addr,
        then: Then | None,
        reply: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        parsed = None if error is not None else ping_reply(reply)
        if parsed is None:
            if (
                error is None
                and type(reply) is list
                and len(reply) == 2
                and reply[0] == WRONG_NETWORK
                and type(reply[1]) is str
            ):
                error = WrongNetwork(addr, reply[1][:64], self.config.network)
                if len(self.other_networks) < 16 or addr in self.other_networks:
                    self.other_networks[addr] = error
            if error is None:
                error = RpcTimeout("ds_ping (bad reply)", addr, 0.0)
            self._done(op_id, then, PingAnswered, None, error, now)
            return
        nid, seen = parsed
        self.other_networks.pop(addr, None)
        if seen is not None:
            self.observed[seen] += 1
        self._learned(Contact(nid, addr[0], addr[1], DIALECT_DS), now)
        self._done(op_id, then, PingAnswered, nid, None, now)

    def start_bootstrap(self, addrs: Iterable[Addr], now: float, then: Then | None = None) -> int:
        """Join through ``addrs`` (IP addresses): ping each, then look up our own ID.
        Ends as :class:`Bootstrapped` with the routing table's size."""
        op_id = self._new_op()
        targets = list(addrs)
        if targets:
            self._boot_addrs = targets
        gather = _Gather(len(targets) + 1)  # one more: released after the loop
        step = functools.partial(self._boot_pinged, op_id, gather, then)
        for a in targets:
            try:
                self.start_ping(a, now, step)
            except DhtSignalError as exc:
                step(None, exc, now)
        step(None, UsageError("end of list"), now)
        return op_id

    def _boot_pinged(
        self,
        op_id: int,
        gather: _Gather,
        then: Then | None,
        nid: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        gather.left -= 1
        if error is None:
            gather.ok += 1
        if gather.left:
            return
        if gather.ok == 0 and len(self.table) == 0:
            self._arm_rejoin(now)
            self._done(op_id, then, Bootstrapped, 0, None, now)
            return
        self.start_lookup(
            self.id,
            now,
            remember=False,
            then=functools.partial(self._boot_looked, op_id, then),
            join_first=False,
        )

    def _boot_looked(
        self, op_id: int, then: Then | None, res: Any, error: DhtSignalError | None, now: float
    ) -> None:
        cfg = self.config
        if len(self.table) == 0:
            self._arm_rejoin(now)
        else:
            self._rejoin_wait = 0.0
        if error is None and not cfg.client_mode and cfg.join_fill_below > 0:
            # At a random moment in the second half of join_fill_delay: the nodes that
            # joined with us are then known, and the fills do not add to the join's burst.
            wait = cfg.join_fill_delay * (1 + self.randbytes(1)[0] / 255) / 2
            self._schedule(now + wait, _FILL, None)
        if error is None and not cfg.client_mode and cfg.join_refreshes > 0:
            # Later, at a random moment: in a mass join every table is nearly empty at
            # first, and a burst of refreshes from every newcomer at once only loads it.
            spread = cfg.join_refresh_delay * (1 + self.randbytes(1)[0] / 255) / 2
            self._schedule(now + spread, _JOINED, None)
        self._done(op_id, then, Bootstrapped, len(self.table), error, now)

    def why_unanswered(self, addrs: Iterable[Addr] | None = None) -> str:
        """``"; ADDR serves network 'x', not 'y' (...)"`` for each of ``addrs`` (default:
        every address) that answered our ping saying so; empty if none did."""
        known = self.other_networks
        return "".join(f"; {known[a]}" for a in (known if addrs is None else addrs) if a in known)

    def all_other_network(self, addrs: Iterable[Addr] | None = None) -> WrongNetwork | None:
        """If every one of ``addrs`` (default: the last bootstrap addresses, else every
        address pinged) answered our ping that it serves another network: the first such
        answer, as an error."""
        known = self.other_networks
        targets = list(addrs if addrs is not None else self._boot_addrs or known)
        if targets and all(a in known for a in targets):
            return known[targets[0]]
        return None

    def _arm_rejoin(self, now: float) -> None:
        """The table is empty: join again through the last bootstrap addresses after
        ``rejoin_delay``, doubled after each try that found nobody up to ``rejoin_max``,
        at a random moment in the second half of it (a crowd that joined at once and
        found its bootstrap node overwhelmed does not come back at once)."""
        cfg = self.config
        if self._rejoin_armed or not self._boot_addrs or cfg.rejoin_delay <= 0:
            return
        wait = self._rejoin_wait
        wait = min(cfg.rejoin_max, wait * 2) if wait else cfg.rejoin_delay
        self._rejoin_wait = wait
        self._rejoin_armed = True
        self._schedule(now + wait * (1 + self.randbytes(1)[0] / 255) / 2, _REJOIN, None)

    def _rejoin(self, now: float) -> None:
        if len(self.table):
            self._rejoin_armed = False
            self._rejoin_wait = 0.0
            return
        if self._join_waiters is not None:
            self._rejoin_armed = False
            return  # a join is under way (for a lookup); if it fails it arms the next
        self._stats["rejoin"] += 1
        # Still armed while this join runs: maintenance must not arm another meanwhile;
        # when it ends, the next wait counts from then.
        self.start_bootstrap(self._boot_addrs, now, then=self._rejoined)

    def _rejoined(self, result: Any, error: DhtSignalError | None, now: float) -> None:
        self._rejoin_armed = False
        if not len(self.table):
            self._arm_rejoin(now)

    def _after_join(self, start: Callable[[float], None], now: float) -> None:
        """Run ``start`` once the table holds a contact again: the table is empty, and a
        lookup from it would find nothing. Join through the last bootstrap addresses,
        again and again (a pause of 0.25-0.5 s between tries) for up to
        ``join_first_wait`` seconds, then run ``start`` whatever came of it. Lookups
        arriving meanwhile wait for the same joins."""
        if self._join_waiters is not None:
            self._join_waiters.append(start)
            return
        self._join_waiters = [start]
        self._stats["rejoin:lookup"] += 1
        self.start_bootstrap(self._boot_addrs, now, then=functools.partial(self._joined, now))

    def _joined(self, began: float, result: Any, error: DhtSignalError | None, now: float) -> None:
        self._stats["rejoin"] += 1
        if not len(self.table) and now - began < self.config.join_first_wait and not self._closed:
            pause = 0.25 * (1 + self.randbytes(1)[0] / 255)
            self._schedule(now + pause, _JOIN_FIRST, began)
            return
        waiters, self._join_waiters = self._join_waiters or [], None
        for w in waiters:
            w(now)

    def _fill_after_join(self, now: float) -> None:
        """Shortly after a join's self-lookup: one small lookup (``join_fill_k`` closest)
        of a random ID at each distance where the table knows fewer than
        ``join_fill_below`` contacts (:mod:`~dhtsignal.dht.join`)."""
        cfg = self.config
        own = self.table.own_long
        near = self.table.closest(self.id, 1)
        if not near:
            return
        lowest = (near[0].long_id ^ own).bit_length() - 1
        known = (c.long_id for c in self.table.contacts())
        for bit in join.sparse_distances(own, known, lowest, cfg.join_fill_below):
            if len(self._lookups) >= cfg.max_refresh_lookups:
                break
            self._stats["join-fill"] += 1
            target = join.target_at(own, bit, self.randbytes)
            self.start_lookup(target, now, k=cfg.join_fill_k, remember=False, then=ignore)

    def _refresh_after_join(self, now: float) -> None:
        """After a join's self-lookup, refresh every bucket farther than our closest
        neighbour (paper section 2.3): a lookup of a random ID at each distance 2**i from
        ours, from the farthest half of the ID space down to our closest neighbour's
        distance, at most ``join_refreshes`` of them. Our table's far buckets fill, and
        the nodes there learn us. (The table's own buckets cannot be the guide: a new
        table is one bucket until it fills.)"""
        cfg = self.config
        own = self.table.own_long
        near = self.table.closest(self.id, 1)
        if not near:
            return
        lowest = (near[0].long_id ^ own).bit_length() - 1  # our neighbour's distance bit
        for bit in range(159, lowest, -1)[: cfg.join_refreshes]:
            if len(self._lookups) >= cfg.max_refresh_lookups:
                break
            low = int.from_bytes(self.randbytes(20), "big") & ((1 << bit) - 1)
            target = ((own ^ (1 << bit)) >> bit << bit) | low
            self.start_lookup(target.to_bytes(20, "big"), now, remember=False, then=ignore)

    def _random_in(self, lo: int, hi: int) -> bytes:
        return (lo + int.from_bytes(self.randbytes(20), "big") % (hi - lo + 1)).to_bytes(20, "big")

    # -- lookups ------------------------------------------------------------------------

    def start_lookup(
        self,
        key: bytes,
        now: float,
        *,
        k: int | None = None,
        want_value: bool = False,
        remember: bool = True,
        store: list[bytes] | None = None,
        then: Then | None = None,
        join_first: bool = True,
    ) -> int:
        """Start an iterative lookup; it ends as :class:`LookupFinished`.

        With an empty routing table (a join found nobody, or every contact was lost),
        the node first joins again through its last bootstrap addresses, then starts
        the lookup from what that join found.

        :param key: the 20-byte target.
        :param now: monotonic time, seconds.
        :param k: result size (default ``ksize``).
        :param want_value: collect records (``ds_find_value``).
        :param remember: keep the result for ``lookup_cache_ttl`` to start the next
            lookup of ``key`` from (put/get/listen; not table refreshes).
        :param store: records every node asked stores on the way (``ds_store_find``; the
            lookup only ever asks nodes among the k closest it knows at the time).
        :param then: continuation instead of an event (the node's own use).
        :param join_first: join again first if the table is empty (the join's own
            self-lookup does not).
        :returns: the operation id.
        """
        op_id = self._new_op()
        args = (op_id, key, k, want_value, remember, store, then)
        rejoins = self.config.rejoin_delay > 0 and self._boot_addrs and not self._closed
        if join_first and rejoins and not len(self.table):
            self._after_join(functools.partial(self._begin_lookup, *args), now)
        else:
            self._begin_lookup(*args, now)
        return op_id

    def _begin_lookup(
        self,
        op_id: int,
        key: bytes,
        k: int | None,
        want_value: bool,
        remember: bool,
        store: list[bytes] | None,
        then: Then | None,
        now: float,
    ) -> None:
        if self._closed:
            return
        cfg = self.config
        k = k or cfg.ksize
        cached = self._lookup_cache.get(key)
        if cached is not None and cached[0] > now:
            initial, warm = cached[1], True
        else:
            initial, warm = self.table.closest(key, max(k, cfg.ksize)), False
        if self._recent or any(c.failures for c in initial):
            # Contacts that just failed (a query of another lookup, or RPCs since they
            # last answered) only if nothing else is known.
            fresh = [c for c in initial if not c.failures and not self.avoided(c.id, now)]
            initial = fresh or initial
        soft = self.soft_timeout()
        strict = want_value or store is not None
        lk = Lookup(
            key,
            initial,
            k=k,
            alpha=k if warm else cfg.alpha,
            peer_timeout=soft,
            own_id=self.id,
            group=_diversity(cfg),
            max_per_group=cfg.max_per_prefix,
            # A get that has no record yet waits the whole strict_wait for a slow peer
            # among the k closest (a loaded holder must not turn into "unknown"); once
            # records arrive it waits as a put does, 3 soft timeouts at most.
            strict_wait=(cfg.strict_wait if want_value else min(cfg.strict_wait, 3 * soft))
            if strict
            else 0.0,
        )
        op = _LookupOp(op_id, key, lk, want_value, remember, store, then)
        self._lookups[op_id] = op
        self._drive(op, now)

    def _drive(self, op: _LookupOp, now: float) -> None:
        if op.done:
            return
        lk = op.lk
        for _ in range(1_000_000):  # bounded: each Query step marks candidates in flight
            step = lk.next(now)
            if lk.overdue:
                # Past the soft timeout: other lookups avoid it until it answers (a dead
                # contact would otherwise cost every lookup of the next rpc_timeout its
                # own soft timeout), or for recent_failure_ttl.
                for c in lk.overdue:
                    self._failed_recently(c.id, now)
                lk.overdue.clear()
            if type(step) is Query:
                for c in step.contacts:
                    try:
                        self._query(op, c, now)
                    except DhtSignalError as exc:
                        op.done = True
                        self._drop_lookup(op)
                        self._done(op.op_id, op.then, LookupFinished, None, exc, now)
                        return
                until = step.until
                if until is None:
                    continue  # the machine cannot tell what comes next: ask it
                # The Wait the machine would answer now (see Query.until).
            elif type(step) is Finished:
                op.done = True
                op.step = step
                if op.pages == 0:
                    self._finish_lookup(op, now)
                return
            else:
                assert type(step) is Wait
                until = step.until
            if until is not None and until != op.timer_at:
                op.timer_at = until
                self._schedule(until, _LOOKUP, op)
            return

    def _query(self, op: _LookupOp, c: Contact, now: float) -> None:
        then = functools.partial(self._answered, op, c)
        cid = c.id
        if c.dialect == DIALECT_STOCK:
            self._rpc(c.addr, "find_node", [self.id, op.key], now, then, peer=cid)
        elif op.store is not None:
            args = self.ds_args(op.key, op.store)
            self._rpc(c.addr, "ds_store_find", args, now, then, peer=cid, pad=True)
        elif op.want_value:
            args = self.ds_args(op.key, 0)
            self._rpc(c.addr, "ds_find_value", args, now, then, peer=cid, pad=True)
        else:
            self._rpc(c.addr, "ds_find_node", self.ds_args(op.key), now, then, peer=cid, pad=True)

    def _answered(
        self, op: _LookupOp, c: Contact, reply: Any, error: DhtSignalError | None, now: float
    ) -> None:
        # Late answers (after the lookup finished) still update the routing table.
        if error is not None:
            self.table.failed(c.id)
            op.lk.on_failure(c)
            self._answer_taken(op, now)
            return
        if op.done:
            self._learned(c, now)
            return
        if op.store is not None and c.dialect == DIALECT_DS:
            if type(reply) is not list or len(reply) != 2:
                reply = None
            else:
                op.stored[c.id], reply = reply
        closer = self._absorb(op, c, reply, now)
        if closer is None:
            self._stats["drop:bad-reply"] += 1
            op.lk.on_failure(c)
        else:
            self._learned(c, now)
            op.lk.on_success(c, closer)
        self._answer_taken(op, now)

    def _answer_taken(self, op: _LookupOp, now: float) -> None:
        """A lookup's machine took an answer: drive it now, or after the batch."""
        if not self.batch_lookups:
            self._drive(op, now)
        elif not op.dirty and not op.done:
            op.dirty = True
            self._dirty.append(op)

    def _absorb(self, op: _LookupOp, c: Contact, reply: Any, now: float) -> list[Contact] | None:
        """Parse a find reply; collect records; returns the closer contacts or None.

        Contacts the lookup would ignore (known, or too far to be kept) are not parsed."""
        items: Any = reply
        if op.want_value and c.dialect == DIALECT_DS:
            parsed = value_page(reply)
            if parsed is None:
                return None
            items, page, nxt = parsed
            collect_records(op.found, page, c.id)
            if page and op.lk.strict_wait:
                op.holders += 1
                if op.holders == 1:
                    op.lk.strict_wait = max(
                        op.lk.peer_timeout, min(op.lk.strict_wait, 3 * op.lk.peer_timeout)
                    )
                if op.holders >= max(1, self.config.replicas // 2):
                    # Enough storing nodes answered with records: a slow one among the
                    # k closest no longer holds the get up past the soft timeout, and
                    # with get_ends_at_quorum a plain get ends now. A read of a node ID
                    # (k = name_replicas) counts every storing node's support: it
                    # does not end early (a few Sybils near the key must not be enough).
                    op.lk.strict_wait = 0.0
                    if self.config.get_ends_at_quorum and op.lk.k <= self.config.replicas:
                        op.lk.end()
            # nxt 0: the first page was cut to nothing (our address not validated there
            # yet): ask for it again (validated by then, or cut again and given up).
            if nxt is not None and (nxt > 0 or not page) and op.chains < self.config.max_pages:
                op.chains += 1
                op.pages += 1
                self._fetch_page(op, c, nxt, 1, now)
        if type(items) is not list:
            return None
        closer = closer_contacts(op.lk, items, self.config.ksize * 2)
        if self._recent and closer:
            closer = [x for x in closer if not self.avoided(x.id, now)]
        return closer

    def _fetch_page(self, op: _LookupOp, c: Contact, cursor: int, n: int, now: float) -> None:
        """Ask ``c`` for the records page at ``cursor`` (the ``n``-th of its chain)."""
        then = functools.partial(self._page_answered, op, c, cursor, n)
        try:
            self._rpc(c.addr, "ds_find_value", self.ds_args(op.key, cursor), now, then, pad=True)
        except DhtSignalError:
            self._stats["task-error"] += 1
            self._page_chain_ended(op, now)

    def _page_answered(
        self,
        op: _LookupOp,
        c: Contact,
        cursor: int,
        n: int,
        reply: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        if error is None:
            parsed = value_page(reply)
            if parsed is not None:
                collect_records(op.found, parsed[1], c.id)
                nxt = parsed[2]
                if nxt is not None and nxt > cursor and n < self.config.max_pages:
                    self._fetch_page(op, c, nxt, n + 1, now)
                    return
        self._page_chain_ended(op, now)

    def _page_chain_ended(self, op: _LookupOp, now: float) -> None:
        op.pages -= 1
        if op.pages == 0 and op.step is not None and op.op_id in self._lookups:
            self._finish_lookup(op, now)

    def _drop_lookup(self, op: _LookupOp) -> None:
        self._lookups.pop(op.op_id, None)
        if not self._lookups:
            self._lookups = {}  # a dict keeps its largest size: an idle node keeps no burst

    def _finish_lookup(self, op: _LookupOp, now: float) -> None:
        self._drop_lookup(op)
        step = op.step
        assert step is not None
        cfg = self.config
        if step.closest and op.remember:
            cache = self._lookup_cache
            cache.pop(op.key, None)
            # The table's own objects where it has them: no second copy of a contact.
            cache[op.key] = (
                now + cfg.lookup_cache_ttl,
                [self.table.get(c.id) or c for c in step.closest],
            )
            while len(cache) > cfg.lookup_cache_size:
                del cache[next(iter(cache))]
        recs = self._verify(list(op.found)) if op.want_value else []
        res = LookupResult(step.closest, step.hops, step.queried, recs, op.found, op.stored)
        self._done(op.op_id, op.then, LookupFinished, res, None, now)

    def _verify(self, raws: list[bytes]) -> list[Record]:
        return records.checked(
            raws, self.wallclock(), self._stats, "refused-read:", network=self.config.network
        )

    # -- put / get ----------------------------------------------------------------------

    def _stores_locally(self, key: bytes, closest: list[Contact]) -> bool:
        if self.config.client_mode:
            return False
        if len(closest) < self.config.replicas:
            return True
        k = int.from_bytes(key, "big")
        return (self.table.own_long ^ k) < (closest[-1].long_id ^ k)

    def start_put(self, recs: list[Record], now: float, then: Then | None = None) -> int:
        """Store records (all under one key) on the nodes closest to it; ends as
        :class:`RecordsStored` or :class:`OperationFailed` with
        :class:`~dhtsignal.errors.PutFailed` (``NodeIdTaken`` when that was why,
        ``StoreLimitExceeded`` when a storage limit was).

        :raises UsageError: records under different keys, or too many at once.
        """
        if not recs or len({r.key for r in recs}) != 1 or len(recs) > MAX_STORE_BATCH:
            raise UsageError(f"put takes 1 to {MAX_STORE_BATCH} records under one key")
        op_id = self._new_op()
        # Each node the lookup asks stores the records as it answers (ds_store_find): the
        # k closest hold them when it ends; nodes it asked early that turned out farther
        # keep a spare copy until it expires.
        self.start_lookup(
            recs[0].key,
            now,
            k=replicas_for(self.config, recs),
            store=[r.raw for r in recs],
            then=functools.partial(self._put_looked_up, op_id, recs, then),
        )
        return op_id

    def _put_looked_up(
        self,
        op_id: int,
        recs: list[Record],
        then: Then | None,
        res: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        if error is not None:
            self._done(op_id, then, RecordsStored, None, error, now)
            return
        try:
            result = self._put_outcome(recs, res, now)
        except DhtSignalError as exc:  # PutFailed, NodeIdTaken
            self._done(op_id, then, RecordsStored, None, exc, now)
            return
        self._done(op_id, then, RecordsStored, result, None, now)

    def _put_outcome(self, recs: list[Record], res: LookupResult, now: float) -> PutResult:
        """Store our own copy if we are among the closest, then apply the put-result
        policy (:func:`~dhtsignal.dht.putpolicy.put_result`)."""
        key = recs[0].key
        if not res.closest and self._boot_addrs and self.config.rejoin_delay > 0:
            # Meant to be in a network, and no node of it answered: a copy in our own
            # store only would look stored and be found by nobody else.
            raise PutFailed(
                "no other node answered: not joined (no bootstrap node answered: "
                f"{show_addrs(self._boot_addrs[:3])}{self.why_unanswered(self._boot_addrs)})"
            )
        refused: Counter[str] = Counter()
        stored = 0
        if self._stores_locally(key, res.closest):
            wall = self.wallclock()
            local_ok = True
            for r in recs:
                try:
                    fresh = self.store.put(r, self.address or ("", 0), wall)
                except RecordRejected as exc:
                    refused[exc.reason] += 1
                    local_ok = False
                    continue
                if fresh:
                    for listener in self.subs.listeners(key, wall):
                        self._send_notify(listener, key, [r.raw], now)
            # Our own copy proves nothing about a node-ID claim: only others' acceptance does.
            if not any(r.type in (RecordType.CLAIM, RecordType.PRESENCE) for r in recs):
                stored += local_ok
        replies = [res.stored.get(c.id) for c in res.closest if c.dialect == DIALECT_DS]
        spare = len(res.stored) - len(replies)
        if spare > 0:
            self._stats["put:spare-copies"] += spare
        return put_result(replies, res.hops, stored=stored, refused=refused)

    def start_get(
        self,
        key: bytes,
        now: float,
        *,
        include_tombstones: bool = False,
        then: Then | None = None,
        k: int | None = None,
    ) -> int:
        """All live records under ``key`` from the nodes closest to it, verified and
        merged, with our own; ends as :class:`RecordsFound`. The support of each signer
        is the number of distinct storing nodes whose answers held a live (not
        tombstoned) record of theirs; our own store counts as one.

        :param k: storing nodes to read (default ``replicas``; ``name_replicas`` for a
            node ID's key)."""
        op_id = self._new_op()
        self.start_lookup(
            key,
            now,
            k=k or self.config.replicas,
            want_value=True,
            then=functools.partial(self._got, op_id, key, include_tombstones, then),
        )
        return op_id

    def _got(
        self,
        op_id: int,
        key: bytes,
        include_tombstones: bool,
        then: Then | None,
        res: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        if error is not None:
            self._done(op_id, then, RecordsFound, None, error, now)
            return
        merged = list(res.records)
        holders: dict[bytes, set[bytes]] = {}
        # Support counts only the storing nodes of the result (one per prefix under the
        # diversity limit), not others the lookup asked on the way.
        closest = {c.id for c in res.closest}
        for r in res.records:
            if not r.is_tombstone:
                ids = closest.intersection(res.held_by.get(r.raw, ()))
                holders.setdefault(r.signer, set()).update(ids)
        if not self.config.client_mode:
            mine = self.store.get(key, self.wallclock())
            merged.extend(mine)
            for r in mine:
                if not r.is_tombstone:
                    holders.setdefault(r.signer, set()).add(self.id)
        out = records.newest(merged)
        if not include_tombstones:
            out = [r for r in out if not r.is_tombstone]
        held = HeldRecords(out, {signer: len(ids) for signer, ids in holders.items()})
        self._done(op_id, then, RecordsFound, held, None, now)

    # -- listen -------------------------------------------------------------------------

    def listen(self, key: bytes, now: float) -> None:
        """One more listener on ``key``: the first starts the subscription cycle
        (:mod:`~dhtsignal.dht.listen`). Records arrive as :class:`RecordsReceived`; each
        (re)subscription reports a :class:`SubscriptionRenewed`."""
        self._listens.listen(key, now)

    def unlisten(self, key: bytes, now: float) -> None:
        """One listener fewer on ``key``; the last one leaving unsubscribes (no answer
        awaited)."""
        self._listens.unlisten(key, now)

    def pushed_by(self, rec: Record) -> Addr | None:
        """The address that pushed ``rec`` to us, if recent (see :class:`Listening`)."""
        return self._listens.pushed_by(rec)

    def listening(self, key: bytes) -> int:
        """How many listeners ``key`` has."""
        return self._listens.listening(key)

    # -- maintenance & persistence ------------------------------------------------------

    def _maintain(self, now: float) -> None:
        cfg = self.config
        wall = self.wallclock()
        self.store.expire(wall)
        self.legacy.expire(wall)
        self.subs.expire(wall)
        self.rate.prune(now)
        cache = self._lookup_cache
        for key in [k for k, (until, _) in cache.items() if until <= now]:
            del cache[key]
        if not cache:
            self._lookup_cache = {}
        for lo, hi in self.table.stale_buckets(now, cfg.refresh_interval)[:4]:
            if len(self.table) and len(self._lookups) < cfg.max_refresh_lookups:
                self.start_lookup(self._random_in(lo, hi), now, remember=False, then=ignore)
        recent = self._recent
        for nid in [n for n, until in recent.items() if until <= now]:
            del recent[nid]
        if not recent:
            self._recent = {}
        # Contacts not heard from within good_for: ping them before handing them out.
        budget = max(1, int(cfg.liveness_pings * cfg.maintenance_interval / cfg.liveness_interval))
        for c in self.table.questionable(now, min(budget, cfg.max_suspects)):
            if c.id not in self._pinging:
                self.table.suspect(c)
        if self.table.suspects and not self._live_armed:
            self._arm_liveness(now)
        if len(self.table) == 0:
            self._arm_rejoin(now)
        self._schedule(now + cfg.maintenance_interval, _MAINT, None)

    def snapshot(self) -> dict[str, Any]:
        """The persistent state as plain data: contacts, stored records, plain values."""
        wall = self.wallclock()
        return {
            "v": 1,
            "id": self.id,
            "contacts": [c.wire() for c in self.table.contacts()],
            "records": [[raw, [src[0], src[1]]] for raw, src in self.store.dump(wall)],
            "legacy": [[k, v, exp] for k, v, exp in self.legacy.dump(wall)],
        }

    def restore(self, state: Any, now: float, source: str = "state") -> int:
        """Restore what :meth:`snapshot` returned; returns how many records were restored.

        Records are verified again; expired ones are dropped; entries of the wrong shape
        (a flipped bit, a hand edit) are skipped and counted (``state:bad-entry``).

        :param state: the snapshot.
        :param now: monotonic time, seconds (contacts' last-seen time).
        :param source: what the state came from, for error messages.
        :raises UsageError: the state as a whole is not a snapshot.
        """
        if not isinstance(state, dict) or state.get("v") != 1:
            raise UsageError(f"{source} has an unknown format")

        def section(name: str) -> list[Any]:
            items = state.get(name, [])
            if type(items) is not list:
                raise UsageError(f"{source}: {name!r} is not a list")
            return items

        contacts, saved, legacy = section("contacts"), section("records"), section("legacy")
        for item in contacts:
            c = parse_contact(item)
            if c is None:
                self._stats["state:bad-entry"] += 1
                continue
            self.table.add_contact(c, now)
            known = self.table.get(c.id)
            if known is not None:
                # Heard from at some unknown time: questionable until it answers a ping.
                known.last_seen = float("-inf")
        for c in self.table.questionable(now, self.config.max_suspects):
            self.table.suspect(c)
        if self.table.suspects and not self._live_armed:
            self._arm_liveness(now)
        wall = self.wallclock()
        good = []
        for item in saved:
            if not shaped(item, [bytes, [str, int]]):
                self._stats["state:bad-entry"] += 1
                continue
            good.append(item)
        restored = 0
        for rec, (_, (host, port)) in zip(
            records.check_all([item[0] for item in good], wall, network=self.config.network),
            good,
            strict=True,
        ):
            if type(rec) is not Record:
                continue
            try:
                self.store.put(rec, (host, port), wall)
            except RecordRejected:
                continue
            restored += 1
        for item in legacy:
            # [key, value, expires]; files written before expiry was kept have [key, value].
            if type(item) is not list or len(item) not in (2, 3):
                self._stats["state:bad-entry"] += 1
                continue
            expires = item[2] if len(item) == 3 and type(item[2]) in (int, float) else None
            if expires is not None and expires <= wall:
                continue
            try:
                self.legacy.put(item[0], item[1], wall, expires)
            except RecordRejected:
                self._stats["state:bad-entry"] += 1
        return restored
