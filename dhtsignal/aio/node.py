"""A DHT node on an asyncio datagram transport: the adapter around :class:`dhtsignal.dht.node.Node`.

Theory of operation
-------------------
:class:`DhtNode` owns what the sans-I/O :class:`~dhtsignal.dht.node.Node` (``core``)
does not: one UDP socket, one ``call_at`` timer re-armed from the core's
:meth:`~dhtsignal.dht.node.Node.get_timer`, futures keyed by request and operation id,
the tasks it spawns, the ``listen()`` iterators and the state file.

Every datagram goes to :meth:`datagram_received`, which hands it to the core with
the loop's time and sends the core's reply at once; only if the core queued other
datagrams, reported events or moved its timer does the adapter do more
(:meth:`_service`). On asyncio's selector loops the node reads its socket itself, a
batch of datagrams per readiness event (:class:`_SocketTransport`); elsewhere
(uvloop) it uses the loop's own datagram transport, which already reads in batches.

Lookups are driven once per batch (the core's ``batch_lookups``): an answer only
updates its lookup, and the lookups a batch answered take their next step at its end
(after ``read_ready``'s batch, or, with the loop's own transport, which hands over
one datagram per call, in a ``call_soon`` callback run after this loop iteration's
datagrams), as the old all-in-one node's lookup tasks woke once per batch of answers.

The awaitable API (``request``, ``put``, ``get``, ``listen``, ...) starts an
operation on the core and waits for its event.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from dhtsignal.aio import stun
from dhtsignal.datadir import STATE_FILE, atomic_write, ensure_dir
from dhtsignal.dht.listen import SlotFilter
from dhtsignal.dht.node import (
    STORE_LIMITS,
    Bootstrapped,
    Event,
    HeldRecords,
    LookupFinished,
    LookupResult,
    Node,
    OperationFailed,
    PingAnswered,
    PutResult,
    RecordsFound,
    RecordsReceived,
    RecordsStored,
    RequestAnswered,
    RequestFailed,
    routing_id,
)
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record
from dhtsignal.errors import ConfigError, UsageError
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, show_addr

__all__ = [
    "STORE_LIMITS",
    "DhtNode",
    "HeldRecords",
    "LookupResult",
    "Node",
    "PutResult",
    "ignore_outcome",
    "routing_id",
]

log = logging.getLogger(__name__)

#: Datagrams read per readiness event of the socket (one event loop callback).
_READ_BATCH = 64
#: Bytes read per datagram: anything over codec.MAX_DATAGRAM is refused anyway.
_RECV_BYTES = 2048


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
        node = self._node
        recv = self._sock.recvfrom
        received = node.datagram_received
        node._in_batch = True
        try:
            for _ in range(_READ_BATCH):
                try:
                    data, addr = recv(_RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:
                    node.error_received(exc)
                    return
                received(data, addr)
        finally:
            node._in_batch = False
            if node.core.lookups_due:
                node._drive_lookups()

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closing:
            return
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._node.core._stats["drop:send-buffer-full"] += 1
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


class WrappedTransport(asyncio.DatagramTransport):
    """A datagram transport that hands everything to ``inner``; subclasses change
    :meth:`sendto` (an address mapping here, a test's count of datagrams elsewhere)."""

    def __init__(self, inner: asyncio.DatagramTransport) -> None:
        super().__init__()
        self._inner = inner

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._inner.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def get_write_buffer_size(self) -> int:
        return 0


class _MappedTransport(WrappedTransport):
    """An IPv6 socket's transport that sends to IPv4 hosts as ``::ffff:a.b.c.d``."""

    def sendto(self, data: Any, addr: Any = None) -> None:
        if addr is not None and ":" not in addr[0]:
            addr = ("::ffff:" + addr[0], addr[1])
        self._inner.sendto(data, addr)


def _source(addr: Any) -> Addr:
    """An IPv6 socket's source ``(host, port, flow, scope)`` as ``(host, port)``, with an
    IPv4-mapped host written as IPv4."""
    host: str = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


def ignore_outcome(fut: asyncio.Future[Any]) -> None:
    """Done-callback that reads a future's exception so asyncio never logs it as unhandled."""
    if not fut.cancelled():
        fut.exception()


def _loop_time() -> float:
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return 0.0


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
        self.core = core = Node(node_id, config, wallclock=wallclock)
        core.batch_lookups = True
        core.stun_responder = stun.binding_response if stun.AVAILABLE else None
        self.config = core.config
        self.id = node_id
        self.wallclock = wallclock
        self.table = core.table
        self.store = core.store
        self.legacy = core.legacy
        self.subs = core.subs
        self.handler = core.handler
        self.transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: dict[bytes, asyncio.Future[Any]] = {}
        self._ops: dict[int, asyncio.Future[Any]] = {}
        self._listeners: dict[bytes, list[asyncio.Queue[Record]]] = {}
        self._observers: list[Callable[[Event], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        #: a batch of datagrams is being handed over (our own transport's read_ready)
        self._in_batch = False
        #: _drive_lookups is scheduled with call_soon
        self._drive_soon = False
        self._time: Callable[[], float] = _loop_time

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """This module's logger, prefixed with the node (made on first use)."""
        return logging.LoggerAdapter(log, {"node": self.id.hex()[:8]})

    @property
    def stats(self) -> Counter[str]:
        """Counters by reason: requests answered (``rpc:NAME``), refusals (``drop:REASON``,
        ``refused:REASON``), retries and timeouts."""
        return self.core.stats

    @property
    def address(self) -> Addr | None:
        """Our bound address (None before :meth:`listen_udp`)."""
        return self.core.address

    @property
    def observed(self) -> Counter[Addr]:
        """Our address as others saw it (``ds_ping`` answers), counted."""
        return self.core.observed

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running event loop."""
        return self._loop or asyncio.get_running_loop()

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        """The tasks this node owns (cancelled by :meth:`close`)."""
        return frozenset(self._tasks)

    def outstanding(self, addr: Addr | None = None) -> int:
        """RPCs awaiting an answer (to ``addr`` only, if given)."""
        return self.core.outstanding(addr)

    def observe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` with every event of the core; returns the function that stops it."""
        self._observers.append(callback)
        return lambda: self._observers.remove(callback)

    # -- lifecycle ----------------------------------------------------------------------

    async def listen_udp(self, host: str = "127.0.0.1", port: int = 0) -> Addr:
        """Bind a UDP socket and start serving; returns the bound address.

        :raises ConfigError: the address does not resolve or cannot be bound (names the
            ``listen`` setting).
        """
        loop = asyncio.get_running_loop()
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
                if family == socket.AF_INET6 and sockaddr[0] == "::":
                    # [::]:PORT is dual-stack: IPv4 peers arrive as ::ffff:a.b.c.d.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
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
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family == socket.AF_INET6:
            # IPv4 addresses are written as IPv4 everywhere in the node; an IPv6 socket
            # sends to them as IPv4-mapped addresses (datagram_received unmaps sources).
            transport = _MappedTransport(transport)  # type: ignore[arg-type]
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._time = self._loop.time
        sock = transport.get_extra_info("sockname")
        self.core.start((sock[0], sock[1]) if sock is not None else None, self._loop.time())
        self._service()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the RPC timer deals with the consequence.
        self.core._stats["socket-error"] += 1

    def spawn(self, coro: Any, name: str = "") -> asyncio.Task[Any]:
        """Start a task owned by this node; cancelled by :meth:`close`."""
        task: asyncio.Task[Any] = self.loop.create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.core._stats["task-error"] += 1
            self.log.debug("task %s failed: %r", task.get_name(), task.exception())

    async def close(self, *, leave: bool = True) -> None:
        """Cancel every task and timer, fail outstanding RPCs, close the socket.

        :param leave: first tell the routing contacts that this node leaves (one
            ``ds_leave`` datagram each, bounded by ``leave_notices``), so they stop
            handing it out at once instead of after ``good_for``.
        """
        if self._closed:
            return
        self._closed = True
        notices: list[tuple[bytes, Addr]] = []
        if leave and self.transport is not None:
            core = self.core
            core.datagrams_to_send(self._time())  # what was queued is not sent any more
            if core.leave(self._time()):
                notices = core.datagrams_to_send(self._time())
        # From here on the core answers nothing (a ping confirming our leave must fail).
        self.core.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in [*self._requests.values(), *self._ops.values()]:
            if not fut.done():
                fut.cancel()
        self._requests.clear()
        self._ops.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport is not None:
            for data, addr in notices:  # last: nothing of ours follows them
                try:
                    self.transport.sendto(data, addr)
                except OSError as exc:  # best effort: the node is going anyway
                    self.log.debug("leave notice to %s not sent: %r", addr, exc)
            self.transport.close()

    # -- the core's I/O -----------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        core = self.core
        src = addr if len(addr) == 2 else _source(addr)
        reply = core.receive_datagram(data, src, self._time())
        if reply is not None:
            transport = self.transport
            if transport is not None:
                transport.sendto(reply, src)
        if core.outgoing or core.events or core.timer_changed:
            self._service()
        if core._dirty and not self._in_batch and not self._drive_soon:  # lookups_due, inlined
            # The loop's own transport hands datagrams over one call each: drive the
            # lookups they answered once this loop iteration's datagrams are all in.
            self._drive_soon = True
            self.loop.call_soon(self._drive_lookups)

    def _drive_lookups(self) -> None:
        """Drive the lookups answered by the last batch of datagrams (see
        :meth:`Node.drive_lookups`), then send what they queued."""
        self._drive_soon = False
        core = self.core
        if core.lookups_due and not self._closed:
            core.drive_lookups(self._time())
            self._service()

    def _service(self) -> None:
        """Send what the core queued, deliver its events, re-arm the timer."""
        core = self.core
        if core.outgoing:
            transport = self.transport
            for data, addr in core.datagrams_to_send(0.0):
                if transport is not None:
                    try:
                        transport.sendto(data, addr)
                    except ValueError:  # uvloop: an IPv6 contact on an IPv4 socket
                        core._stats["drop:address-family"] += 1
        if core.events:
            events, core.events = core.events, []
            for ev in events:
                self._deliver(ev)
        core.timer_changed = False
        if self._closed:
            return
        at = core.get_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None and self._loop is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        at = self._timer_at or 0.0
        self._timer_at = None
        # Due: what the timer was set for, even if the loop ran it a little early.
        self.core.handle_timer(max(self.loop.time(), at))
        self._service()

    def _deliver(self, ev: Event) -> None:
        for observer in list(self._observers):
            observer(ev)
        if isinstance(ev, RequestAnswered):
            self._settle(self._requests.pop(ev.request_id, None), ev.result, None)
        elif isinstance(ev, RequestFailed):
            self._settle(self._requests.pop(ev.request_id, None), None, ev.error)
        elif isinstance(ev, RecordsReceived):
            size = self.config.listen_queue_size
            for q in self._listeners.get(ev.key, ()):
                for r in ev.records:
                    if not ev.pushed or q.qsize() < size:
                        q.put_nowait(r)
                    else:
                        self.core._stats["drop:listen-queue-full"] += 1
        elif isinstance(ev, OperationFailed):
            self._settle(self._ops.pop(ev.op_id, None), None, ev.error)
        elif isinstance(ev, LookupFinished | RecordsStored):
            self._settle(self._ops.pop(ev.op_id, None), ev.result, None)
        elif isinstance(ev, RecordsFound):
            self._settle(self._ops.pop(ev.op_id, None), ev.held, None)
        elif isinstance(ev, PingAnswered):
            self._settle(self._ops.pop(ev.op_id, None), ev.node_id, None)
        elif isinstance(ev, Bootstrapped):
            self._settle(self._ops.pop(ev.op_id, None), ev.contacts, None)

    @staticmethod
    def _settle(fut: asyncio.Future[Any] | None, result: Any, error: BaseException | None) -> None:
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _op(self, op_id: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._ops[op_id] = fut
        self._service()
        return fut

    # -- client path --------------------------------------------------------------------

    def request(self, addr: Addr, name: str, args: list[Any]) -> asyncio.Future[Any]:
        """Send an RPC; the future resolves with the reply or fails with :class:`RpcTimeout`.

        :raises LimitExceeded: too many RPCs outstanding.
        """
        msg_id = self.core.send_request(addr, name, args, self.loop.time())
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._requests[msg_id] = fut
        self._service()
        return fut

    def ds_args(self, *rest: Any) -> list[Any]:
        """Arguments of one of our RPCs: network, our ID, flags, then ``rest``."""
        return self.core.ds_args(*rest)

    async def ping(self, addr: Addr) -> bytes:
        """Ping ``addr`` with our RPC and add it as a contact; returns its routing ID.

        :raises RpcTimeout: no answer.
        """
        nid: bytes = await self._op(self.core.start_ping(addr, self.loop.time()))
        return nid

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
        size: int = await self._op(self.core.start_bootstrap(resolved, self.loop.time()))
        return size

    async def find_nodes(self, key: bytes, k: int | None = None) -> LookupResult:
        """Iterative FIND_NODE for ``key``; the k closest nodes that answered."""
        op = self.core.start_lookup(key, self.loop.time(), k=k, remember=False)
        res: LookupResult = await self._op(op)
        return res

    async def put(self, recs: list[Record]) -> PutResult:
        """Store records (all under one key) on the nodes closest to it.

        :raises PutFailed: no node accepted any record (``NodeIdTaken`` when that was why,
            ``StoreLimitExceeded`` when a storage limit was).
        :raises UsageError: records under different keys, or too many at once.
        """
        res: PutResult = await self._op(self.core.start_put(recs, self.loop.time()))
        return res

    async def get(self, key: bytes, *, include_tombstones: bool = False) -> list[Record]:
        """All live records under ``key`` from the nodes closest to it, verified and merged."""
        return (await self.get_held(key, include_tombstones=include_tombstones)).records

    async def get_held(
        self, key: bytes, *, include_tombstones: bool = False, k: int | None = None
    ) -> HeldRecords:
        """Like :meth:`get`, and count for each signer the distinct storing nodes whose
        answers held a live (not tombstoned) record of theirs; our own store counts as one.

        A node-ID's owner is the claimant most storing nodes hold (each refuses a second
        claimant), which a single hostile or newly joined storing node cannot change.

        :param k: storing nodes to read (default ``replicas``).
        """
        op = self.core.start_get(key, self.loop.time(), include_tombstones=include_tombstones, k=k)
        held: HeldRecords = await self._op(op)
        return held

    async def get_with_hops(self, key: bytes) -> LookupResult:
        """Like :meth:`get` but returns the whole lookup result (hop count included)."""
        op = self.core.start_lookup(key, self.loop.time(), k=self.config.replicas, want_value=True)
        res: LookupResult = await self._op(op)
        return res

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
        seen = SlotFilter(16 * self.config.listen_queue_size)
        self.core.listen(key, self.loop.time())
        self._service()
        try:
            if initial:
                for r in await self.get(key, include_tombstones=True):
                    queue.put_nowait(r)
            while True:
                rec = await queue.get()
                if seen.fresh(rec, self.wallclock()):
                    yield rec
        finally:
            qs = self._listeners.get(key, [])
            if queue in qs:
                qs.remove(queue)
            if not qs:
                self._listeners.pop(key, None)
            if not self._closed:
                self.core.unlisten(key, _loop_time())
                self._service()

    def listening(self, key: bytes) -> int:
        """How many ``listen`` iterators are open on ``key``."""
        return self.core.listening(key)

    # -- persistence --------------------------------------------------------------------

    def subscription_holders(self, key: bytes) -> list[Addr]:
        """The storing nodes that accepted our last subscription of ``key``."""
        return self.core.subscription_holders(key)

    def save_state(self, data_dir: Path) -> None:
        """Write contacts, stored records and plain values to ``data_dir`` atomically."""
        ensure_dir(data_dir)
        atomic_write(data_dir / STATE_FILE, codec.pack(self.core.snapshot()))

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
        return self.core.restore(state, _loop_time(), f"state file {path}")
