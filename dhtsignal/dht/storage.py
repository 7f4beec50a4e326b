"""What a node stores for others: signed records, legacy values, listeners.

Theory of operation
-------------------
:class:`RecordStore` keeps verified records per key, one per slot (see
:mod:`dhtsignal.dht.records`). Everything a remote party can grow is bounded:
records per key, slots per signer under one key, keys, total bytes, and bytes and
records per source host (IPv4 address, IPv6 /64) and per source prefix (IPv4 /24, IPv6
/48; :mod:`dhtsignal.dht.hosts`), whatever ports the sender uses.
Expired records are dropped lazily on access and by :meth:`RecordStore.expire`.

Fairness when full: a record that finds the store full (keys or bytes) is not refused
if it comes from a prefix lighter than the heaviest one; the heaviest prefix's oldest
records make room instead. A flood from a few prefixes therefore fills the store only
with itself, and an honest new key from elsewhere is still stored; the flooding
prefix's own next record is refused ``store-full``.

Node-ID keys enforce "first live claim wins": while a live CLAIM or PRESENCE
record of one signer is held under a node key, records of any other signer under
that key are refused with ``id-taken``.

:class:`LegacyStore` holds plain values written by stock ``kademlia`` nodes
(``store`` RPC): one value per key, last writer wins (their semantics), bounded
and expiring. Our own nodes never read it for their records.

:class:`Subscriptions` remembers who listens on which key until when, bounded
per key, per host, per prefix and in total.

Record types are bound to the keys they may live under. A live CLAIM or PRESENCE record
proves its key is a node key (it was checked to be ``node_key`` of its label), a ROOM
record that its key is a room key. Under a proven key, records of other types are junk:
they are refused (``wrong-type``), and those stored before the proof came are dropped
when it comes. So records from strangers' keys cannot fill a label's key before its
owner claims it (``key-full``): the claim evicts them.

No I/O here; every method takes ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht.hosts import keys_of
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.errors import RecordRejected
from dhtsignal.wire.addr import Addr

_NODE_TYPES = (RecordType.CLAIM, RecordType.PRESENCE)
#: The types that may live under a key a record of each type proves the kind of.
_KIND: dict[int, tuple[int, ...]] = {
    RecordType.CLAIM: _NODE_TYPES,
    RecordType.PRESENCE: _NODE_TYPES,
    RecordType.ROOM: (RecordType.ROOM,),
}


def _proves(record: Record) -> tuple[int, ...] | None:
    """The types allowed under ``record``'s key if it proves the key's kind, else None."""
    return None if record.is_tombstone else _KIND.get(record.type)


@dataclass(frozen=True)
class StorageLimits:
    """Bounds on what remote parties can make a node keep."""

    max_keys: int = 50_000
    """Distinct keys held."""
    max_values_per_key: int = 64
    """Records (slots) per key."""
    max_slots_per_signer: int = 2
    """Records (slots) one signer holds under one key; its next slot is refused
    (``signer-full``), so one stranger key cannot fill a victim's inbox key. Two fit a
    node ID's claim and presence, and a peer's offer and answer crossing in glare."""
    max_bytes: int = 64 * 1024 * 1024
    """Total encoded record bytes held."""
    max_records: int = 50_000
    """Records held in total (each costs about 2 KiB of memory beyond its encoding)."""
    max_bytes_per_source: int = 512 * 1024
    """Encoded record bytes stored on behalf of one source host (an IPv4 address or
    IPv6 /64, whatever its ports)."""
    max_records_per_source: int = 2_000
    """Records stored on behalf of one source host."""
    max_bytes_per_prefix: int = 2 * 1024 * 1024
    """Encoded record bytes stored on behalf of one source prefix (IPv4 /24, IPv6 /48)."""
    max_records_per_prefix: int = 8_000
    """Records stored on behalf of one source prefix."""
    legacy_max_keys: int = 10_000
    """Plain values kept for stock kademlia nodes."""
    legacy_max_value: int = 1_024
    """Largest plain value accepted, bytes."""
    legacy_ttl: float = 3600.0
    """How long a plain value is kept without being stored again, seconds."""
    max_listeners_per_key: int = 64
    """Subscriptions per key."""
    max_listens_per_source: int = 256
    """Subscriptions held for one source host (IPv4 address, IPv6 /64)."""
    max_listens_per_prefix: int = 1_024
    """Subscriptions held for one source prefix (IPv4 /24, IPv6 /48)."""
    max_listens: int = 20_000
    """Subscriptions held in total."""
    max_listen_ttl: float = 120.0
    """Longest subscription granted, seconds."""


@dataclass(slots=True)
class _Held:
    record: Record
    source: Addr


@dataclass(slots=True)
class _Usage:
    bytes: int = 0
    records: int = 0


class RecordStore:
    """Verified records held for others.

    :param limits: the bounds.
    """

    def __init__(self, limits: StorageLimits) -> None:
        self.limits = limits
        self._keys: dict[bytes, dict[tuple[bytes, int, bytes], _Held]] = {}
        self._usage: dict[str, _Usage] = {}
        self._prefix_usage: dict[str, _Usage] = {}
        #: each prefix's records, oldest first (the ones evicted when the store is full)
        self._by_prefix: dict[str, dict[tuple[bytes, tuple[bytes, int, bytes]], None]] = {}
        self.total_bytes = 0
        self.total_records = 0
        #: records dropped to make room for a lighter prefix
        self.evicted = 0
        #: the prefix holding the most records, if known (None: scan when needed)
        self._heavy: str | None = None

    def __len__(self) -> int:
        return self.total_records

    def keys(self) -> Iterator[bytes]:
        """Keys with at least one record (possibly expired)."""
        return iter(list(self._keys))

    def usage(self, source: Addr) -> tuple[int, int, int, int]:
        """``(host bytes, host records, prefix bytes, prefix records)`` held for ``source``'s
        host and prefix."""
        host, prefix = keys_of(source[0])
        h = self._usage.get(host) or _Usage()
        p = self._prefix_usage.get(prefix) or _Usage()
        return h.bytes, h.records, p.bytes, p.records

    def _account(self, key: bytes, source: Addr, record: Record, sign: int) -> None:
        host, prefix = keys_of(source[0])
        size = sign * len(record.raw)
        for table, k in ((self._usage, host), (self._prefix_usage, prefix)):
            use = table.get(k)
            if use is None:
                use = table[k] = _Usage()
            use.bytes += size
            use.records += sign
            if use.records <= 0:
                del table[k]
        heavy = self._heavy
        if sign > 0:
            if heavy is not None and heavy != prefix:
                h = self._prefix_usage.get(heavy)
                p = self._prefix_usage.get(prefix)
                if h is None or (p is not None and p.records > h.records):
                    self._heavy = prefix
        elif prefix == heavy:
            self._heavy = None  # it shrank: another may be heavier now
        order = self._by_prefix.get(prefix)
        if sign > 0:
            if order is None:
                order = self._by_prefix[prefix] = {}
            order[(key, record.slot)] = None
        elif order is not None:
            order.pop((key, record.slot), None)
            if not order:
                del self._by_prefix[prefix]
        self.total_bytes += size
        self.total_records += sign

    def _drop(self, key: bytes, slot: tuple[bytes, int, bytes]) -> None:
        slots = self._keys[key]
        held = slots.pop(slot)
        self._account(key, held.source, held.record, -1)
        if not slots:
            del self._keys[key]

    def _live(self, key: bytes, now: float) -> dict[tuple[bytes, int, bytes], _Held]:
        slots = self._keys.get(key)
        if not slots:
            return {}
        for slot in [s for s, h in slots.items() if h.record.expires <= now]:
            self._drop(key, slot)
        return self._keys.get(key, {})

    def owner(self, key: bytes, now: float) -> bytes | None:
        """The signer holding the live node-ID claim under ``key``, if any."""
        for held in self._live(key, now).values():
            r = held.record
            if r.type in _NODE_TYPES and not r.is_tombstone:
                return r.signer
        return None

    def put(self, record: Record, source: Addr, now: float) -> bool:
        """Store a verified, validated record.

        :returns: True if it was new (listeners should hear of it), False if it
            repeated what was held.
        :raises RecordRejected: ``stale-seq``, ``id-taken``, ``signer-full``,
            ``key-full``, ``quota`` or ``store-full``.
        """
        slots = self._live(record.key, now)
        held = slots.get(record.slot)
        if held is not None:
            if record.seq < held.record.seq:
                raise RecordRejected("stale-seq", f"have seq {held.record.seq}")
            if record.seq == held.record.seq:
                if record.raw == held.record.raw:
                    return False
                raise RecordRejected("stale-seq", "same seq, different content")
        if record.type in _NODE_TYPES:
            owner = self.owner(record.key, now)
            if owner is not None and owner != record.signer:
                raise RecordRejected("id-taken", "another key holds a live claim on this node id")
        allowed = _proves(record)
        if allowed is not None:
            junk = [slot for slot, h in slots.items() if h.record.type not in allowed]
            for slot in junk:
                self._drop(record.key, slot)
                self.evicted += 1
            slots = self._keys.get(record.key, {})
        else:
            for h in slots.values():
                proven = _proves(h.record)
                if proven is not None and record.type not in proven:
                    raise RecordRejected("wrong-type", "this key holds another kind of record")
        lim = self.limits
        if held is None:
            mine = sum(1 for signer, _, _ in slots if signer == record.signer)
            if mine >= lim.max_slots_per_signer:
                raise RecordRejected(
                    "signer-full", f"{lim.max_slots_per_signer} slots per signer per key"
                )
            if len(slots) >= lim.max_values_per_key:
                raise RecordRejected("key-full", f"{lim.max_values_per_key} values per key")
        grow = len(record.raw) - (len(held.record.raw) if held else 0)
        hb, hr, pb, pr = self.usage(source)  # the quotas hold for a first record too
        if held is not None and keys_of(held.source[0]) == keys_of(source[0]):
            # Replacing its own record: only the size changes, so a host at its
            # quota can still refresh what it stored.
            add_bytes, add_records = grow, 0
        else:
            add_bytes, add_records = len(record.raw), 1
        if hb + add_bytes > lim.max_bytes_per_source:
            raise RecordRejected("quota", f"host {source[0]} is over max_bytes_per_source")
        if hr + add_records > lim.max_records_per_source:
            raise RecordRejected("quota", f"host {source[0]} is over max_records_per_source")
        if pb + add_bytes > lim.max_bytes_per_prefix:
            raise RecordRejected("quota", f"the prefix of {source[0]} is over max_bytes_per_prefix")
        if pr + add_records > lim.max_records_per_prefix:
            raise RecordRejected(
                "quota", f"the prefix of {source[0]} is over max_records_per_prefix"
            )
        new_key = held is None and not slots
        if new_key and len(self._keys) >= lim.max_keys:
            self._make_room(source, record.key, lambda: len(self._keys) < lim.max_keys, now)
            if len(self._keys) >= lim.max_keys:
                raise RecordRejected("store-full", f"{lim.max_keys} keys (max_keys)")
        if held is None and self.total_records >= lim.max_records:
            self._make_room(source, record.key, lambda: self.total_records < lim.max_records, now)
            if self.total_records >= lim.max_records:
                raise RecordRejected("store-full", f"{lim.max_records} records (max_records)")
        if self.total_bytes + grow > lim.max_bytes:
            self._make_room(
                source, record.key, lambda: self.total_bytes + grow <= lim.max_bytes, now
            )
            if self.total_bytes + grow > lim.max_bytes:
                raise RecordRejected("store-full", f"{lim.max_bytes} bytes (max_bytes)")
        if held is not None:
            self._drop(record.key, record.slot)
        self._keys.setdefault(record.key, {})[record.slot] = _Held(record, source)
        self._account(record.key, source, record, +1)
        return True

    def _make_room(self, source: Addr, keep: bytes, enough: Callable[[], bool], now: float) -> None:
        """The store is full: drop the oldest records of the heaviest prefix (by records
        held) while it is heavier than ``source``'s, until ``enough()`` (at most
        ``max_values_per_key`` + 1 records: one key's worth)."""
        mine = keys_of(source[0])[1]
        mine_n = (self._prefix_usage.get(mine) or _Usage()).records
        for _ in range(self.limits.max_values_per_key + 1):
            if enough() or not self._prefix_usage:
                return
            heavy = self._heavy
            if heavy is None or heavy not in self._prefix_usage:
                usage = self._prefix_usage
                heavy = self._heavy = max(usage, key=lambda p: usage[p].records)
            if heavy == mine or self._prefix_usage[heavy].records <= mine_n + 1:
                return
            order = self._by_prefix.get(heavy)
            if not order:
                return
            key, slot = next(iter(order))
            if key == keep:  # never evict from the key being written: pick its next
                key, slot = next(iter(k for k in order if k[0] != keep), (key, slot))
                if key == keep:
                    return
            self._drop(key, slot)
            self.evicted += 1

    def get(self, key: bytes, now: float) -> list[Record]:
        """Live records (tombstones included) under ``key``."""
        return [h.record for h in self._live(key, now).values()]

    def expire(self, now: float) -> int:
        """Drop every expired record; returns how many were dropped."""
        before = self.total_records
        for key in list(self._keys):
            self._live(key, now)
        return before - self.total_records

    def dump(self, now: float) -> list[tuple[bytes, Addr]]:
        """Live records with their sources, for persistence."""
        return [
            (h.record.raw, h.source)
            for key in list(self._keys)
            for h in self._live(key, now).values()
        ]


