"""A DHT node on an asyncio datagram transport.

Theory of operation
-------------------
:class:`DhtNode` is the only DHT class that owns a socket, timers and tasks. It
is an ``asyncio.DatagramProtocol``: the same object runs on a real UDP socket
(:meth:`DhtNode.listen_udp`) and inside :mod:`dhtsignal.testing.simnet`, where a
virtual-clock event loop delivers datagrams in memory.

Receive path: every datagram goes through :meth:`datagram_received`, which
decodes (:mod:`dhtsignal.wire.codec`), rate-limits per source, and hands requests
to the I/O-free :class:`~dhtsignal.dht.rpc.RequestHandler`, sending its reply in
the same call (no task per request). Responses resolve the future of the
matching outstanding request. Nothing raises out of the handler: every refusal
is counted in :attr:`stats` by reason and logged at debug level. On asyncio's
selector loops the node reads its socket itself, a batch of datagrams per
readiness event. A request from a contact waiting for a full bucket's place
makes the node ping that bucket's head, at most one ping per head at a time.
Per-source rate-limiter entries are dropped once their bucket has refilled, so
an idle node keeps none.

Client path: :meth:`request` sends an RPC and returns a future; a timer resends
it ``rpc_retries`` times before failing it with :class:`RpcTimeout`. Lookups are
:class:`~dhtsignal.dht.lookup.Lookup` state machines driven by
:meth:`_run_lookup`. ``put``/``get``/``listen`` build on lookups.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhtsignal.datadir import STATE_FILE, atomic_write, ensure_dir
from dhtsignal.dht import records
from dhtsignal.dht.lookup import Finished, Lookup, Query
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.dht.routing import DIALECT_DS, DIALECT_STOCK, Contact, RoutingTable
from dhtsignal.dht.rpc import FLAG_CLIENT, MAX_STORE_BATCH, RequestHandler, parse_contact
from dhtsignal.dht.storage import LegacyStore, RecordStore, Subscriptions
from dhtsignal.errors import (
    ConfigError,
    DhtSignalError,
    LimitExceeded,
    NodeIdTaken,
    PutFailed,
    RecordRejected,
    RpcTimeout,
    StoreLimitExceeded,
    UsageError,
)
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, show_addr

log = logging.getLogger(__name__)

#: Refusal reasons of storing nodes that mean "a limit is used up", and what they mean.
STORE_LIMITS = {
    "quota": "the storing nodes' quota for this source address (records or bytes, "
    "StorageLimits.max_records_per_source / max_bytes_per_source)",
    "key-full": "the values-per-key cap of the storing nodes (StorageLimits.max_values_per_key)",
    "store-full": "the storing nodes' total capacity (StorageLimits.max_keys / max_bytes)",
}

_MAX_RATE_ENTRIES = 10_000
_MAX_PAGES = 16
#: Datagrams read per readiness event of the socket (one event loop callback).
_READ_BATCH = 64
#: Bytes read per datagram: anything over codec.MAX_DATAGRAM is refused anyway.
_RECV_BYTES = 2048


@dataclass(frozen=True, slots=True)
class LookupResult:
    """Outcome of an iterative lookup."""

    closest: list[Contact]
    hops: int
    queried: int
    records: list[Record] = field(default_factory=list)
    #: for each record's raw bytes, the IDs of the nodes whose answers held it
    held_by: dict[bytes, set[bytes]] = field(default_factory=dict)
    #: a storing lookup's store results, per ID of the node that answered
    stored: dict[bytes, Any] = field(default_factory=dict)


def _shaped(value: Any, shape: list[Any]) -> bool:
    """Whether ``value`` is a list matching ``shape``: a list of types and nested shapes."""
    if type(value) is not list or len(value) != len(shape):
        return False
    return all(
        _shaped(v, t) if type(t) is list else type(v) is t
        for v, t in zip(value, shape, strict=True)
    )


@dataclass(frozen=True, slots=True)
class HeldRecords:
    """What :meth:`DhtNode.get_held` found: the merged records, and how many distinct
    storing nodes answered with at least one live record of each signer."""

    records: list[Record]
    support: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class PutResult:
    """How a ``put`` went: storing nodes that accepted, and refusals by reason."""

    stored: int
    refused: dict[str, int]
    hops: int


def routing_id(public_key: bytes) -> bytes:
    """A node's 20-byte routing ID, derived from its identity key (stable across restarts)."""
    return hashlib.sha256(b"dhtsignal/routing/" + public_key).digest()[:20]


class _Pending:
    """One outstanding RPC. Its first try has no timer of its own (see
    :meth:`DhtNode._first_tries_due`); ``timer`` is the timer of a later try."""

    __slots__ = ("addr", "data", "future", "name", "started", "timer", "tries")

    def __init__(
        self, future: asyncio.Future[Any], data: bytes, addr: Addr, name: str, started: float
    ) -> None:
        self.future = future
        self.data = data
        self.addr = addr
        self.name = name
        self.tries = 1
        self.timer: asyncio.TimerHandle | None = None
        self.started = started


