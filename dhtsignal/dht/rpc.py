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
``ds_listen``         key, ttl                                   granted ttl or reason
``ds_unlisten``       key                                        ``True``
``ds_notify``         key, ``[record, ...]``                     ``True`` / ``False``
====================  =========================================  =========================

A contact on the wire is ``[id, ip, port, kind]``; the address a request came
from is the one we record, never one the sender claims.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.records import Record
from dhtsignal.dht.routing import KIND_DS, KIND_STOCK, Contact, RoutingTable
from dhtsignal.dht.storage import Addr, LegacyStore, RecordStore, Subscriptions
from dhtsignal.errors import RecordRejected
from dhtsignal.wire import codec
from dhtsignal.wire.codec import Request

FLAG_CLIENT = 0x01
MAX_STORE_BATCH = 4
#: Room for the reply body in one datagram (codec.MAX_DATAGRAM less header and slack).
REPLY_BUDGET = codec.MAX_DATAGRAM - codec.HEADER_BYTES - 40
_ID = 20

NotifyHook = Callable[[bytes, list[Record], Addr], bool]


@dataclass(slots=True)
class Outcome:
    """What handling one request produced."""

    reply: Any = None
    has_reply: bool = False
    ping: Contact | None = None
    notify: list[tuple[Addr, bytes, list[bytes]]] = field(default_factory=list)


def _is_id(x: object) -> bool:
    return type(x) is bytes and len(x) == _ID


