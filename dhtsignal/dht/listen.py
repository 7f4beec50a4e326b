"""Listening: one subscription cycle per listened key, however many listeners.

Theory of operation
-------------------
:class:`Listening` is the part of :class:`~dhtsignal.dht.node.Node` that keeps the
node's listened keys subscribed. It owns no I/O and no timer of its own: it works
through the node it belongs to (lookups, gets, RPCs, the node's timer heap, its events
and counters), which it holds a reference to.

For each key, a :class:`Subscription` goes round this cycle:

1. *subscribe*: a lookup of the key (``replicas`` closest), then ``ds_listen`` to each
   of the closest that speak our dialect; an answer that is a number is an acceptance;
2. once every storing node has answered or failed, a :class:`SubscriptionRenewed`
   reports how many accepted, and

   * some accepted: wait half ``listen_ttl`` and subscribe again; if the key was being
     polled, poll once first (records stored meanwhile were not pushed), then wait;
   * none accepted (or the lookup failed, or too many RPCs were in flight: counted
     ``listen-error``): poll with a get every ``poll_interval`` (counted
     ``listen-fallback-poll``) until a subscription is accepted again.

Records pushed by storing nodes (``ds_notify``, :meth:`Listening.on_notify`) and found
by polls come out as :class:`~dhtsignal.dht.events.RecordsReceived`. More listeners on
a key only count; the last one leaving ends the cycle and sends ``ds_unlisten`` to the
nodes that accepted (no answer awaited). A cycle step that finds its subscription gone
(the key unlistened, perhaps listened again since) does nothing.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from dhtsignal.dht.events import RecordsReceived, SubscriptionRenewed, ignore
from dhtsignal.dht.hosts import keys_of
from dhtsignal.dht.records import Record
from dhtsignal.dht.routing import DIALECT_DS, Contact
from dhtsignal.errors import DhtSignalError
from dhtsignal.wire.addr import Addr

if TYPE_CHECKING:
    from dhtsignal.dht.node import Node

log = logging.getLogger(__name__)


class SlotFilter:
    """The newest sequence number seen per slot, for one ``listen`` iterator: a record
    passes once, and never after a newer one of its slot. Bounded: an entry is dropped
    once its record has expired (a later copy of it is expired too, and refused as
    such), and past ``max_slots`` the oldest entry goes, so a stranger writing to ever
    new slots cannot grow it for the life of the listener.

    :param max_slots: slots remembered at most.
    """

    __slots__ = ("_seen", "max_slots")

    def __init__(self, max_slots: int = 4096) -> None:
        self.max_slots = max_slots
        self._seen: dict[tuple[bytes, int, bytes], tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def fresh(self, rec: Record, wallnow: float) -> bool:
        """Whether ``rec`` is live and newer than what its slot passed; if so it is noted.

        :param wallnow: wall-clock UNIX time.
        """
        if rec.expires <= wallnow:
            return False
        seen = self._seen
        old = seen.get(rec.slot)
        if old is not None and old[0] >= rec.seq and old[1] > wallnow:
            return False
        seen.pop(rec.slot, None)
        seen[rec.slot] = (rec.seq, rec.expires)
        if len(seen) > self.max_slots:
            for slot in [s for s, (_, exp) in seen.items() if exp <= wallnow]:
                del seen[slot]
            while len(seen) > self.max_slots:
                del seen[next(iter(seen))]
        return True


class PushBudget:
    """Pushes (``ds_notify``) awaiting an answer: in total, per listener host and per
    listener prefix. A listener that does not answer (a spoofed subscription, a flood of
    them from one block of addresses) holds at most its host's and its prefix's share, so
    pushes to listeners elsewhere keep flowing.

    :param total: pushes in flight at most.
    :param per_host: per listener host (IPv4 address, IPv6 /64).
    :param per_prefix: per listener prefix (IPv4 /24, IPv6 /48).
    """

    __slots__ = ("_hosts", "_prefixes", "in_flight", "per_host", "per_prefix", "total")

    def __init__(self, total: int, per_host: int, per_prefix: int) -> None:
        self.total = total
        self.per_host = per_host
        self.per_prefix = per_prefix
        self.in_flight = 0
        self._hosts: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}

    def take(self, listener: Addr) -> bool:
        """One more push to ``listener``; False (nothing taken) when a bound is reached."""
        host, prefix = keys_of(listener[0])
        if (
            self.in_flight >= self.total
            or self._hosts.get(host, 0) >= self.per_host
            or self._prefixes.get(prefix, 0) >= self.per_prefix
        ):
            return False
        self.in_flight += 1
        self._hosts[host] = self._hosts.get(host, 0) + 1
        self._prefixes[prefix] = self._prefixes.get(prefix, 0) + 1
        return True

    def release(self, listener: Addr) -> None:
        """A push to ``listener`` was answered or failed."""
        host, prefix = keys_of(listener[0])
        self.in_flight -= 1
        for table, k in ((self._hosts, host), (self._prefixes, prefix)):
            n = table.get(k, 0) - 1
            if n > 0:
                table[k] = n
            else:
                table.pop(k, None)

    def clear(self) -> None:
        """Forget every push (the node is closing)."""
        self.in_flight = 0
        self._hosts = {}
        self._prefixes = {}


class Subscription:
    """The subscription cycle of one listened key."""

    __slots__ = ("at", "count", "gap", "key")

    def __init__(self, key: bytes) -> None:
        self.key = key
        #: listeners on the key
        self.count = 1
        #: polled since the last accepted subscription: records may have gone unpushed
        self.gap = False
        #: the storing nodes that accepted the last subscription
        self.at: list[Addr] = []


class _Answers:
    """``ds_listen`` answers awaited from the storing nodes."""

    __slots__ = ("accepted", "left", "live")

    def __init__(self, left: int) -> None:
        self.left = left
        self.accepted: list[Addr] = []
        self.live = True


class Listening:
    """The listened keys of one node and their subscription cycles.

    :param node: the node it belongs to (lookups, gets, RPCs, timers, events, counters).
    :param timer_kind: the kind of the node's timer entries that are a subscription's
        next step; when one falls due, the node calls :meth:`timer_due`.
    """

    __slots__ = ("_kind", "_node", "_subs", "_via")

    #: pushed records whose pusher is remembered (:meth:`pushed_by`)
    MAX_VIA = 1024

    def __init__(self, node: Node, timer_kind: int) -> None:
        self._node = node
        self._kind = timer_kind
        self._subs: dict[bytes, Subscription] = {}
        self._via: dict[tuple[bytes, tuple[bytes, int, bytes], int], Addr] = {}

    def pushed_by(self, rec: Record) -> Addr | None:
        """The address that pushed ``rec`` to us (``ds_notify``), if it was pushed
        recently: the one address a reply to it may go to unasked (issue 10, item 7)."""
        return self._via.get((rec.key, rec.slot, rec.seq))

    def listen(self, key: bytes, now: float) -> None:
        """One more listener on ``key``: the first starts the subscription cycle."""
        sub = self._subs.get(key)
        if sub is not None:
            sub.count += 1
            return
        sub = self._subs[key] = Subscription(key)
        self._subscribe(sub, now)

    def unlisten(self, key: bytes, now: float) -> None:
        """One listener fewer on ``key``; the last one leaving unsubscribes."""
        sub = self._subs.get(key)
        if sub is None:
            return
        sub.count -= 1
        if sub.count > 0:
            return
        del self._subs[key]
        node = self._node
        for addr in sub.at:
            if node.closed:
                return
            try:
                node._rpc(addr, "ds_unlisten", node.ds_args(key), now, ignore)
            except DhtSignalError:  # too many RPCs in flight: the subscription just lapses
                return

    def listening(self, key: bytes) -> int:
        """How many listeners ``key`` has."""
        sub = self._subs.get(key)
        return 0 if sub is None else sub.count

    def holders(self, key: bytes) -> list[Addr]:
        """The storing nodes that accepted the last subscription of ``key``."""
        sub = self._subs.get(key)
        return [] if sub is None else list(sub.at)

    def clear(self) -> None:
        """Forget every subscription (the node is closing; nothing is sent)."""
        self._subs = {}
        self._via = {}

    def timer_due(self, sub: Subscription, now: float) -> None:
        """A subscription's wait is over: subscribe again (if it is still live)."""
        if self._live(sub):
            self._subscribe(sub, now)

    def on_notify(self, key: bytes, recs: list[Record], addr: Addr) -> bool:
        """Records pushed to us (``ds_notify``); False: we do not listen to ``key``."""
        if key not in self._subs:
            return False
        via = self._via
        for rec in recs:
            via[(rec.key, rec.slot, rec.seq)] = addr
        while len(via) > self.MAX_VIA:
            del via[next(iter(via))]
        if recs:
            self._node.events.append(RecordsReceived(key, recs, True))
        return True

    def _live(self, sub: Subscription) -> bool:
        return self._subs.get(sub.key) is sub

    def _subscribe(self, sub: Subscription, now: float) -> None:
        node = self._node
        node.start_lookup(
            sub.key,
            now,
            k=node.config.replicas,
            then=functools.partial(self._looked_up, sub),
        )

    def _looked_up(
        self, sub: Subscription, res: Any, error: DhtSignalError | None, now: float
    ) -> None:
        if not self._live(sub):
            return
        if error is not None:
            self._error(sub, error, now)
            return
        targets = [c for c in res.closest if c.dialect == DIALECT_DS]
        if not targets:
            self._subscribed(sub, [], now)
            return
        node = self._node
        answers = _Answers(len(targets))
        args = node.ds_args(sub.key, node.config.listen_ttl)
        for c in targets:
            try:
                node._rpc(
                    c.addr,
                    "ds_listen",
                    args,
                    now,
                    functools.partial(self._answered, sub, answers, c),
                )
            except DhtSignalError as exc:
                answers.live = False
                self._error(sub, exc, now)
                return

    def _error(self, sub: Subscription, error: DhtSignalError, now: float) -> None:
        self._node._stats["listen-error"] += 1
        log.debug("%s: listen %s: %s", self._node, sub.key.hex()[:12], error)
        self._subscribed(sub, [], now)

    def _answered(
        self,
        sub: Subscription,
        answers: _Answers,
        c: Contact,
        reply: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        if not answers.live:
            return
        answers.left -= 1
        if error is None and type(reply) in (int, float):
            answers.accepted.append(c.addr)
        if answers.left == 0 and self._live(sub):
            self._subscribed(sub, answers.accepted, now)

    def _subscribed(self, sub: Subscription, accepted: list[Addr], now: float) -> None:
        node = self._node
        cfg = node.config
        sub.at = accepted
        node.events.append(SubscriptionRenewed(sub.key, len(accepted)))
        if accepted:
            if sub.gap:  # catch up on what was stored while we polled
                sub.gap = False
                self._poll(sub, cfg.listen_ttl / 2, now)
            else:
                node._schedule(now + cfg.listen_ttl / 2, self._kind, sub)
            return
        sub.gap = True  # not subscribed for a while: records may go unpushed
        node._stats["listen-fallback-poll"] += 1
        self._poll(sub, cfg.poll_interval, now)

    def _poll(self, sub: Subscription, then_wait: float, now: float) -> None:
        self._node.start_get(
            sub.key,
            now,
            include_tombstones=True,
            then=functools.partial(self._polled, sub, then_wait),
        )

    def _polled(
        self,
        sub: Subscription,
        then_wait: float,
        held: Any,
        error: DhtSignalError | None,
        now: float,
    ) -> None:
        if not self._live(sub):
            return
        if error is not None:
            self._node._stats["listen-error"] += 1
            log.debug("%s: listen %s: %s", self._node, sub.key.hex()[:12], error)
        elif held.records:
            self._node.events.append(RecordsReceived(sub.key, held.records, False))
        self._node._schedule(now + then_wait, self._kind, sub)
