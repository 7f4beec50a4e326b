"""A simulated network: thousands of real sans-I/O DHT nodes
(:class:`~dhtsignal.dht.node.Node`) exchanging datagrams in memory on a virtual clock.

Theory of operation
-------------------
No event loop
    The protocol is :class:`~dhtsignal.dht.node.Node`, which owns no socket and reads
    no clock: datagrams go in through ``receive_datagram(data, addr, now)`` and out
    through ``datagrams_to_send(now)``, its one timer through ``get_timer()`` /
    ``handle_timer(now)``, and operations (``start_put``, ``start_get``,
    ``start_lookup``, ``start_bootstrap``, ...) end in events. :class:`SimNetwork` is
    the loop: one heap of ``(time, sequence, node index, datagram or None, source)``
    entries holds both the datagrams in flight and each node's armed timer, and
    :meth:`SimNetwork._step` pops the earliest, sets the virtual clock
    :attr:`SimNetwork.now` to its time, and hands it to the node (a datagram if the
    node is alive, or its timer). Whatever the node then wants to send goes onto the
    heap, its events are matched against the operations being waited for, and its
    timer is pushed only if it moved earlier than the entry already armed (re-arming
    never searches the heap; an entry that fires before the timer is due just wakes
    the node, which handles what is due and is armed again). Ties are broken by
    the sequence number, so datagrams with the same arrival time arrive in the order
    they were sent. Handling takes no virtual time: the simulated CPU is infinitely
    fast, and an hour of an idle network costs only its maintenance timers.

Driving it
    :meth:`SimNetwork.start` begins an operation on a node (a function of the node and
    the time that returns the operation id) and returns a :class:`SimOp`;
    :meth:`SimNetwork.wait` steps the heap until every given operation has ended and
    returns each one's result or the exception it failed with. :meth:`SimNetwork.put`,
    :meth:`~SimNetwork.get_held`, :meth:`~SimNetwork.find_nodes` and friends are one
    operation each, started and waited for. :meth:`SimNetwork.run_for` lets virtual
    time pass with everything due in it happening (refreshes, expiry). Code above the
    DHT runs on the same clock through its own I/O-free parts, taking ``now`` from
    :attr:`SimNetwork.now` or :meth:`SimNetwork.wallclock` (presence:
    :mod:`dhtsignal.signaling.presence`). A wait that can never end (nothing in the
    heap) or that would pass :attr:`SimNetwork.time_limit` or its own ``timeout``
    raises :class:`SimulationStalled` instead of hanging.

The network
    A node's address is a ``("127.x.y.z", port)`` pair (:func:`address_of`) that no
    real socket ever uses. Routing a datagram looks the destination up, applies the
    loss rate, and pushes it with its arrival time. Latency is fixed per unordered pair
    of nodes (uniform in the configured range, a hash of the seed and the two node
    indices, so it costs no memory), plus optional per-datagram jitter. Every datagram
    is counted (:class:`Traffic`).

    A node's ``wallclock`` (record expiry) is ``epoch + now``, so records expire on
    virtual time too.

    :meth:`SimNetwork.crash` kills a node: it sends nothing more, datagrams addressed to
    it (including those already in flight) are dropped, and its timer never fires
    again. Nothing is said to anyone, as in a crash. :meth:`SimNetwork.leave` stops a
    node cleanly: its ``ds_leave`` notices go out first. :mod:`dhtsignal.testing.churn`
    drives sessions of random length on top of both.

    :meth:`SimNetwork.grow` joins nodes in waves: each new node bootstraps off a random
    node that had already joined when its wave began, and a wave is at most as large as
    the network it joins (so early waves double it) and at most ``join_concurrency``
    nodes.

Determinism
    All the simulator's choices (node IDs, latencies, losses, bootstrap contacts, crash
    victims) come from ``random.Random(seed)``; the nodes' bucket-refresh targets from a
    second generator seeded from it (:attr:`Node.randbytes`). The protocol code draws
    RPC message IDs from ``os.urandom``; they do not change behaviour.

Memory
    A large simulated network holds millions of long-lived objects: a run of thousands
    of nodes should raise the cyclic garbage collector's thresholds
    (``gc.set_threshold(*SIM_GC_THRESHOLD)``, as ``bench/sim_scale.py`` does).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht.node import (
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
    RecordsStored,
)
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record
from dhtsignal.errors import SimulationStalled, UsageError
from dhtsignal.wire.addr import Addr

__all__ = [
    "SIM_GC_THRESHOLD",
    "SimConfig",
    "SimNetwork",
    "SimOp",
    "SimulationStalled",
    "Traffic",
    "address_of",
]

#: Wall-clock UNIX time at virtual time zero (late 2023).
DEFAULT_EPOCH = 1.7e9
_MASK64 = (1 << 64) - 1
#: Cyclic-GC thresholds for a large simulation. A large simulated network holds
#: millions of long-lived objects; with CPython's default (700, 10, 10) the collector
#: took about 40% of the CPU time of building a 3,000-node network, with these about 10%.
SIM_GC_THRESHOLD = (20_000, 20, 20)


# -- the network ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """How the simulated network behaves."""

    seed: int = 0
    """Seed of every random choice the simulator makes."""
    latency: tuple[float, float] = (0.005, 0.050)
    """One-way delay range, seconds; each pair of nodes gets a fixed delay in it."""
    jitter: float = 0.0
    """Extra per-datagram delay, uniform in ``[0, jitter)`` seconds (reorders datagrams)."""
    loss: float = 0.0
    """Probability that a datagram is lost."""
    join_concurrency: int = 128
    """Most nodes bootstrapping at once in :meth:`SimNetwork.grow`."""
    join_attempts: int = 3
    """Bootstrap tries of a joining node (each off another random node)."""
    epoch: float = DEFAULT_EPOCH
    """Wall-clock UNIX time at virtual time zero."""
    node_config: NodeConfig = field(default_factory=NodeConfig)
    """Protocol parameters of every node."""


@dataclass(slots=True)
class Traffic:
    """Datagram counters of a :class:`SimNetwork`."""

    sent: int = 0
    """Datagrams sent by live nodes."""
    delivered: int = 0
    """Datagrams handed to a live node's ``receive_datagram``."""
    lost: int = 0
    """Dropped by the loss rate."""
    dead: int = 0
    """Addressed to, or sent by, a crashed node."""
    unroutable: int = 0
    """Addressed to no simulated node."""
    bytes: int = 0
    """Payload bytes sent (``sent`` datagrams)."""

    def copy(self) -> Traffic:
        """A snapshot of the counters."""
        return Traffic(self.sent, self.delivered, self.lost, self.dead, self.unroutable, self.bytes)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(
            self.sent - other.sent,
            self.delivered - other.delivered,
            self.lost - other.lost,
            self.dead - other.dead,
            self.unroutable - other.unroutable,
            self.bytes - other.bytes,
        )


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a cheap, well-spread 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def address_of(index: int) -> Addr:
    """The simulated address of node ``index``: ``("127.x.y.z", port)``."""
    n = index + 1
    return (f"127.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}", 20000 + index % 40000)