def parse_contact(item: object) -> Contact | None:
    """A contact from a find reply (ours or stock), or None if malformed."""
    if type(item) is not list or len(item) not in (3, 4):
        return None
    nid, ip, port = item[0], item[1], item[2]
    kind = item[3] if len(item) == 4 else KIND_STOCK
    if not _is_id(nid) or type(ip) is not str or not 0 < len(ip) <= 64:
        return None
    if type(port) is not int or not 0 < port < 65536 or kind not in (KIND_STOCK, KIND_DS):
        return None
    return Contact(nid, ip, port, kind)


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
        self.stats: Counter[str] = Counter()
        self._dispatch: dict[str, Callable[[list[Any], Addr, Outcome], None]] = {
            "ds_ping": self._ds_ping,
            "ds_find_node": self._ds_find_node,
            "ds_find_value": self._ds_find_value,
            "ds_store": self._ds_store,
            "ds_listen": self._ds_listen,
            "ds_unlisten": self._ds_unlisten,
            "ds_notify": self._ds_notify,
        }
        self._stock: dict[str, Callable[[list[Any], Addr, Outcome], None]] = {
            "ping": self._ping,
            "stun": self._stun,
            "store": self._store,
            "find_node": self._find_node,
            "find_value": self._find_value,
        }
        self._arity = {
            "ds_ping": 0,
            "ds_find_node": 1,
            "ds_find_value": 2,
            "ds_store": 1,
            "ds_listen": 2,
            "ds_unlisten": 1,
            "ds_notify": 2,
        }
        self._stock_arity = {"ping": 1, "stun": 0, "store": 3, "find_node": 2, "find_value": 2}

    def drop(self, reason: str) -> Outcome:
        """Count a refused request."""
        self.stats["drop:" + reason] += 1
        return Outcome()

    def handle(self, req: Request, addr: Addr, now: float) -> Outcome:
        """Answer one request.

        :param req: the decoded request.
        :param addr: where it came from.
        :param now: the node's monotonic clock (contact bookkeeping).
        """
        name, args = req.name, req.args
        fn = self._dispatch.get(name)
        out = Outcome()
        if fn is not None:
            if len(args) != 3 + self._arity[name]:
                return self.drop("arity")
            net, nid, flags = args[0], args[1], args[2]
            if net != self.network:
                return self.drop("wrong-network")
            if not _is_id(nid) or type(flags) is not int:
                return self.drop("bad-args")
            if not flags & FLAG_CLIENT and nid != self.own_id:
                out.ping = self.table.add_contact(Contact(nid, addr[0], addr[1], KIND_DS), now)
            self.stats["rpc:" + name] += 1
            fn(args[3:], addr, out)
            return out
        sfn = self._stock.get(name)
        if sfn is None:
            return self.drop("unknown-rpc")
        if not self.accept_stock:
            return self.drop("stock-disabled")
        if len(args) != self._stock_arity[name]:
            return self.drop("arity")
        if name != "stun":
            if not _is_id(args[0]):
                return self.drop("bad-args")
            if self.table.get(args[0]) is None and args[0] != self.own_id:
                out.ping = self.table.add_contact(
                    Contact(args[0], addr[0], addr[1], KIND_STOCK), now
                )
            elif (c := self.table.get(args[0])) is not None:
                self.table.add_contact(c, now)
        self.stats["rpc:" + name] += 1
        sfn(args[1:] if name != "stun" else args, addr, out)
        return out

    # -- stock RPCs ---------------------------------------------------------------------

    def _reply(self, out: Outcome, value: Any) -> None:
        out.reply = value
        out.has_reply = True

    def _ping(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        self._reply(out, self.own_id)

    def _stun(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        self._reply(out, [addr[0], addr[1]])

    def _store(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, value = args
        try:
            self.legacy.put(key, value, self.wallclock())
        except RecordRejected as exc:
            self.stats["refused:" + exc.reason] += 1
            self._reply(out, False)
            return
        self._reply(out, True)

    def _neighbours(self, key: bytes, addr: Addr) -> list[Contact]:
        found = self.table.closest(key, self.table.ksize + 1)
        ip, port = addr
        return [c for c in found if c.port != port or c.ip != ip][: self.table.ksize]

    def _find_node(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[0]
        if not _is_id(key):
            self.stats["drop:bad-args"] += 1
            return
        self._reply(out, [[c.id, c.ip, c.port] for c in self._neighbours(key, addr)])

    def _find_value(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key = args[0]
        if _is_id(key):
            value = self.legacy.get(key, self.wallclock())
            if value is not None:
                self._reply(out, {"value": value})
                return
        self._find_node(args, addr, out)

    # -- dhtsignal RPCs -----------------------------------------------------------------

    def _ds_ping(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        self._reply(out, [self.own_id, [addr[0], addr[1]]])

    def _ds_find_node(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        if not _is_id(args[0]):
            self.stats["drop:bad-args"] += 1
            return
        self._reply(out, [c.wire() for c in self._neighbours(args[0], addr)])

    def _ds_find_value(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, cursor = args
        if not _is_id(key) or type(cursor) is not int or cursor < 0:
            self.stats["drop:bad-args"] += 1
            return
        contacts = [c.wire() for c in self._neighbours(key, addr)] if cursor == 0 else []
        held = sorted(self.store.get(key, self.wallclock()), key=lambda r: r.raw)
        budget = REPLY_BUDGET - len(codec.pack(contacts))
        while held[cursor:] and contacts and len(held[cursor].raw) + 3 > budget:
            contacts.pop()  # make room for at least one record beside the contacts
            budget = REPLY_BUDGET - len(codec.pack(contacts))
        page: list[bytes] = []
        nxt: int | None = None
        for i in range(cursor, len(held)):
            size = len(held[i].raw) + 3
            if size > budget and (page or cursor == 0):
                nxt = i
                break
            page.append(held[i].raw)
            budget -= size
        self._reply(out, [contacts, page, nxt])

    def _ds_store(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        batch = args[0]
        if type(batch) is not list or not 0 < len(batch) <= MAX_STORE_BATCH:
            self.stats["drop:bad-args"] += 1
            return
        now = self.wallclock()
        results: list[str] = []
        for raw in batch:
            try:
                rec = records.decode(raw)
                records.validate(rec, now)
                fresh = self.store.put(rec, addr, now)
            except RecordRejected as exc:
                self.stats["refused:" + exc.reason] += 1
                results.append(exc.reason)
                continue
            results.append("ok")
            self.stats["stored"] += 1
            if fresh:
                for listener in self.subs.listeners(rec.key, now):
                    if listener != addr:
                        out.notify.append((listener, rec.key, [rec.raw]))
        self._reply(out, results)

    def _ds_listen(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, ttl = args
        if not _is_id(key) or type(ttl) not in (int, float):
            self.stats["drop:bad-args"] += 1
            return
        try:
            granted = self.subs.add(key, addr, float(ttl), self.wallclock())
        except RecordRejected as exc:
            self.stats["refused:" + exc.reason] += 1
            self._reply(out, exc.reason)
            return
        self._reply(out, granted)

    def _ds_unlisten(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        if _is_id(args[0]):
            self.subs.remove(args[0], addr)
        self._reply(out, True)

    def _ds_notify(self, args: list[Any], addr: Addr, out: Outcome) -> None:
        key, batch = args
        if not _is_id(key) or type(batch) is not list or len(batch) > MAX_STORE_BATCH:
            self.stats["drop:bad-args"] += 1
            return
        now = self.wallclock()
        good: list[Record] = []
        for raw in batch:
            try:
                rec = records.decode(raw)
                records.validate(rec, now)
            except RecordRejected as exc:
                self.stats["refused:" + exc.reason] += 1
                continue
            if rec.key != key:
                self.stats["refused:wrong-key"] += 1
                continue
            good.append(rec)
        wanted = self.on_notify(key, good, addr) if self.on_notify is not None else False
        self._reply(out, wanted)