class _SocketTransport(asyncio.DatagramTransport):
    """The node's own UDP transport: reads a batch of datagrams per readiness event
    and sends without a write buffer (a datagram the kernel will not take at once is
    dropped and counted, as the network may drop it anyway; RPCs retry)."""

    def __init__(self, node: DhtNode, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._node = node
        self._sock = sock
        self._loop = loop
        self._closing = False

    def read_ready(self) -> None:
        recv = self._sock.recvfrom
        received = self._node.datagram_received
        for _ in range(_READ_BATCH):
            try:
                data, addr = recv(_RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._node.error_received(exc)
                return
            received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._node._stats["drop:send-buffer-full"] += 1
        except OSError as exc:
            self._node.error_received(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._node.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


def ignore_outcome(fut: asyncio.Future[Any]) -> None:
    """Done-callback that reads a future's exception so asyncio never logs it as unhandled."""
    if not fut.cancelled():
        fut.exception()


def _wake_up(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class DhtNode(asyncio.DatagramProtocol):
    """One DHT node.

    :param node_id: 20-byte routing ID (see :func:`routing_id`).
    :param config: protocol parameters.
    :param wallclock: wall-clock UNIX time (record expiry); the simulator passes a virtual one.
    """

    def __init__(
        self,
        node_id: bytes,
        config: NodeConfig | None = None,
        *,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.config = cfg = config or NodeConfig()
        self.id = node_id
        self.wallclock = wallclock
        self.table = RoutingTable(node_id, cfg.ksize, cfg.max_failures, cfg.replacements)
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
        self.handler.on_notify = self._on_notify
        self._stats: Counter[str] = self.handler._stats
        self.transport: asyncio.DatagramTransport | None = None
        self.address: Addr | None = None
        self.observed: Counter[Addr] = Counter()
        self._flags = FLAG_CLIENT if cfg.client_mode else 0
        self._pending: dict[bytes, _Pending] = {}
        self._rate: dict[Addr, list[float]] = {}
        self._pinging: dict[bytes, None] = {}
        self._listeners: dict[bytes, list[asyncio.Queue[Record]]] = {}
        #: per listened key, the storing nodes that accepted our last subscription
        self._subscribed_at: dict[bytes, list[Addr]] = {}
        self._lookup_cache: dict[bytes, tuple[float, list[Contact]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._maint: asyncio.TimerHandle | None = None
        self._first_timer: asyncio.Handle | None = None
        self._first_at = 0.0

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """This module's logger, prefixed with the node (made on first use)."""
        return logging.LoggerAdapter(log, {"node": self.id.hex()[:8]})

    @property
    def stats(self) -> Counter[str]:
        """Counters by reason: requests answered (``rpc:NAME``), refusals (``drop:REASON``,
        ``refused:REASON``), retries and timeouts."""
        return self.handler.stats

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop."""
        return asyncio.get_running_loop()

    async def listen_udp(self, host: str = "127.0.0.1", port: int = 0) -> Addr:
        """Bind a UDP socket and start serving; returns the bound address.

        On asyncio's selector loops the node reads the socket itself, up to
        :data:`_READ_BATCH` datagrams per readiness event (their transport reads one per
        loop iteration); elsewhere it uses the loop's own datagram transport (uvloop's
        already reads in batches, in C, and measured faster than reading from Python).

        :raises ConfigError: the address does not resolve or cannot be bound (names the
            ``listen`` setting).
        """
        loop = self.loop
        shown = show_addr((host, port))
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConfigError(
                "listen", f"cannot listen on {shown}: {exc.strerror or exc}"
            ) from None
        if not infos:
            raise ConfigError("listen", f"cannot listen on {shown}: no address")
        error: OSError | None = None
        for family, _, proto, _, sockaddr in infos:  # the first address that binds
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
            try:
                sock.setblocking(False)
                sock.bind(sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            break
        else:
            assert error is not None
            reason = error.strerror or str(error)
            raise ConfigError("listen", f"cannot listen on {shown}: {reason}") from None
        try:
            if isinstance(loop, asyncio.SelectorEventLoop):
                transport = _SocketTransport(self, sock, loop)
                loop.add_reader(sock.fileno(), transport.read_ready)
                self.connection_made(transport)
            else:
                await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        assert self.address is not None
        return self.address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("sockname")
        if sock is not None:
            self.address = (sock[0], sock[1])
        self._schedule_maintenance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the RPC timer deals with the consequence.
        self._stats["socket-error"] += 1

    def spawn(self, coro: Any, name: str = "") -> asyncio.Task[Any]:
        """Start a task owned by this node; cancelled by :meth:`close`."""
        task: asyncio.Task[Any] = self.loop.create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._stats["task-error"] += 1
            self.log.debug("task %s failed: %r", task.get_name(), task.exception())

    async def close(self) -> None:
        """Cancel every task and timer, fail outstanding RPCs, close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._maint is not None:
            self._maint.cancel()
        if self._first_timer is not None:
            self._first_timer.cancel()
        for p in list(self._pending.values()):
            if p.timer is not None:
                p.timer.cancel()
            if not p.future.done():
                p.future.cancel()
        self._pending.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # -- receive path -------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self._receive(data, addr if len(addr) == 2 else (addr[0], addr[1]))
        except Exception as exc:  # the guarantee: nothing escapes the handler
            self._stats["drop:internal"] += 1
            self.log.debug("internal error on datagram from %s: %r", addr, exc)

    def _receive(self, data: bytes, src: Addr) -> None:
        if codec.is_stun(data):
            self._stats["drop:stun"] += 1
            return
        try:
            msg = codec.decode(data)
        except codec.MalformedDatagram as exc:
            self._stats["drop:" + exc.reason] += 1
            self.log.debug("dropped datagram from %s: %s", src, exc.reason)
            return
        if type(msg) is codec.Response:
            self._on_response(msg, src)
            return
        assert type(msg) is codec.Request
        now = self.loop.time()
        if not self._admit(src, now):
            self._stats["drop:rate-limited"] += 1
            return
        out = self.handler.handle(msg, src, now)
        if out.has_reply and self.transport is not None:
            self.transport.sendto(b"\x01" + msg.msg_id + out.body(), src)
        if out.ping is not None:
            self._ping_head(out.ping)
        if out.notify:
            for listener, key, raws in out.notify:
                self._send_notify(listener, key, raws)

    def _admit(self, src: Addr, now: float) -> bool:
        """Per-source token bucket. An entry whose bucket has refilled carries no
        information (a new source starts full), so such entries are dropped: the oldest
        ones as new sources arrive, all of them at each maintenance round."""
        cfg = self.config
        rate = cfg.rate_per_source
        if rate <= 0:
            return True
        table = self._rate
        entry = table.get(src)
        if entry is None:
            # Drop the oldest entry if it has refilled (usually: 1/rate seconds after its
            # last request), so the table only holds sources that are being limited.
            if table:
                old = next(iter(table))
                e = table[old]
                if e[0] + (now - e[1]) * rate >= cfg.rate_burst or len(table) >= _MAX_RATE_ENTRIES:
                    del table[old]
            table[src] = [cfg.rate_burst - 1.0, now]
            return True
        tokens = entry[0] + (now - entry[1]) * rate
        if tokens > cfg.rate_burst:
            tokens = cfg.rate_burst
        entry[1] = now
        if tokens < 1.0:
            entry[0] = tokens
            return False
        entry[0] = tokens - 1.0
        return True

    def _prune_rate(self, now: float) -> None:
        """Drop every rate-limiter entry whose bucket has refilled."""
        rate, burst = self.config.rate_per_source, self.config.rate_burst
        full = [src for src, e in self._rate.items() if e[0] + (now - e[1]) * rate >= burst]
        for src in full:
            del self._rate[src]

    def _on_response(self, msg: codec.Response, src: Addr) -> None:
        p = self._pending.get(msg.msg_id)
        if p is None:
            self._stats["drop:unexpected-response"] += 1
            return
        if p.addr != src:
            self._stats["drop:response-from-wrong-address"] += 1
            return
        self._forget(msg.msg_id)
        if p.timer is not None:
            p.timer.cancel()
        if not p.future.done():
            p.future.set_result(msg.result)

    # -- client path --------------------------------------------------------------------

    def request(self, addr: Addr, name: str, args: list[Any]) -> asyncio.Future[Any]:
        """Send an RPC; the future resolves with the reply or fails with :class:`RpcTimeout`.

        :raises LimitExceeded: too many RPCs outstanding.
        """
        if len(self._pending) >= self.config.max_inflight:
            raise LimitExceeded(f"{self.config.max_inflight} RPCs already outstanding")
        loop = self.loop
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        data = codec.encode_request(msg_id, name, args)
        if len(data) > codec.MAX_DATAGRAM:
            raise LimitExceeded(f"{name} request is {len(data)} bytes, over {codec.MAX_DATAGRAM}")
        fut: asyncio.Future[Any] = loop.create_future()
        p = _Pending(fut, data, addr, name, loop.time())
        self._pending[msg_id] = p
        self._send(data, addr)
        if self._first_timer is None:
            self._first_at = p.started + self.config.rpc_timeout
            self._first_timer = loop.call_at(self._first_at, self._first_tries_due)
        return fut

    def _first_tries_due(self) -> None:
        """Retry every RPC whose first try is ``rpc_timeout`` old, then wait for the next.

        First tries all wait the same time, so in the (insertion-ordered) pending table
        they fall due in order: one timer for the oldest one serves them all, and an RPC
        answered in time costs no timer at all. Later tries have timers of their own.
        """
        self._first_timer = None
        loop = self.loop
        timeout = self.config.rpc_timeout
        # Due: what the timer was set for, even if the loop ran it a little early.
        now = max(loop.time(), self._first_at)
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
            self._retry(msg_id)
        if next_at is not None and self._first_timer is None:
            self._first_at = next_at
            self._first_timer = loop.call_at(next_at, self._first_tries_due)

    def _forget(self, msg_id: bytes) -> None:
        del self._pending[msg_id]
        if not self._pending:
            # A dict keeps its largest size: an idle node should not keep a join's burst.
            self._pending = {}

    def _send(self, data: bytes, addr: Addr) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def _retry(self, msg_id: bytes) -> None:
        p = self._pending.get(msg_id)
        if p is None:
            return
        if p.future.done():
            self._forget(msg_id)
            return
        if p.tries <= self.config.rpc_retries:
            p.tries += 1
            self._stats["rpc-retry"] += 1
            self._send(p.data, p.addr)
            p.timer = self.loop.call_later(self.config.rpc_timeout * p.tries, self._retry, msg_id)
            return
        self._forget(msg_id)
        self._stats["rpc-timeout"] += 1
        p.future.set_exception(RpcTimeout(p.name, p.addr, self.loop.time() - p.started))

    def ds_args(self, *rest: Any) -> list[Any]:
        """Arguments of one of our RPCs: network, our ID, flags, then ``rest``."""
        return [self.config.network, self.id, self._flags, *rest]

    def _learned(self, contact: Contact) -> None:
        """A contact answered us: add it to the table (unless we are a pure client)."""
        head = self.table.add_contact(contact, self.loop.time())
        if head is not None:
            self._ping_head(head)

    def _ping_head(self, head: Contact) -> None:
        """Ping the least-recently-seen contact of a full bucket; evict it if it fails.
        One ping per head at a time, however many newcomers wait for its place."""
        if self._closed or head.id in self._pinging:
            return
        if len(self._pending) > self.config.max_inflight // 2:
            return
        self._pinging[head.id] = None
        fut = self._ping_future(head)
        fut.add_done_callback(functools.partial(self._after_head_ping, head))

    def _after_head_ping(self, head: Contact, fut: asyncio.Future[Any]) -> None:
        self._pinging.pop(head.id, None)
        self._after_call(head, fut)

    def _ping_future(self, c: Contact) -> asyncio.Future[Any]:
        if c.dialect == DIALECT_DS:
            return self.request(c.addr, "ds_ping", self.ds_args())
        return self.request(c.addr, "ping", [self.id])

    def _after_call(self, c: Contact, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is None:
            self._learned(c)
        else:
            self.table.failed(c.id)

    def _send_notify(self, listener: Addr, key: bytes, raws: list[bytes]) -> None:
        if self._closed or len(self._pending) > self.config.max_inflight // 2:
            self._stats["notify-skipped"] += 1
            return
        fut = self.request(listener, "ds_notify", self.ds_args(key, raws))

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None or f.result() is False:
                self.subs.remove(key, listener)

        fut.add_done_callback(done)

    async def ping(self, addr: Addr) -> bytes:
        """Ping ``addr`` with our RPC and add it as a contact; returns its routing ID.

        :raises RpcTimeout: no answer.
        """
        reply = await self.request(addr, "ds_ping", self.ds_args())
        if type(reply) is not list or len(reply) != 2 or type(reply[0]) is not bytes:
            raise RpcTimeout("ds_ping (bad reply)", addr, 0.0)
        nid = reply[0]
        if len(nid) != 20:
            raise RpcTimeout("ds_ping (bad reply)", addr, 0.0)
        seen = reply[1]
        if type(seen) is list and len(seen) == 2:
            self.observed[(str(seen[0]), int(seen[1]))] += 1
        self._learned(Contact(nid, addr[0], addr[1], DIALECT_DS))
        return bytes(nid)

    async def resolve(self, addrs: Iterable[Addr]) -> list[Addr]:
        """``addrs`` with host names resolved to IP addresses of our socket's family.

        Replies are matched by source address, so requests must go to IP addresses. IP
        literals pass as they are (no resolver call); names that do not resolve are
        logged and left out.
        """
        out: list[Addr] = []
        for host, port in addrs:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                pass
            else:
                out.append((host, port))
                continue
            v6 = self.address is not None and ":" in self.address[0]
            family = socket.AF_INET6 if v6 else socket.AF_INET
            try:
                infos = await self.loop.getaddrinfo(
                    host, port, family=family, type=socket.SOCK_DGRAM
                )
            except (OSError, UnicodeError) as exc:
                self.log.warning("cannot resolve %s:%s: %s", host, port, exc)
                continue
            for info in infos[:1]:
                out.append((str(info[4][0]), int(info[4][1])))
        return out

    async def bootstrap(self, addrs: Iterable[Addr]) -> int:
        """Join through ``addrs`` (host names are resolved): ping each, then look up our
        own ID.

        :returns: how many contacts the routing table holds afterwards.
        """
        resolved = await self.resolve(addrs)
        results = await asyncio.gather(*(self.ping(a) for a in resolved), return_exceptions=True)
        ok = sum(1 for r in results if isinstance(r, bytes))
        if ok == 0 and len(self.table) == 0:
            return 0
        await self.find_nodes(self.id)
        return len(self.table)

    # -- lookups ------------------------------------------------------------------------

    def _query(
        self, c: Contact, key: bytes, want_value: bool, store: list[bytes] | None
    ) -> asyncio.Future[Any]:
        if c.dialect == DIALECT_STOCK:
            return self.request(c.addr, "find_node", [self.id, key])
        if store is not None:
            return self.request(c.addr, "ds_store_find", self.ds_args(key, store))
        if want_value:
            return self.request(c.addr, "ds_find_value", self.ds_args(key, 0))
        return self.request(c.addr, "ds_find_node", self.ds_args(key))

    def _initial(self, key: bytes, k: int) -> tuple[list[Contact], bool]:
        cached = self._lookup_cache.get(key)
        if cached is not None and cached[0] > self.loop.time():
            return cached[1], True
        return self.table.closest(key, max(k, self.config.ksize)), False

    async def find_nodes(self, key: bytes, k: int | None = None) -> LookupResult:
        """Iterative FIND_NODE for ``key``; the k closest nodes that answered."""
        return await self._run_lookup(key, k or self.config.ksize, want_value=False, remember=False)

    async def _run_lookup(
        self,
        key: bytes,
        k: int,
        *,
        want_value: bool,
        remember: bool = True,
        store: list[bytes] | None = None,
    ) -> LookupResult:
        """One iterative lookup. ``remember``: keep its result for ``lookup_cache_ttl``
        to start the next lookup of ``key`` from (put/get/listen; not table refreshes).
        ``store``: records every node asked stores on the way (``ds_store_find``; the
        lookup only ever asks nodes among the k closest it knows at the time)."""
        cfg = self.config
        initial, warm = self._initial(key, k)
        lk = Lookup(
            key,
            initial,
            k=k,
            alpha=k if warm else cfg.alpha,
            peer_timeout=cfg.peer_timeout,
            own_id=self.id,
        )
        loop = self.loop
        wake: asyncio.Future[None] = loop.create_future()
        found: dict[bytes, set[bytes]] = {}
        stored: dict[bytes, Any] = {}
        pages: list[asyncio.Future[Any]] = []

        finished = False

        def answered(c: Contact, f: asyncio.Future[Any]) -> None:
            # Late answers (after the lookup finished) still update the routing table.
            if not wake.done():
                wake.set_result(None)
            if f.cancelled():
                return
            if f.exception() is not None:
                self.table.failed(c.id)
                lk.on_failure(c)
                return
            if finished:
                self._learned(c)
                return
            reply = f.result()
            if store is not None and c.dialect == DIALECT_DS:
                if type(reply) is not list or len(reply) != 2:
                    reply = None
                else:
                    stored[c.id], reply = reply
            closer = self._absorb(c, reply, key, found, pages, lk, want_value)
            if closer is None:
                self._stats["drop:bad-reply"] += 1
                lk.on_failure(c)
            else:
                self._learned(c)
                lk.on_success(c, closer)

        while True:
            step = lk.next(self.loop.time())
            if isinstance(step, Query):
                for c in step.contacts:
                    f = self._query(c, key, want_value, store)
                    f.add_done_callback(functools.partial(answered, c))
                continue
            if isinstance(step, Finished):
                break
            if not wake.done():  # no answer arrived since lk.next(): sleep until one does
                timer = None
                if step.until is not None:
                    timer = loop.call_at(step.until, _wake_up, wake)
                await wake
                if timer is not None:
                    timer.cancel()
            wake = loop.create_future()
        finished = True
        if pages:
            await asyncio.gather(*pages, return_exceptions=True)
        if step.closest and remember:
            cache = self._lookup_cache
            cache.pop(key, None)
            # The table's own objects where it has them: no second copy of a contact.
            cache[key] = (
                self.loop.time() + cfg.lookup_cache_ttl,
                [self.table.get(c.id) or c for c in step.closest],
            )
            while len(cache) > 512:
                del cache[next(iter(cache))]
        recs = self._verify(list(found)) if want_value else []
        return LookupResult(step.closest, step.hops, step.queried, recs, found, stored)

    def _absorb(
        self,
        c: Contact,
        reply: Any,
        key: bytes,
        found: dict[bytes, set[bytes]],
        pages: list[asyncio.Future[Any]],
        lk: Lookup,
        want_value: bool,
    ) -> list[Contact] | None:
        """Parse a find reply; collect records; returns the closer contacts or None.

        Contacts the lookup would ignore (known, or too far to be kept) are not parsed."""
        items: Any = reply
        if want_value and c.dialect == DIALECT_DS:
            if type(reply) is not list or len(reply) != 3:
                return None
            items, page, nxt = reply
            if type(page) is not list:
                return None
            for raw in page[:64]:
                if type(raw) is bytes:
                    found.setdefault(raw, set()).add(c.id)
            if type(nxt) is int and nxt > 0 and len(pages) < _MAX_PAGES:
                pages.append(self.spawn(self._more_pages(c, key, nxt, found)))
        if type(items) is not list:
            return None
        out: list[Contact] = []
        known, far = lk.skip_state()
        target = lk.target
        for item in items[: self.config.ksize * 2]:
            if type(item) is list and item and type(nid := item[0]) is bytes:
                if nid in known:
                    continue
                if far is not None and int.from_bytes(nid, "big") ^ target >= far:
                    continue
            contact = parse_contact(item)
            if contact is not None:
                out.append(contact)
        return out

    async def _more_pages(
        self, c: Contact, key: bytes, cursor: int, found: dict[bytes, set[bytes]]
    ) -> None:
        for _ in range(_MAX_PAGES):
            reply = await self.request(c.addr, "ds_find_value", self.ds_args(key, cursor))
            if type(reply) is not list or len(reply) != 3 or type(reply[1]) is not list:
                return
            for raw in reply[1][:64]:
                if type(raw) is bytes:
                    found.setdefault(raw, set()).add(c.id)
            nxt = reply[2]
            if type(nxt) is not int or nxt <= cursor:
                return
            cursor = nxt

    def _verify(self, raws: list[bytes]) -> list[Record]:
        now = self.wallclock()
        good: list[Record] = []
        for raw in raws:
            try:
                rec = records.decode(raw)
                records.validate(rec, now)
            except RecordRejected as exc:
                self._stats["refused-read:" + exc.reason] += 1
                continue
            good.append(rec)
        return good

    # -- put / get / listen -------------------------------------------------------------

    def _stores_locally(self, key: bytes, closest: list[Contact]) -> bool:
        if self.config.client_mode:
            return False
        if len(closest) < self.config.replicas:
            return True
        k = int.from_bytes(key, "big")
        return (self.table.own_long ^ k) < (closest[-1].long_id ^ k)

    async def put(self, recs: list[Record]) -> PutResult:
        """Store records (all under one key) on the nodes closest to it.

        :raises PutFailed: no node accepted any record (``NodeIdTaken`` when that was why,
            ``StoreLimitExceeded`` when a storage limit was).
        :raises UsageError: records under different keys, or too many at once.
        """
        if not recs or len({r.key for r in recs}) != 1 or len(recs) > MAX_STORE_BATCH:
            raise UsageError(f"put takes 1 to {MAX_STORE_BATCH} records under one key")
        key = recs[0].key
        raws = [r.raw for r in recs]
        # Each node the lookup asks stores the records as it answers (ds_store_find): the
        # k closest hold them when it ends; nodes it asked early that turned out farther
        # keep a spare copy until it expires.
        res = await self._run_lookup(key, self.config.replicas, want_value=False, store=raws)
        refused: Counter[str] = Counter()
        stored = 0
        if self._stores_locally(key, res.closest):
            now = self.wallclock()
            local_ok = True
            for r in recs:
                try:
                    fresh = self.store.put(r, self.address or ("", 0), now)
                except RecordRejected as exc:
                    refused[exc.reason] += 1
                    local_ok = False
                    continue
                if fresh:
                    for listener in self.subs.listeners(key, now):
                        self._send_notify(listener, key, [r.raw])
            # Our own copy proves nothing about a node-ID claim: only others' acceptance does.
            if not any(r.type in (RecordType.CLAIM, RecordType.PRESENCE) for r in recs):
                stored += local_ok
        replies = [res.stored.get(c.id) for c in res.closest if c.dialect == DIALECT_DS]
        spare = len(res.stored) - len(replies)
        if spare > 0:
            self._stats["put:spare-copies"] += spare
        for reply in replies:
            if type(reply) is list and reply and all(x == "ok" for x in reply):
                stored += 1
            elif type(reply) is list:
                for x in reply:
                    if x != "ok":
                        refused[str(x)[:32]] += 1
            else:
                refused["bad-reply"] += 1
        if refused.get("id-taken"):
            # One storing node holding another key's live claim is enough: the ID is taken.
            raise NodeIdTaken("another key holds a live claim on this node id")
        detail = ", ".join(f"{k}={v}" for k, v in refused.items()) or "no storing node found"
        limits = [r for r in refused if r in STORE_LIMITS]
        if stored == 0:
            if limits:
                worst = max(limits, key=refused.__getitem__)
                raise StoreLimitExceeded(
                    worst, f"no node stored the record: {STORE_LIMITS[worst]} is used up ({detail})"
                )
            raise PutFailed(f"no node stored the record ({detail})")
        if limits:
            log.warning(
                "put: %d storing nodes stored the record, others refused (%s)", stored, detail
            )
        return PutResult(stored, dict(refused), res.hops)

    async def get(self, key: bytes, *, include_tombstones: bool = False) -> list[Record]:
        """All live records under ``key`` from the nodes closest to it, verified and merged."""
        return (await self.get_held(key, include_tombstones=include_tombstones)).records

    async def get_held(self, key: bytes, *, include_tombstones: bool = False) -> HeldRecords:
        """Like :meth:`get`, and count for each signer the distinct storing nodes whose
        answers held a live (not tombstoned) record of theirs; our own store counts as one.

        A node-ID's owner is the claimant most storing nodes hold (each refuses a second
        claimant), which a single hostile or newly joined storing node cannot change.
        """
        res = await self._run_lookup(key, self.config.replicas, want_value=True)
        merged = list(res.records)
        holders: dict[bytes, set[bytes]] = {}
        for r in res.records:
            if not r.is_tombstone:
                holders.setdefault(r.signer, set()).update(res.held_by.get(r.raw, ()))
        if not self.config.client_mode:
            mine = self.store.get(key, self.wallclock())
            merged.extend(mine)
            for r in mine:
                if not r.is_tombstone:
                    holders.setdefault(r.signer, set()).add(self.id)
        out = records.newest(merged)
        if not include_tombstones:
            out = [r for r in out if not r.is_tombstone]
        return HeldRecords(out, {signer: len(ids) for signer, ids in holders.items()})

    async def get_with_hops(self, key: bytes) -> LookupResult:
        """Like :meth:`get` but returns the whole lookup result (hop count included)."""
        return await self._run_lookup(key, self.config.replicas, want_value=True)

    def _on_notify(self, key: bytes, recs: list[Record], addr: Addr) -> bool:
        queues = self._listeners.get(key)
        if not queues:
            return False
        for q in queues:
            for r in recs:
                if q.qsize() < 256:
                    q.put_nowait(r)
                else:
                    self._stats["drop:listen-queue-full"] += 1
        return True

    async def _subscribe(self, key: bytes) -> int:
        res = await self._run_lookup(key, self.config.replicas, want_value=False)
        futs = [
            self.request(c.addr, "ds_listen", self.ds_args(key, self.config.listen_ttl))
            for c in res.closest
            if c.dialect == DIALECT_DS
        ]
        replies = await asyncio.gather(*futs, return_exceptions=True)
        accepted = [
            c.addr
            for c, r in zip(
                [c for c in res.closest if c.dialect == DIALECT_DS], replies, strict=True
            )
            if type(r) in (int, float)
        ]
        if key in self._listeners:  # not if the last listener left meanwhile
            self._subscribed_at[key] = accepted
        return len(accepted)

    def _unsubscribe(self, key: bytes) -> None:
        """Tell the storing nodes we stopped listening on ``key`` (no answer awaited)."""
        for addr in self._subscribed_at.pop(key, []):
            if self._closed:
                return
            try:
                fut = self.request(addr, "ds_unlisten", self.ds_args(key))
            except DhtSignalError:  # too many RPCs in flight: the subscription just lapses
                return
            fut.add_done_callback(ignore_outcome)

    async def listen(self, key: bytes, *, initial: bool = True) -> AsyncIterator[Record]:
        """Records under ``key`` as storing nodes push them (newest per slot, no repeats).

        Starts with the records already stored (``initial``). The subscription is
        refreshed at half its lifetime; if no storing node accepts it, the
        records are polled every ``poll_interval`` seconds instead, and once a
        subscription is accepted again, one more poll catches what was stored in
        between. A poll cannot tell old records from new, so a polling listener
        with ``initial=False`` may also yield records stored before it began
        (too much rather than too little).
        """
        queue: asyncio.Queue[Record] = asyncio.Queue()
        self._listeners.setdefault(key, []).append(queue)
        seen: dict[tuple[bytes, int, bytes], int] = {}
        cfg = self.config

        async def keep_subscribed() -> None:
            gap = False  # not subscribed for a while: records may have gone unpushed
            while True:
                try:
                    accepted = await self._subscribe(key)
                except DhtSignalError as exc:  # e.g. too many RPCs in flight
                    self._stats["listen-error"] += 1
                    self.log.debug("listen %s: %s", key.hex()[:12], exc)
                    accepted = 0
                if accepted:
                    if gap:  # catch up on what was stored while we polled
                        gap = False
                        await poll()
                    await asyncio.sleep(cfg.listen_ttl / 2)
                    continue
                gap = True
                self._stats["listen-fallback-poll"] += 1
                await poll()
                await asyncio.sleep(cfg.poll_interval)

        async def poll() -> None:
            try:
                polled = await self.get(key, include_tombstones=True)
            except DhtSignalError as exc:
                self._stats["listen-error"] += 1
                self.log.debug("listen %s: %s", key.hex()[:12], exc)
                return
            for r in polled:
                queue.put_nowait(r)

        refresher = self.spawn(keep_subscribed(), name="listen-refresh")
        try:
            if initial:
                for r in await self.get(key, include_tombstones=True):
                    queue.put_nowait(r)
            while True:
                rec = await queue.get()
                if rec.expires <= self.wallclock() or seen.get(rec.slot, -1) >= rec.seq:
                    continue
                seen[rec.slot] = rec.seq
                yield rec
        finally:
            refresher.cancel()
            qs = self._listeners.get(key, [])
            if queue in qs:
                qs.remove(queue)
            if not qs:
                self._listeners.pop(key, None)
                self._unsubscribe(key)  # the storing nodes need not push to us any more

    # -- maintenance & persistence ------------------------------------------------------

    def _schedule_maintenance(self) -> None:
        if self._closed:
            return
        self._maint = self.loop.call_later(self.config.maintenance_interval, self._maintain)

    def _maintain(self) -> None:
        now = self.wallclock()
        self.store.expire(now)
        self.legacy.expire(now)
        self.subs.expire(now)
        mono = self.loop.time()
        self._prune_rate(mono)
        for key in [k for k, (until, _) in self._lookup_cache.items() if until <= mono]:
            del self._lookup_cache[key]
        for lo, hi in self.table.stale_buckets(mono, self.config.refresh_interval)[:4]:
            if len(self.table) and len(self._tasks) < 64:
                target = (lo + int.from_bytes(os.urandom(20), "big") % (hi - lo + 1)).to_bytes(
                    20, "big"
                )
                self.spawn(self.find_nodes(target), name="refresh")
        self._schedule_maintenance()

    def save_state(self, data_dir: Path) -> None:
        """Write contacts, stored records and plain values to ``data_dir`` atomically."""
        now = self.wallclock()
        state = {
            "v": 1,
            "id": self.id,
            "contacts": [c.wire() for c in self.table.contacts()],
            "records": [[raw, [src[0], src[1]]] for raw, src in self.store.dump(now)],
            "legacy": [[k, v, exp] for k, v, exp in self.legacy.dump(now)],
        }
        ensure_dir(data_dir)
        atomic_write(data_dir / STATE_FILE, codec.pack(state))

    def load_state(self, data_dir: Path) -> int:
        """Restore what :meth:`save_state` wrote; returns how many records were restored.

        Records are verified again; expired ones are dropped. A missing file is fine.
        """
        path = data_dir / STATE_FILE
        if not path.exists():
            return 0
        try:
            state = codec.unpack_file(path.read_bytes())
        except Exception as exc:
            raise UsageError(f"state file {path} is unreadable: {exc}") from exc
        if not isinstance(state, dict) or state.get("v") != 1:
            raise UsageError(f"state file {path} has an unknown format")

        def section(name: str) -> list[Any]:
            items = state.get(name, [])
            if type(items) is not list:
                raise UsageError(f"state file {path}: {name!r} is not a list")
            return items

        contacts, saved, legacy = section("contacts"), section("records"), section("legacy")
        # Entries of the wrong shape (a flipped bit, a hand edit) are skipped and counted.
        mono = self.loop.time() if self._has_loop() else 0.0
        for item in contacts:
            c = parse_contact(item)
            if c is None:
                self._stats["state:bad-entry"] += 1
                continue
            self.table.add_contact(c, mono)
        now = self.wallclock()
        restored = 0
        for item in saved:
            if not _shaped(item, [bytes, [str, int]]):
                self._stats["state:bad-entry"] += 1
                continue
            raw, (host, port) = item
            try:
                rec = records.decode(raw)
                records.validate(rec, now)
                self.store.put(rec, (host, port), now)
                restored += 1
            except RecordRejected:
                continue
        for item in legacy:
            # [key, value, expires]; files written before expiry was kept have [key, value].
            if type(item) is not list or len(item) not in (2, 3):
                self._stats["state:bad-entry"] += 1
                continue
            expires = item[2] if len(item) == 3 and type(item[2]) in (int, float) else None
            if expires is not None and expires <= now:
                continue
            try:
                self.legacy.put(item[0], item[1], now, expires)
            except RecordRejected:
                self._stats["state:bad-entry"] += 1
        return restored

    @staticmethod
    def _has_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True