# -- the sans-I/O network ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimOp:
    """An operation started on a simulated node (see :meth:`SimNetwork.start`)."""

    index: int
    """The node's index."""
    op_id: int
    """The operation id the node returned."""


class SimNetwork:
    """Simulated sans-I/O DHT nodes (:class:`~dhtsignal.dht.node.Node`) on a virtual clock.

    No event loop: one heap holds the datagrams in flight and the nodes' timers;
    :meth:`wait` pops them in order of time until the awaited operations have ended.

    :param config: network behaviour; defaults to :class:`SimConfig` ().
    :param time_limit: virtual time past which :meth:`wait` and :meth:`run_for` raise
        :class:`SimulationStalled` (None: no limit).
    """

    def __init__(self, config: SimConfig | None = None, *, time_limit: float | None = None):
        self.config = cfg = config or SimConfig()
        lo, hi = cfg.latency
        if not 0 <= lo <= hi or not 0 <= cfg.loss < 1 or cfg.jitter < 0:
            raise UsageError("SimConfig needs 0 <= latency[0] <= latency[1], 0 <= loss < 1")
        self.now = 0.0
        """Virtual monotonic time, seconds."""
        self.time_limit = time_limit
        self.rng = random.Random(cfg.seed)
        #: the nodes' own random choices (refresh targets), apart from the simulator's
        self.node_rng = random.Random(cfg.seed ^ 0x5EED)
        self.nodes: list[Node] = []
        """Every node ever created, by index."""
        self.alive: list[bool] = []
        """Whether the node of that index is alive."""
        self.joined: list[int] = []
        """Indices of nodes that have joined (bootstrapped), in join order."""
        self.traffic = Traffic()
        self.join_failures = 0
        self._by_addr: dict[Addr, int] = {}
        self._salt = _mix64(cfg.seed & _MASK64 ^ 0x9E3779B97F4A7C15)
        self._lat_lo = lo
        self._lat_span = hi - lo
        #: (time, seq, node index, datagram or None for a timer, source address)
        self._queue: list[tuple[float, int, int, bytes | None, Addr | None]] = []
        self._armed: list[float | None] = []
        self._seq = 0
        self._awaited: dict[tuple[int, int], Event | None] = {}
        self._ended_at: dict[tuple[int, int], float] = {}

    # -- clocks & addresses -------------------------------------------------------------

    def wallclock(self) -> float:
        """Virtual wall-clock UNIX time: ``epoch + now``."""
        return self.config.epoch + self.now

    address_of = staticmethod(address_of)

    def index_of(self, node: Node) -> int:
        """The index of ``node`` in :attr:`nodes`."""
        if node.address is None or node.address not in self._by_addr:
            raise UsageError("node is not part of this simulated network")
        return self._by_addr[node.address]

    def latency(self, a: int, b: int) -> float:
        """The fixed one-way delay between nodes ``a`` and ``b`` (symmetric), seconds."""
        lo, hi = (a, b) if a < b else (b, a)
        h = _mix64((self._salt + lo * 0x100000001B3 + hi) & _MASK64)
        return self._lat_lo + self._lat_span * (h >> 11) * (1.0 / (1 << 53))

    @property
    def in_flight(self) -> int:
        """Datagrams sent and not yet delivered (or dropped at arrival)."""
        return sum(1 for e in self._queue if e[3] is not None)

    # -- the wire and the timers --------------------------------------------------------

    def _route(self, src: int, data: bytes, addr: Addr) -> None:
        t = self.traffic
        if not self.alive[src]:
            t.dead += 1
            return
        t.sent += 1
        t.bytes += len(data)
        try:
            dst = self._by_addr.get((addr[0], addr[1]))
        except (TypeError, IndexError):
            dst = None
        if dst is None:
            t.unroutable += 1
            return
        cfg = self.config
        if cfg.loss and self.rng.random() < cfg.loss:
            t.lost += 1
            return
        delay = self.latency(src, dst)
        if cfg.jitter:
            delay += self.rng.random() * cfg.jitter
        self._seq += 1
        heapq.heappush(
            self._queue, (self.now + delay, self._seq, dst, data, self.nodes[src].address)
        )

    def _service(self, i: int, after_timer: bool = False) -> None:
        """Route what node ``i`` queued, keep the events awaited, arm its timer."""
        node = self.nodes[i]
        if node.outgoing:
            for data, addr in node.datagrams_to_send(self.now):
                self._route(i, data, addr)
        if node.events:
            awaited = self._awaited
            for ev in node.events:
                op_id = getattr(ev, "op_id", None)
                if op_id is not None and (i, op_id) in awaited:
                    awaited[(i, op_id)] = ev
                    self._ended_at[(i, op_id)] = self.now
            node.events = []
        if node.timer_changed or after_timer:
            node.timer_changed = False
            at = node.get_timer()
            armed = self._armed[i]
            if at is not None and (armed is None or at < armed):
                self._armed[i] = at
                self._seq += 1
                heapq.heappush(self._queue, (at, self._seq, i, None, None))

    def _step(self) -> None:
        when, _, i, data, src = heapq.heappop(self._queue)
        if when > self.now:
            if self.time_limit is not None and when > self.time_limit:
                heapq.heappush(self._queue, (when, 0, i, data, src))
                raise SimulationStalled(
                    f"virtual time would pass its limit of {self.time_limit:.1f} s "
                    f"(now {self.now:.3f} s)"
                )
            self.now = when
        node = self.nodes[i]
        if data is None:
            if self._armed[i] == when:
                self._armed[i] = None
            if self.alive[i]:
                node.handle_timer(self.now)
                self._service(i, after_timer=True)
            return
        if not self.alive[i]:
            self.traffic.dead += 1
            return
        self.traffic.delivered += 1
        assert src is not None
        reply = node.receive_datagram(data, src, self.now)
        if reply is not None:
            self._route(i, reply, src)
        if node.outgoing or node.events or node.timer_changed:
            self._service(i)

    # -- operations ---------------------------------------------------------------------

    def start(self, node: Node, begin: Callable[[Node, float], int]) -> SimOp:
        """Start an operation on ``node`` now; wait for it with :meth:`wait`.

        :param node: a live node.
        :param begin: called with the node and the time; returns the operation id (e.g.
            ``lambda n, now: n.start_put(recs, now)``).
        """
        i = self.index_of(node)
        op = SimOp(i, begin(node, self.now))
        self._awaited.setdefault((i, op.op_id), None)
        self._service(i)
        return op

    def wait(
        self,
        ops: Iterable[SimOp],
        *,
        timeout: float | None = None,
        ended_at: list[float] | None = None,
    ) -> list[Any]:
        """Run the network until every operation of ``ops`` has ended.

        :param ops: operations from :meth:`start`.
        :param timeout: virtual seconds to allow (None: only ``time_limit``).
        :param ended_at: if given, the virtual time each operation ended is appended.
        :returns: per operation, its result, or the exception it failed with.
        :raises SimulationStalled: nothing left to happen, or time ran out.
        """
        ops = list(ops)
        keys = [(op.index, op.op_id) for op in ops]
        awaited = self._awaited
        deadline = None if timeout is None else self.now + timeout
        while any(awaited.get(k) is None for k in keys):
            if not self._queue:
                raise SimulationStalled("simulation stalled: nothing in flight, no timer")
            if deadline is not None and self._queue[0][0] > deadline:
                raise SimulationStalled(f"operations still running after {timeout} s")
            self._step()
        out: list[Any] = []
        for k in keys:
            ev = awaited.pop(k)
            at = self._ended_at.pop(k)
            if ended_at is not None:
                ended_at.append(at)
            out.append(_outcome(ev))
        return out

    def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, everything due in them happening."""
        until = self.now + seconds
        while self._queue and self._queue[0][0] <= until:
            self._step()
        self.now = max(self.now, until)

    def _one(self, node: Node, begin: Callable[[Node, float], int]) -> Any:
        (result,) = self.wait([self.start(node, begin)])
        if isinstance(result, BaseException):
            raise result
        return result

    def put(self, node: Node, recs: list[Record]) -> PutResult:
        """``node`` puts ``recs``; runs until done. :raises PutFailed: as the node does."""
        res: PutResult = self._one(node, lambda n, now: n.start_put(recs, now))
        return res

    def get_held(self, node: Node, key: bytes, **kw: Any) -> HeldRecords:
        """``node`` gets ``key``; runs until done."""
        res: HeldRecords = self._one(node, lambda n, now: n.start_get(key, now, **kw))
        return res

    def get_with_hops(self, node: Node, key: bytes) -> LookupResult:
        """``node`` looks ``key`` up for its records; runs until done."""
        k = node.config.replicas
        res: LookupResult = self._one(
            node, lambda n, now: n.start_lookup(key, now, k=k, want_value=True)
        )
        return res

    def find_nodes(self, node: Node, key: bytes) -> LookupResult:
        """``node`` looks ``key`` up (FIND_NODE); runs until done."""
        res: LookupResult = self._one(node, lambda n, now: n.start_lookup(key, now, remember=False))
        return res

    def bootstrap(self, node: Node, addrs: list[Addr]) -> int:
        """``node`` joins through ``addrs``; runs until done; the table's size."""
        res: int = self._one(node, lambda n, now: n.start_bootstrap(addrs, now))
        return res

    # -- membership ---------------------------------------------------------------------

    def add_node(self, node_id: bytes | None = None) -> Node:
        """Create a node with an address, not yet joined (see :meth:`grow`).

        :param node_id: its routing ID (default: 20 random bytes from the seed).
        """
        index = len(self.nodes)
        nid = node_id if node_id is not None else self.rng.randbytes(20)
        node = Node(nid, self.config.node_config, wallclock=self.wallclock)
        node.randbytes = self.node_rng.randbytes
        addr = self.address_of(index)
        self.nodes.append(node)
        self.alive.append(True)
        self._armed.append(None)
        self._by_addr[addr] = index
        node.start(addr, self.now)
        self._service(index, after_timer=True)
        return node

    def grow(self, count: int, *, progress: Callable[[int, int], None] | None = None) -> list[Node]:
        """Create ``count`` nodes and join them in waves: each bootstraps off a random
        node that had joined when its wave began (up to ``join_attempts`` tries); a wave
        is at most as large as the network it joins and at most ``join_concurrency``.

        :param count: how many nodes to add.
        :param progress: called after each wave with ``(done, count)``.
        :returns: the new nodes.
        """
        new = [self.add_node() for _ in range(count)]
        done = 0
        while done < count:
            live_joined = sum(1 for i in self.joined if self.alive[i])
            wave = max(1, min(self.config.join_concurrency, live_joined, count - done))
            batch = [self.index_of(n) for n in new[done : done + wave]]
            pending = list(batch)
            for _ in range(self.config.join_attempts):
                alone = [i for i in pending if not any(self.alive[j] for j in self.joined)]
                ops = []
                for i in pending:
                    if i in alone:
                        continue
                    via = self.nodes[self._random_joined(exclude=i)]
                    assert via.address is not None
                    ops.append(self.start(self.nodes[i], _bootstrap_via(via.address)))
                results = self.wait(ops)
                ok = set(alone)
                for op, size in zip(ops, results, strict=True):
                    if isinstance(size, int) and size > 0:
                        ok.add(op.index)
                pending = [i for i in pending if i not in ok]
                if not pending:
                    break
            self.join_failures += len(pending)
            self.joined.extend(i for i in batch if i not in pending)
            done += len(batch)
            if progress is not None:
                progress(done, count)
        return new

    @classmethod
    def build(
        cls,
        count: int,
        config: SimConfig | None = None,
        *,
        progress: Callable[[int, int], None] | None = None,
        time_limit: float | None = None,
    ) -> SimNetwork:
        """A network of ``count`` joined nodes.

        :param count: how many nodes.
        :param config: network behaviour.
        :param progress: see :meth:`grow`.
        :param time_limit: see :class:`SimNetwork`.
        """
        net = cls(config, time_limit=time_limit)
        net.grow(count, progress=progress)
        return net

    def live_nodes(self) -> list[Node]:
        """Nodes that have not crashed."""
        return [n for n, up in zip(self.nodes, self.alive, strict=True) if up]

    def random_node(self) -> Node:
        """A random live, joined node."""
        return self.nodes[self._random_joined()]

    def _random_joined(self, exclude: int = -1) -> int:
        return _pick_joined(self.rng, self.joined, self.alive, exclude)

    def crash(self, node: Node) -> None:
        """Kill ``node`` without a word: it sends and receives nothing from now on."""
        index = self.index_of(node)
        if self.alive[index]:
            self.alive[index] = False
            node.close()

    def leave(self, node: Node) -> int:
        """Stop ``node`` cleanly: it tells its contacts it leaves (``ds_leave``, see
        :meth:`Node.leave <dhtsignal.dht.node.Node.leave>`), then sends and receives
        nothing more. Returns how many notices it sent."""
        index = self.index_of(node)
        if not self.alive[index]:
            return 0
        sent = node.leave(self.now)
        self._service(index)
        self.alive[index] = False
        node.close()
        return sent

    def crash_random(self, fraction: float, *, spare: Iterable[Node] = ()) -> list[Node]:
        """Crash a random ``fraction`` of the live nodes.

        :param fraction: between 0 and 1.
        :param spare: nodes never chosen.
        :returns: the crashed nodes.
        """
        keep = {self.index_of(n) for n in spare}
        pool = [i for i, up in enumerate(self.alive) if up and i not in keep]
        victims = self.rng.sample(pool, min(len(pool), round(fraction * sum(self.alive))))
        for i in victims:
            self.crash(self.nodes[i])
        return [self.nodes[i] for i in victims]

    def close(self) -> None:
        """Close every node and drop what is in flight."""
        for i, up in enumerate(self.alive):
            if up:
                self.alive[i] = False
                self.nodes[i].close()
        self.traffic.dead += sum(1 for e in self._queue if e[3] is not None)
        self._queue.clear()


def _bootstrap_via(addr: Addr) -> Callable[[Node, float], int]:
    def begin(node: Node, now: float) -> int:
        return node.start_bootstrap([addr], now)

    return begin


def _pick_joined(rng: random.Random, joined: list[int], alive: list[bool], exclude: int) -> int:
    """A random live joined node's index, not ``exclude``."""
    # Usually most nodes are alive: a few draws find one without scanning the list.
    for _ in range(32):
        if not joined:
            break
        i = rng.choice(joined)
        if alive[i] and i != exclude:
            return i
    live = [i for i in joined if alive[i] and i != exclude]
    if not live:
        raise UsageError("no live joined node")
    return rng.choice(live)


def _outcome(ev: Event | None) -> Any:
    """The result an operation's closing event carries (or its error)."""
    if isinstance(ev, OperationFailed):
        return ev.error
    if isinstance(ev, LookupFinished | RecordsStored):
        return ev.result
    if isinstance(ev, RecordsFound):
        return ev.held
    if isinstance(ev, PingAnswered):
        return ev.node_id
    if isinstance(ev, Bootstrapped):
        return ev.contacts
    raise UsageError(f"not the end of an operation: {ev!r}")
