"""``DhtNode.listen``: records pushed by storing nodes (``ds_notify``), the subscription
refreshed before it lapses, polling only when no storing node accepts it, and nothing
left running once the iterator is closed.

Real UDP nodes on 127.0.0.1. The tests synchronise on the listener's subscriptions by
observing the node's :class:`~dhtsignal.dht.node.SubscriptionRenewed` events
(:class:`SubscribeWatch`), never by sleeping. Storing nodes that refuse every
subscription (``max_listeners_per_key=0``) send a listener to polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import pytest

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht import records
from dhtsignal.dht.node import Event, SubscriptionRenewed
from dhtsignal.dht.params import NodeConfig
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.dht.storage import StorageLimits
from dhtsignal.identity import Identity

if TYPE_CHECKING:
    from conftest import StartDht

#: Generous bound for one step that takes milliseconds on loopback.
STEP = 5.0
#: Shortest subscription a storing node grants (``Subscriptions.add`` clamps to 1 s).
TTL = 1.0
FAST = NodeConfig(listen_ttl=TTL, poll_interval=0.2)
#: Storing nodes that refuse every subscription: listeners poll.
REFUSING = dataclasses.replace(FAST, limits=StorageLimits(max_listeners_per_key=0))


def _rec(who: Identity, key: bytes, seq: int, ttl: float = 60.0) -> Record:
    return records.sign(who, RecordType.DATA, key, b"v%d" % seq, seq=seq, expires=time.time() + ttl)


class SubscribeWatch:
    """Observes a node's (re)subscriptions to ``key``: when each one returned and how many
    storing nodes accepted it."""

    def __init__(self, node: DhtNode, key: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self.calls: list[tuple[float, int]] = []
        self._cond = asyncio.Condition()

        def seen(ev: Event) -> None:
            if isinstance(ev, SubscriptionRenewed) and ev.key == key:
                self.calls.append((self._loop.time(), ev.accepted))
                self._loop.create_task(self._notify())

        node.observe(seen)

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait(self, count: int, timeout: float = STEP) -> None:
        """Until ``count`` subscriptions have returned."""
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: len(self.calls) >= count), timeout)

    async def wait_span(self, seconds: float, timeout: float) -> None:
        """Until a subscription returned ``seconds`` after the first one did."""

        def spanned() -> bool:
            return bool(self.calls) and self.calls[-1][0] - self.calls[0][0] >= seconds

        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(spanned), timeout)


class Listener:
    """One ``listen`` iterator with its next item always pending, so the generator runs
    (and subscribes) before the test awaits a record."""

    def __init__(self, node: DhtNode, key: bytes, *, initial: bool) -> None:
        self.it = cast(AsyncGenerator[Record, None], node.listen(key, initial=initial))
        self._next: asyncio.Task[Record] | None = None

    def start(self) -> None:
        if self._next is None:
            self._next = asyncio.create_task(anext(self.it))

    async def next(self, timeout: float = STEP) -> Record:
        self.start()
        assert self._next is not None
        try:
            return await asyncio.wait_for(self._next, timeout)
        finally:
            self._next = None

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None
        await self.it.aclose()


@pytest.fixture
async def listeners() -> AsyncIterator[list[Listener]]:
    """Listeners a test opens; closed in teardown (before the ``dht`` nodes close)."""
    opened: list[Listener] = []
    try:
        yield opened
    finally:
        for lst in opened:
            await lst.close()


def _unowned_tasks(nodes: list[DhtNode]) -> set[asyncio.Task[Any]]:
    """Running tasks that belong to no node (and are not this test)."""
    me = asyncio.current_task()
    owned = set().union(*(n.tasks for n in nodes))
    return {t for t in asyncio.all_tasks() if t is not me and not t.done()} - owned


@pytest.mark.timeout(30)
async def test_pushes_arrive_in_order_across_subscription_refreshes(
    dht: StartDht, listeners: list[Listener]
) -> None:
    """A record put more than two subscription lifetimes after listening began still
    arrives by push: the listener refreshed its subscription. Records arrive in seq order;
    stale and repeated notifications are not yielded; no polling happened."""
    nodes = await dht(10, config=NodeConfig(listen_ttl=TTL, poll_interval=30.0))
    node, writer = nodes[3], nodes[7]
    key = records.data_key("listen-refresh")
    alice = Identity.generate()
    watch = SubscribeWatch(node, key)
    lst = Listener(node, key, initial=False)
    listeners.append(lst)
    lst.start()
    await watch.wait(1)
    assert watch.calls[0][1] > 0, "no storing node accepted the subscription"

    got: list[Record] = []
    sent = [_rec(alice, key, seq) for seq in (1, 2, 3, 4)]
    for rec in sent[:2]:
        await writer.put([rec])
        got.append(await lst.next())

    # Past two lifetimes of the first subscription (storing nodes grant TTL seconds).
    await watch.wait_span(2.2 * TTL, timeout=4 * TTL + STEP)
    await writer.put([sent[2]])
    got.append(await lst.next())

    # A storing node (or anyone) repeats old and current records: none is yielded again.
    assert writer.address is not None and node.address is not None
    replay = writer.ds_args(key, [sent[0].raw, sent[2].raw, sent[1].raw])
    assert await asyncio.wait_for(writer.request(node.address, "ds_notify", replay), STEP) is True
    await writer.put([sent[3]])
    got.append(await lst.next())

    assert [r.raw for r in got] == [r.raw for r in sent]
    assert len(watch.calls) >= 5, f"subscription refreshed too rarely: {watch.calls}"
    assert all(accepted > 0 for _, accepted in watch.calls), watch.calls
    assert node.stats["rpc:ds_notify"] >= 4
    assert node.stats["listen-fallback-poll"] == 0
    holders = [n for n in nodes if node.address in n.subs.listeners(key, n.wallclock())]
    assert holders, "no storing node holds a live subscription after the refreshes"


@pytest.mark.timeout(20)
async def test_initial_true_yields_stored_records_initial_false_does_not(
    dht: StartDht, listeners: list[Listener]
) -> None:
    """``initial=True`` starts with what is already stored; ``initial=False`` starts with
    the first record stored after it subscribed."""
    nodes = await dht(10, config=FAST)
    writer = nodes[1]
    key = records.data_key("listen-initial")
    alice, bob = Identity.generate(), Identity.generate()
    old = _rec(alice, key, 7)
    await writer.put([old])

    with_initial = Listener(nodes[4], key, initial=True)
    listeners.append(with_initial)
    assert (await with_initial.next()).raw == old.raw

    watch = SubscribeWatch(nodes[6], key)
    without = Listener(nodes[6], key, initial=False)
    listeners.append(without)
    without.start()
    await watch.wait(1)
    assert watch.calls[0][1] > 0
    new = _rec(bob, key, 1)  # another slot: the old record would not be filtered as stale
    await writer.put([new])
    assert (await without.next()).raw == new.raw
    assert (await with_initial.next()).raw == new.raw
    assert nodes[6].stats["listen-fallback-poll"] == 0


@pytest.mark.timeout(20)
async def test_records_arrive_by_polling_when_no_storing_node_accepts(
    dht: StartDht, listeners: list[Listener]
) -> None:
    """Every subscription fails: records still arrive, by polling every ``poll_interval``,
    without repeats, and the fallback counter rises with each poll."""
    nodes = await dht(10, config=REFUSING)
    node, writer = nodes[2], nodes[8]
    key = records.data_key("listen-fallback")
    alice = Identity.generate()
    watch = SubscribeWatch(node, key)
    lst = Listener(node, key, initial=False)
    listeners.append(lst)
    lst.start()
    await watch.wait(1)

    first, second = _rec(alice, key, 1), _rec(alice, key, 2)
    await writer.put([first])
    assert (await lst.next()).raw == first.raw
    polls = node.stats["listen-fallback-poll"]
    assert polls >= 1  # (whether the first poll ran before the put or after it is a race)
    await writer.put([second])
    assert (await lst.next()).raw == second.raw
    assert node.stats["listen-fallback-poll"] > polls
    # Nothing was pushed: no storing node holds a subscription of ours.
    assert node.stats["rpc:ds_notify"] == 0
    assert not any(n.subs.listeners(key, n.wallclock()) for n in nodes)
    assert all(accepted == 0 for _, accepted in watch.calls)


@pytest.mark.timeout(20)
async def test_listen_survives_a_failed_subscription_attempt(
    dht: StartDht, listeners: list[Listener]
) -> None:
    """The first subscription attempt fails (the listening node knows no storing node
    yet: it has not joined). The listener must retry or poll, not stop for good: once
    the node has joined, a record put arrives."""
    nodes = await dht(10, config=FAST)
    writer = nodes[8]
    (node,) = await dht(1, config=FAST)  # alone: no contacts
    key = records.data_key("listen-subscribe-error")
    alice = Identity.generate()
    watch = SubscribeWatch(node, key)
    lst = Listener(node, key, initial=False)
    listeners.append(lst)
    lst.start()
    await watch.wait(1)
    assert watch.calls[0][1] == 0, "a node with no contacts cannot have subscribed"
    assert nodes[0].address is not None
    assert await node.bootstrap([nodes[0].address]) > 0
    rec = _rec(alice, key, 1)
    await writer.put([rec])
    # It arrives by a poll, or by the catch-up poll once the retried subscription holds.
    assert (await lst.next(timeout=2.0)).raw == rec.raw


@pytest.mark.timeout(20)
async def test_aclose_cancels_the_refresher_and_leaves_other_listeners_working(
    dht: StartDht, listeners: list[Listener]
) -> None:
    """``aclose()`` cancels the listener's refresh task and unregisters its queue; a second
    listener on the same key and node keeps receiving; no task is left without an owner."""
    nodes = await dht(10, config=FAST)
    node, writer = nodes[5], nodes[0]
    key = records.data_key("listen-close")
    alice = Identity.generate()
    watch = SubscribeWatch(node, key)
    first = Listener(node, key, initial=False)
    second = Listener(node, key, initial=False)
    listeners.extend([first, second])
    first.start()
    second.start()
    await watch.wait(1)  # one subscription serves both listeners
    assert node.listening(key) == 2
    rec1, rec2 = _rec(alice, key, 1), _rec(alice, key, 2)
    await writer.put([rec1])
    assert (await first.next()).raw == rec1.raw
    assert (await second.next()).raw == rec1.raw

    await first.close()
    assert node.listening(key) == 1, "aclose() did not unregister exactly its own listener"

    await writer.put([rec2])
    assert (await second.next()).raw == rec2.raw
    holders = [n for n in nodes if node.address in n.subs.listeners(key, n.wallclock())]
    assert holders, "no storing node held the subscription"
    await second.close()
    assert node.listening(key) == 0
    # The last listener gone, the node unsubscribed: a ping sent after the ds_unlisten on
    # the same socket pair is answered after it was handled (loopback keeps the order).
    for n in holders:
        assert n.address is not None
        await asyncio.wait_for(node.ping(n.address), STEP)
        assert node.address not in n.subs.listeners(key, n.wallclock())
    assert not _unowned_tasks(nodes)
    assert node.stats["task-error"] == 0


@pytest.mark.timeout(20)
async def test_breaking_out_of_async_for_stops_the_refresher(dht: StartDht) -> None:
    """``break`` out of ``async for`` (no explicit ``aclose``): once the abandoned
    generator is finalised, its refresh task is cancelled and its queue unregistered."""
    nodes = await dht(6, config=FAST)
    node, writer = nodes[4], nodes[1]
    key = records.data_key("listen-break")
    rec = _rec(Identity.generate(), key, 1)
    await writer.put([rec])

    got: list[Record] = []
    during: list[int] = []

    async def consume() -> None:
        async for r in node.listen(key, initial=True):
            got.append(r)
            during.append(node.listening(key))
            break

    await asyncio.wait_for(consume(), STEP)
    assert [r.raw for r in got] == [rec.raw]
    assert during == [1]
    # The loop's async-generator finaliser runs aclose() in a task of its own.
    for _ in range(100):
        if node.listening(key) == 0:
            break
        await asyncio.sleep(0)
    assert node.listening(key) == 0
    assert not _unowned_tasks(nodes)