class LegacyStore:
    """Plain values from stock kademlia nodes: bounded, expiring, last writer wins."""

    def __init__(self, limits: StorageLimits) -> None:
        self.limits = limits
        self._values: OrderedDict[bytes, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def put(self, key: bytes, value: Any, now: float, expires: float | None = None) -> None:
        """Keep ``value`` under ``key``, evicting the oldest key when full.

        :param expires: when it lapses (restoring a saved value); at most ``legacy_ttl`` on.

        :raises RecordRejected: ``bad-legacy`` for a value of the wrong kind or size.
        """
        if type(key) is not bytes or len(key) != 20:
            raise RecordRejected("bad-legacy", "key must be 20 bytes")
        if type(value) not in (bytes, str, int, float, bool):
            raise RecordRejected("bad-legacy", "value must be bytes, str, int or float")
        size = 0
        if type(value) is str:
            size = len(value.encode("utf-8", "surrogatepass"))  # as it travels, not characters
        elif type(value) is bytes:
            size = len(value)
        if size > self.limits.legacy_max_value:
            raise RecordRejected("bad-legacy", f"value over {self.limits.legacy_max_value} bytes")
        self._values.pop(key, None)
        lapse = now + self.limits.legacy_ttl
        self._values[key] = (value, lapse if expires is None else min(expires, lapse))
        while len(self._values) > self.limits.legacy_max_keys:
            self._values.popitem(last=False)

    def get(self, key: bytes, now: float) -> Any | None:
        """The value under ``key`` or None."""
        item = self._values.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._values[key]
            return None
        return item[0]

    def expire(self, now: float) -> None:
        """Drop expired values."""
        for key in [k for k, (_, exp) in self._values.items() if exp <= now]:
            del self._values[key]

    def items(self, now: float) -> Iterable[tuple[bytes, Any]]:
        """Live ``(key, value)`` pairs."""
        self.expire(now)
        return [(k, v) for k, (v, _) in self._values.items()]

    def dump(self, now: float) -> list[tuple[bytes, Any, float]]:
        """Live ``(key, value, expires)`` triples, for saving."""
        self.expire(now)
        return [(k, v, exp) for k, (v, exp) in self._values.items()]


@dataclass
class Subscriptions:
    """Who listens on which key, until when: bounded per key, per host, per prefix and
    in total (each refusal is ``listen-full``, its message naming the setting)."""

    limits: StorageLimits
    _by_key: dict[bytes, dict[Addr, float]] = field(default_factory=dict)
    _per_source: dict[str, int] = field(default_factory=dict)
    _per_prefix: dict[str, int] = field(default_factory=dict)
    #: each prefix's subscriptions, oldest first (the ones evicted when full)
    _order: dict[str, dict[tuple[bytes, Addr], None]] = field(default_factory=dict)
    total: int = 0
    evicted: int = 0
    #: the prefix holding the most subscriptions, if known (None: scan when needed)
    _heavy: str | None = None

    def add(self, key: bytes, addr: Addr, ttl: float, now: float) -> float:
        """Register or refresh a subscription; returns the TTL granted.

        :raises RecordRejected: ``listen-full`` when a bound is reached.
        """
        lim = self.limits
        ttl = max(1.0, min(ttl, lim.max_listen_ttl))
        subs = self._prune(key, now)
        if addr not in subs:
            host, prefix = keys_of(addr[0])
            if len(subs) >= lim.max_listeners_per_key:
                raise RecordRejected("listen-full", "max_listeners_per_key reached on this key")
            if self._per_source.get(host, 0) >= lim.max_listens_per_source:
                raise RecordRejected("listen-full", "max_listens_per_source reached by this host")
            if self._per_prefix.get(prefix, 0) >= lim.max_listens_per_prefix:
                raise RecordRejected("listen-full", "max_listens_per_prefix reached by this prefix")
            if self.total >= lim.max_listens and not self._evict_heaviest(prefix, key):
                # Expired ones are dropped by the node's maintenance (expire), not here:
                # a scan per refused request would cost a flood O(max_listens) each.
                raise RecordRejected("listen-full", "max_listens reached on this node")
            self._per_source[host] = self._per_source.get(host, 0) + 1
            self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
            self._order.setdefault(prefix, {})[(key, addr)] = None
            self.total += 1
            heavy = self._heavy
            if (
                heavy is not None
                and heavy != prefix
                and self._per_prefix[prefix] > (self._per_prefix.get(heavy, 0))
            ):
                self._heavy = prefix
        self._by_key.setdefault(key, {})[addr] = now + ttl
        return ttl

    def _evict_heaviest(self, prefix: str, key: bytes) -> bool:
        """Full: drop the oldest subscription of the prefix holding the most, if it holds
        more than ``prefix`` would with this one (fairness when full). True if one went."""
        per = self._per_prefix
        heavy = self._heavy
        if heavy is None or heavy not in per:
            heavy = self._heavy = max(per, key=per.__getitem__, default=None)
        if heavy is None or heavy == prefix or per[heavy] <= per.get(prefix, 0) + 1:
            return False
        order = self._order.get(heavy)
        if not order:
            return False
        old_key, old_addr = next(iter(order))
        self.remove(old_key, old_addr)
        self.evicted += 1
        return True

    def remove(self, key: bytes, addr: Addr) -> None:
        """Forget one subscription."""
        subs = self._by_key.get(key)
        if subs is not None and subs.pop(addr, None) is not None:
            self._release(key, addr)
            if not subs:
                del self._by_key[key]

    def _release(self, key: bytes, addr: Addr) -> None:
        host, prefix = keys_of(addr[0])
        self.total -= 1
        if prefix == self._heavy:
            self._heavy = None  # it shrank: another may hold more now
        order = self._order.get(prefix)
        if order is not None:
            order.pop((key, addr), None)
            if not order:
                del self._order[prefix]
        for table, k in ((self._per_source, host), (self._per_prefix, prefix)):
            n = table.get(k, 0) - 1
            if n > 0:
                table[k] = n
            else:
                table.pop(k, None)

    def _prune(self, key: bytes, now: float) -> dict[Addr, float]:
        subs = self._by_key.get(key)
        if not subs:
            return {}
        for addr in [a for a, exp in subs.items() if exp <= now]:
            del subs[addr]
            self._release(key, addr)
        if not subs:
            del self._by_key[key]
            return {}
        return subs

    def listeners(self, key: bytes, now: float) -> list[Addr]:
        """Live subscribers of ``key``."""
        return list(self._prune(key, now))

    def expire(self, now: float) -> None:
        """Drop every expired subscription."""
        for key in list(self._by_key):
            self._prune(key, now)

    def __len__(self) -> int:
        return self.total
