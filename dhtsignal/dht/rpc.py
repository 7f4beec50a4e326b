"""Answering RPCs: the server half of a node, without I/O.

Theory of operation
-------------------
:meth:`RequestHandler.handle` takes one decoded request, the address it came
from and the time, and returns an :class:`Outcome`: the response body to send
(or none), a contact to ping because its bucket is full, and notifications to
push to listeners. It never raises on remote input: a request it cannot use is
counted in :attr:`RequestHandler.stats` under a reason and yields no reply.

Two families of RPCs share the rpcudp framing:

* the stock ``kademlia`` ones (``ping``, ``stun``, ``store``, ``find_node``,
  ``find_value``), answered exactly as a stock node would so unmodified
  ``kademlia.network.Server`` nodes can route through us and keep plain values;
* ours, prefixed ``ds_``, whose first three arguments are the network id, the
  sender's routing ID and flags. A request from another network is dropped.

====================  =========================================  =========================
RPC                   arguments after (network, id, flags)       reply
====================  =========================================  =========================
``ds_ping``           —                                          ``[id, [ip, port]]``
``ds_find_node``      target                                     ``[contact, ...]``
``ds_find_value``     key, cursor                                ``[contacts, records, next]``
``ds_store``          ``[record, ...]`` (at most 4)              ``["ok" | reason, ...]``
``ds_store_find``     key, ``[record, ...]``                     ``[["ok" | reason, ...],
                                                                 [contact, ...]]``
``ds_listen``         key, ttl                                   granted ttl or reason
``ds_unlisten``       key                                        ``True``
``ds_notify``         key, ``[record, ...]``                     ``True`` / ``False``
``ds_leave``          —                                          none
====================  =========================================  =========================

``ds_leave`` is the one datagram a stopping node sends its contacts. It is a hint,
not a proof: the contact at the sender's address stops being handed out at once
(:meth:`~dhtsignal.dht.routing.RoutingTable.left`) and the node pings it once
(:attr:`Outcome.leaving`); only if that ping fails is it evicted. A stranger can
therefore not evict anyone, and at most hides a live contact for one ping.

Find replies (``ds_find_node``, ``ds_find_value``, ``ds_store_find`` and the stock
``find_node``/``find_value``) name only *good* contacts
(:meth:`~dhtsignal.dht.routing.RoutingTable.closest_good`).

``ds_store_find`` is a put's lookup step: the node stores the records (as
``ds_store``) and names its contacts closest to ``key`` (as ``ds_find_node``), so
a put costs one RPC per node it asks instead of a FIND_NODE and then a STORE.

A contact on the wire is ``[id, ip, port, dialect]``; the address a request came
from is the one we record, never one the sender claims. Find replies are built
by concatenating each contact's cached msgpack form (:attr:`Outcome.raw`), and
requests answered are counted in plain integers, folded into :attr:`stats` when
it is read.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.records import Record
from dhtsignal.dht.routing import (
    DIALECT_DS,
    DIALECT_STOCK,
    Contact,
    RoutingTable,
    pack_contacts,
    pack_stock_contacts,
)
from dhtsignal.dht.storage import LegacyStore, RecordStore, Subscriptions
from dhtsignal.errors import RecordRejected
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr, is_ip_literal
from dhtsignal.wire.codec import Request

FLAG_CLIENT = 0x01
MAX_STORE_BATCH = 4
#: Room for the reply body in one datagram (codec.MAX_DATAGRAM less header and slack).
REPLY_BUDGET = codec.MAX_DATAGRAM - codec.HEADER_BYTES - 40
_ID = 20
_PORT = operator.attrgetter("port")

NotifyHook = Callable[[bytes, list[Record], Addr], bool]


#: First item of the answer to a ``ds_ping`` of another network: ``[WRONG_NETWORK, ours]``.
WRONG_NETWORK = "wrong-network"


@dataclass(slots=True)
class Outcome:
    """What handling one request produced."""

    reply: Any = None
    has_reply: bool = False
    ping: Contact | None = None
    notify: list[tuple[Addr, bytes, list[bytes]]] | None = None
    raw: bytes | None = None
    """The reply body already msgpack-encoded (then ``reply`` is unused)."""
    leaving: Contact | None = None
    """A contact that said it leaves (``ds_leave``): ping it once, evict it if silent."""
    cut: bool = False
    """The reply was cut (or refused) for want of a validated address, or the sender is
    a client that may listen next: validate the address."""
    newcomer: int | None = None
    """The dialect of a sender that may become a contact but is not one at this address
    (or whose address is not validated): ping it, and admit it once it answers."""

    def body(self) -> bytes:
        """The reply body, msgpack-encoded."""
        return self.raw if self.raw is not None else codec.pack(self.reply)

    def result(self) -> Any:
        """The reply body as the requester decodes it (None: no reply)."""
        return codec.unpack(self.raw) if self.raw is not None else self.reply


def _is_id(x: object) -> bool:
    return type(x) is bytes and len(x) == _ID


def parse_contact(item: object) -> Contact | None:
    """A contact from a find reply (ours or stock), or None if malformed."""
    if type(item) is not list or len(item) not in (3, 4):
        return None
    nid, ip, port = item[0], item[1], item[2]
    dialect = item[3] if len(item) == 4 else DIALECT_STOCK
    if not _is_id(nid) or not is_ip_literal(ip):
        return None
    if type(port) is not int or not 0 < port < 65536 or dialect not in (DIALECT_STOCK, DIALECT_DS):
        return None
    return Contact(nid, ip, port, dialect)


class RequestHandler:
    """Answers requests for one node.

    :param own_id: our 20-byte routing ID.
    :param network: network id carried by our RPCs.
    :param table: the routing table (contacts are added as requests arrive).
    :param store: records held for others.
    :param legacy: plain values held for stock nodes.
    :param subs: listener subscriptions.
    :param wallclock: wall-clock UNIX time source (record expiry).
    :param accept_stock: answer the stock kademlia RPCs.
    """

    def __init__(
        self,
        own_id: bytes,
        network: str,
        table: RoutingTable,
        store: RecordStore,
        legacy: LegacyStore,
        subs: Subscriptions,
        wallclock: Callable[[], float],
        *,
        accept_stock: bool = True,
    ) -> None:
        self.own_id = own_id
        self.network = network
        self.table = table
        self.store = store
        self.legacy = legacy
        self.subs = subs
        self.wallclock = wallclock
        self.accept_stock = accept_stock
        self.on_notify: NotifyHook | None = None
        self._stats: Counter[str] = Counter()
        #: Requests answered, per RPC (plain ints: the hot path does no Counter update).
        self._calls = [0] * len(_RPC_NAMES)
        #: the time of the request being handled (find replies name good contacts)
        self._now = 0.0
        #: bytes the reply to the request being handled may take (None: no limit, the
        #: address is validated); set by the node before :meth:`handle`
        self.limit: int | None = None
        #: the routing ID that answered us from the request's (validated) address
        self.confirmed: bytes | None = None

    @property
    def stats(self) -> Counter[str]:
        """Counters by reason: ``rpc:NAME`` per request answered, ``drop:REASON``,
        ``refused:REASON``, ``stored``."""
        st = self._stats
        for name, n in zip(_RPC_NAMES, self._calls, strict=True):
            if n:
                st["rpc:" + name] = n
        return st

    def drop(self, reason: str) -> Outcome:
        """Count a refused request."""
        self._stats["drop:" + reason] += 1
        return Outcome()

    def handle(self, req: Request, addr: Addr, now: float) -> Outcome:
        """Answer one request.

        :param req: the decoded request.
        :param addr: where it came from.
        :param now: the node's monotonic clock (contact bookkeeping).
        """
        name, args = req.name, req.args
        entry = _DS.get(name)
        out = Outcome()
        self._now = now
        if entry is not None:
            arity, slot, fn = entry
            if len(args) != arity:
                return self.drop("arity")
            net, nid, flags = args[0], args[1], args[2]
            if net != self.network:
                out = self.drop("wrong-network")
                if name == "ds_ping" and type(net) is str:
                    # Say which network this node serves (a reply smaller than the
                    # request): a node joining through us with another --network can
                    # then say why nobody answered instead of "no bootstrap node".
                    out.reply, out.has_reply = [WRONG_NETWORK, self.network], True
                return out
            if type(nid) is not bytes or len(nid) != _ID or type(flags) is not int:
                return self.drop("bad-args")
            if not flags & FLAG_CLIENT and nid != self.own_id and name != "ds_leave":
                self._heard(nid, addr, DIALECT_DS, now, out)
            elif self.limit is not None and name != "ds_leave":
                # A client is never a contact, but it listens: validate its address now,
                # so its ds_listen after this lookup is granted.
                out.cut = True
            self._calls[slot] += 1
            fn(self, args, addr, out)
            return out
        sentry = _STOCK.get(name)
        if sentry is None:
            return self.drop("unknown-rpc")
        if not self.accept_stock:
            return self.drop("stock-disabled")
        arity, slot, fn = sentry
        if len(args) != arity:
            return self.drop("arity")
        if name != "stun":
            sender = args[0]
            if not _is_id(sender):
                return self.drop("bad-args")
            if sender != self.own_id:
                # A new contact is stock; a known one keeps what it speaks.
                self._heard(sender, addr, DIALECT_STOCK, now, out)
        self._calls[slot] += 1
        fn(self, args, addr, out)
        return out

    def _heard(self, nid: bytes, addr: Addr, dialect: int, now: float, out: Outcome) -> None:
        """A request named ``nid`` as its sender. Only a contact known at a validated
        address is refreshed; anything else is a newcomer for the node to ping: a
        request's source may be spoofed, so its claimed ID and address never enter the
        table by themselves (issue 10 item 5)."""
        table = self.table
        if nid == self.confirmed and self.limit is None:
            # The ID that answered a request of ours from this very address.
            out.ping = table.heard_from(nid, addr[0], addr[1], dialect, now)
            return
        known = table.get(nid)
        if known is None or self.limit is not None:
            out.newcomer = dialect
        # Another address claiming a known ID: the known contact is pinged.
        if known is not None and (
            self.limit is None or known.port != addr[1] or known.ip != addr[0]
        ):
            out.ping = table.refresh(known, addr[0], addr[1], dialect, now)

    def _packed_fit(
        self, found: list[Contact], room: int | None, out: Outcome, stock: bool = False
    ) -> bytes:
        """``found`` packed (in the stock form if ``stock``), cut by :meth:`_fit` when it
        does not fit in ``room`` bytes (None: no limit). Packing is a join of cached
        bytes, so the list is packed first and measured contact by contact only when
        it is too large."""
        pack = pack_stock_contacts if stock else pack_contacts
        raw = pack(found)
        # _fit counts the array header as 3 bytes, whatever its size: the same here.
        if room is not None and len(raw) - len(codec.array_header(len(found))) + 3 > room:
            raw = pack(self._fit(found, room, out, stock))
        return raw

    def _fit(
        self, found: list[Contact], room: int, out: Outcome, stock: bool = False
    ) -> list[Contact]:
        """The first of ``found`` whose packed list fits in ``room`` bytes (the reply to
        an address not yet validated)."""
        size = 3
        for i, c in enumerate(found):
            size += len(c.packed()) - stock
            if size > room:
                self._stats["reply-cut"] += 1
                out.cut = True
                return found[:i]
        return found

    # -- stock RPCs (args: sender id, then the RPC's own) -------------------------------

    def _ping(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        out.reply = self.own_id
        out.has_reply = True

    def _stun(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        out.reply = [addr[0], addr[1]]
        out.has_reply = True

    def _store(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        out.has_reply = True
        try:
            self.legacy.put(args[1], args[2], self.wallclock())
        except RecordRejected as exc:
            self._stats["refused:" + exc.reason] += 1
            out.reply = False
            return
        out.reply = True

    def _neighbours(self, key: bytes, addr: Addr) -> list[Contact]:
        """The k contacts closest to ``key``, leaving out any at the requester's address."""
        k = self.table.ksize
        found = self.table.closest_good(key, k + 1, self._now)
        ip, port = addr
        if port in map(_PORT, found):  # rarely: only then compare whole addresses
            found = [c for c in found if c.port != port or c.ip != ip]
        del found[k:]
        return found

    def _find_node(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[1]
        if type(key) is not bytes or len(key) != _ID:
            self._stats["drop:bad-args"] += 1
            return
        found = self._neighbours(key, addr)
        out.raw = self._packed_fit(found, self.limit, out, stock=True)
        out.has_reply = True

    def _find_value(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[1]
        if _is_id(key):
            value = self.legacy.get(key, self.wallclock())
            if value is not None:
                if self.limit is None or len(codec.pack(value)) + 8 <= self.limit:
                    out.reply = {"value": value}
                    out.has_reply = True
                    return
                self._stats["reply-cut"] += 1  # contacts instead: ask again once validated
                out.cut = True
        self._find_node(args, addr, out)

    # -- dhtsignal RPCs (args: network, sender id, flags, then the RPC's own) -----------

    def _ds_ping(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        out.reply = [self.own_id, [addr[0], addr[1]]]
        out.has_reply = True

    def _ds_find_node(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[3]
        if type(key) is not bytes or len(key) != _ID:
            self._stats["drop:bad-args"] += 1
            return
        found = self._neighbours(key, addr)
        out.raw = self._packed_fit(found, self.limit, out)
        out.has_reply = True

    def _ds_find_value(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, cursor = args[3], args[4]
        if not _is_id(key) or type(cursor) is not int or cursor < 0:
            self._stats["drop:bad-args"] += 1
            return
        found = self._neighbours(key, addr) if cursor == 0 else []
        held = sorted(self.store.get(key, self.wallclock()), key=lambda r: r.raw)
        sizes = [len(c._packed or c.packed()) for c in found]
        # 1 + 3 + 5: the reply's array header, the page's, the cursor's int
        total = REPLY_BUDGET
        if self.limit is not None and self.limit - 9 < REPLY_BUDGET:
            total = self.limit - 9
            out.cut = True  # perhaps: validate the address for the next page
        budget = total - len(codec.array_header(len(found))) - sum(sizes)
        while found and (budget < 0 or (held[cursor:] and len(held[cursor].raw) + 3 > budget)):
            found.pop()  # make room for at least one record beside the contacts
            sizes.pop()
            budget = total - len(codec.array_header(len(found))) - sum(sizes)
        page: list[bytes] = []
        nxt: int | None = None
        for i in range(cursor, len(held)):
            size = len(held[i].raw) + 3
            if size > budget and (page or cursor == 0):
                nxt = i
                break
            page.append(held[i].raw)
            budget -= size
        out.raw = b"\x93" + pack_contacts(found) + codec.pack(page) + codec.pack(nxt)
        out.has_reply = True

    def _ds_store(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        batch = args[3]
        if type(batch) is not list or not 0 < len(batch) <= MAX_STORE_BATCH:
            self._stats["drop:bad-args"] += 1
            return
        now = self.wallclock()
        results: list[str] = []
        for rec in records.check_all(batch, now, self._stats, network=self.network):
            if type(rec) is str:
                results.append(rec)
                continue
            assert type(rec) is Record
            try:
                fresh = self.store.put(rec, addr, now)
            except RecordRejected as exc:
                self._stats["refused:" + exc.reason] += 1
                results.append(exc.reason)
                continue
            results.append("ok")
            self._stats["stored"] += 1
            if fresh:
                for listener in self.subs.listeners(rec.key, now):
                    if listener != addr:
                        if out.notify is None:
                            out.notify = []
                        out.notify.append((listener, rec.key, [rec.raw]))
        out.reply = results
        out.has_reply = True

    def _ds_store_find(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[3]
        if not _is_id(key):
            self._stats["drop:bad-args"] += 1
            return
        self._ds_store([args[0], args[1], args[2], args[4]], addr, out)
        if out.has_reply:
            results, out.reply = out.reply, None
            packed = codec.pack(results)
            room = None if self.limit is None else self.limit - 1 - len(packed)
            out.raw = b"\x92" + packed + self._packed_fit(self._neighbours(key, addr), room, out)

    def _ds_listen(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, ttl = args[3], args[4]
        if not _is_id(key) or type(ttl) not in (int, float):
            self._stats["drop:bad-args"] += 1
            return
        out.has_reply = True
        if self.limit is not None:
            # Pushes go only to addresses that asked: one that never answered a request
            # of ours may be a victim's, spoofed (issue 10 item 1).
            self._stats["refused:unvalidated"] += 1
            out.cut = True
            out.reply = "unvalidated"
            return
        try:
            out.reply = self.subs.add(key, addr, float(ttl), self.wallclock())
        except RecordRejected as exc:
            self._stats["refused:" + exc.reason] += 1
            out.reply = exc.reason

    def _ds_unlisten(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        if _is_id(args[3]):
            self.subs.remove(args[3], addr)
        out.reply = True
        out.has_reply = True

    def _ds_notify(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, batch = args[3], args[4]
        if not _is_id(key) or type(batch) is not list or len(batch) > MAX_STORE_BATCH:
            self._stats["drop:bad-args"] += 1
            return
        good = records.checked(batch, self.wallclock(), self._stats, key=key, network=self.network)
        out.reply = self.on_notify(key, good, addr) if self.on_notify is not None else False
        out.has_reply = True

    def _ds_leave(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        if not args[2] & FLAG_CLIENT:
            out.leaving = self.table.left(args[1], addr[0], addr[1])


_Handler = Callable[[RequestHandler, list[Any], Addr, Outcome], None]

#: Our RPCs: name -> (number of arguments, counter slot, handler).
_DS: dict[str, tuple[int, int, _Handler]] = {}
#: The stock kademlia RPCs, same layout.
_STOCK: dict[str, tuple[int, int, _Handler]] = {}
_RPC_NAMES: list[str] = []


def _register(table: dict[str, tuple[int, int, _Handler]], name: str, arity: int) -> None:
    fn: _Handler = getattr(RequestHandler, "_" + name)
    table[name] = (arity, len(_RPC_NAMES), fn)
    _RPC_NAMES.append(name)


for _name, _arity in (
    ("ds_ping", 0),
    ("ds_find_node", 1),
    ("ds_find_value", 2),
    ("ds_store", 1),
    ("ds_store_find", 2),
    ("ds_listen", 2),
    ("ds_unlisten", 1),
    ("ds_notify", 2),
    ("ds_leave", 0),
):
    _register(_DS, _name, 3 + _arity)
for _name, _arity in (("ping", 1), ("stun", 0), ("store", 3), ("find_node", 2), ("find_value", 2)):
    _register(_STOCK, _name, _arity)
