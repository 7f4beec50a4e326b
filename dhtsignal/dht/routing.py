"""The routing table: k-buckets with the defects of ``kademlia`` 2.2.3 corrected.

Theory of operation
-------------------
The table follows ``kademlia.routing.RoutingTable`` (paper sections 2.2, 2.4 and
4.2): buckets cover ranges of the ID space, each holds at most k contacts in
least-recently-seen order plus a small replacement cache, and a full bucket
splits while it covers our own ID or its depth is not a multiple of 5 (the
same rule as the stock table). It is our own code rather than a subclass
because the stock ``KBucket`` keeps two ``OrderedDict`` per bucket and a
replacement cache of 5k (100) contacts per bucket, which dominated the memory
of an idle node, and because every operation below needs the contacts in ID
order anyway. Corrections:

* :meth:`RoutingTable.closest` returns exactly the k closest contacts by XOR
  distance, from all buckets. The stock ``find_neighbors`` returns the first k
  contacts met while walking buckets, and nothing when one side of the walk
  runs out.
* Adding a contact to a full bucket never starts I/O: it returns the bucket's
  least-recently-seen contact, which the caller should ping (paper section 2.2).
* A failed RPC does not evict at once: a contact is dropped after
  ``max_failures`` consecutive failures, and its place goes to the freshest
  replacement.
* A datagram claiming a known contact's ID from another address does not move the
  contact (the stock bucket would): the known contact is returned to be pinged.
* Contacts remember whether they speak our RPCs (:attr:`Contact.dialect`) or only
  the stock ``kademlia`` ones, and client-mode peers never enter the table.

Liveness (BEP 5)
----------------
A contact is *good* while it has no failed RPC outstanding against it and we heard
from it (an answer or a request) within ``good_for`` seconds; otherwise it is
*questionable*, and after ``max_failures`` consecutive failures *bad* and evicted
(its place goes to the freshest replacement). :meth:`RoutingTable.closest_good` is
what find replies name: only good contacts. The questionable ones it passes over,
those :meth:`RoutingTable.failed` did not evict yet and those a ``ds_leave`` named
wait in :attr:`RoutingTable.suspects` (bounded) for the node to ping them; a
contact that answers is good again. Within a bucket, contacts are kept in
least-recently-seen order, so :meth:`RoutingTable.questionable` finds the stale
ones by walking each bucket from its head, not the whole table.

How ``closest`` stays exact without sorting the table
-----------------------------------------------------
All contacts are also kept in one list sorted by integer ID. The contacts whose
distance to the target is below ``2**d`` share the first ``160 - d`` bits with it:
they form an aligned block of the ID space, a contiguous run of that list, and
every contact inside the block is closer to the target than every contact
outside it. So once a block holds at least k contacts, the k closest are the k
nearest inside it, and only the block is ranked. The smallest such block is
contiguous around the target's position, so it holds k of the k contacts on
each side of that position; on each side the distances grow away from the
target, so the k-th smallest of them (which sizes the block) is found by a
binary search over the two sides, a handful of XORs instead of 2k.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from dhtsignal.wire.codec import array_header, pack

ID_BITS = 160

DIALECT_STOCK = 0
DIALECT_DS = 1
#: Contacts kept per bucket in the replacement cache (the stock table keeps 5k = 100;
#: lookups keep discovering contacts, so a few fresh ones are enough to refill a bucket).
DEFAULT_REPLACEMENTS = 5


class _HasLongId(Protocol):
    @property
    def long_id(self) -> int: ...


class _NodeLike(_HasLongId, Protocol):
    @property
    def id(self) -> bytes: ...
    @property
    def ip(self) -> Any: ...
    @property
    def port(self) -> Any: ...


class Contact:
    """A remote node: 20-byte ID, address, what it speaks, how it has behaved.

    Duck-compatible with ``kademlia.node.Node`` (``id``, ``ip``, ``port``,
    ``long_id``, ``same_home_as``, ``distance_to``, iteration).

    :param node_id: the 20-byte routing ID.
    :param ip: IP address (text).
    :param port: UDP port.
    :param dialect: :data:`DIALECT_DS` for dhtsignal nodes, :data:`DIALECT_STOCK` otherwise.
    """

    __slots__ = ("_packed", "dialect", "failures", "id", "ip", "last_seen", "long_id", "port")

    def __init__(self, node_id: bytes, ip: str, port: int, dialect: int = DIALECT_DS) -> None:
        self.id = node_id
        self.ip = ip
        self.port = port
        self.long_id = int.from_bytes(node_id, "big")
        self.dialect = dialect
        self.failures = 0
        self.last_seen = 0.0
        self._packed: bytes | None = None

    @property
    def addr(self) -> tuple[str, int]:
        """``(ip, port)``."""
        return (self.ip, self.port)

    def wire(self) -> list[object]:
        """The contact as sent in our find replies: ``[id, ip, port, dialect]``."""
        return [self.id, self.ip, self.port, self.dialect]

    def packed(self) -> bytes:
        """msgpack of :meth:`wire`, computed once (replies are built by concatenation)."""
        p = self._packed
        if p is None:
            p = self._packed = pack([self.id, self.ip, self.port, self.dialect])
        return p

    def set_dialect(self, dialect: int) -> None:
        """Change what the contact speaks (drops the cached wire form)."""
        if dialect != self.dialect:
            self.dialect = dialect
            self._packed = None

    def same_home_as(self, node: _NodeLike) -> bool:
        """Same address as ``node``."""
        return bool(self.ip == node.ip and self.port == node.port)

    def distance_to(self, node: _HasLongId) -> int:
        """XOR distance to ``node``."""
        return self.long_id ^ node.long_id

    def __iter__(self) -> Iterator[object]:
        return iter((self.id, self.ip, self.port))

    def __repr__(self) -> str:
        return f"Contact({self.id.hex()[:12]}, {self.ip}:{self.port}, dialect={self.dialect})"


def pack_contacts(contacts: list[Contact]) -> bytes:
    """msgpack of ``[c.wire() for c in contacts]``, from each contact's cached form."""
    return array_header(len(contacts)) + b"".join([c._packed or c.packed() for c in contacts])


def pack_stock_contacts(contacts: list[Contact]) -> bytes:
    """msgpack of ``[[c.id, c.ip, c.port] for c in contacts]`` (the stock reply form): each
    cached ``[id, ip, port, dialect]`` less its array header and its one-byte dialect."""
    return array_header(len(contacts)) + b"".join(
        [b"\x93" + (c._packed or c.packed())[1:-1] for c in contacts]
    )


class KBucket:
    """Contacts whose IDs fall in ``[lo, hi]`` (inclusive).

    ``nodes`` is in least-recently-seen order (the head first); ``replacement_nodes``
    holds contacts waiting for a place, the freshest last.
    """

    __slots__ = ("hi", "lo", "nodes", "replacement_nodes")

    def __init__(self, lo: int, hi: int) -> None:
        self.lo = lo
        self.hi = hi
        self.nodes: list[Contact] = []
        #: Made on first use: most buckets never hold a replacement.
        self.replacement_nodes: list[Contact] | tuple[()] = ()

    @property
    def range(self) -> tuple[int, int]:
        """``(lowest, highest)`` ID covered."""
        return (self.lo, self.hi)

    def waiting(self) -> list[Contact]:
        """The replacement cache, as a list that can be added to."""
        reps = self.replacement_nodes
        if isinstance(reps, tuple):
            reps = self.replacement_nodes = []
        return reps

    def head(self) -> Contact:
        """The least recently seen contact."""
        return self.nodes[0]

    def depth(self) -> int:
        """Bits shared by every contact's ID (the stock ``KBucket.depth``)."""
        if not self.nodes:
            return 0
        lo = min(c.long_id for c in self.nodes)
        hi = max(c.long_id for c in self.nodes)
        return ID_BITS - (lo ^ hi).bit_length()

    def __len__(self) -> int:
        return len(self.nodes)


class RoutingTable:
    """k-buckets around ``own_id``.

    :param own_id: this node's 20-byte routing ID.
    :param ksize: bucket size k.
    :param max_failures: consecutive RPC failures before a contact is evicted.
    :param replacements: contacts kept per bucket in its replacement cache.
    :param good_for: seconds a contact stays good after we last heard from it.
    :param max_suspects: questionable contacts queued for a ping at most.
    """

    def __init__(
        self,
        own_id: bytes,
        ksize: int = 20,
        max_failures: int = 3,
        replacements: int = DEFAULT_REPLACEMENTS,
        good_for: float = 900.0,
        max_suspects: int = 256,
    ) -> None:
        self.good_for = good_for
        self.max_suspects = max_suspects
        #: questionable contacts to ping, by ID, the oldest first (see :meth:`suspect`)
        self.suspects: dict[bytes, Contact] = {}
        self.own_id = own_id
        self.own_long = int.from_bytes(own_id, "big")
        self.ksize = ksize
        self.max_failures = max_failures
        self.replacements = replacements
        self.buckets: list[KBucket] = [KBucket(0, (1 << ID_BITS) - 1)]
        self._uppers: list[int] = [self.buckets[0].hi]
        #: Every contact of every bucket, sorted by ID, and their IDs as integers.
        self._sorted: list[Contact] = []
        self._longs: list[int] = []

    # -- buckets ------------------------------------------------------------------------

    def get_bucket_for(self, node: _HasLongId) -> int:
        """Index of the bucket ``node`` falls in."""
        return min(bisect.bisect_left(self._uppers, node.long_id), len(self.buckets) - 1)

    def bucket(self, node: _HasLongId) -> KBucket:
        """The bucket ``node`` falls in."""
        return self.buckets[self.get_bucket_for(node)]

    def split_bucket(self, index: int) -> None:
        """Split one bucket in two halves; replacements fill any room (as the stock table)."""
        old = self.buckets[index]
        mid = (old.lo + old.hi) // 2
        one, two = KBucket(old.lo, mid), KBucket(mid + 1, old.hi)
        for c in old.nodes:
            (one if c.long_id <= mid else two).nodes.append(c)
        for c in old.replacement_nodes:
            b = one if c.long_id <= mid else two
            if len(b.nodes) < self.ksize:
                b.nodes.append(c)
                self._insert(c)
            else:
                b.waiting().append(c)
        self.buckets[index : index + 1] = [one, two]
        self._uppers[index : index + 1] = [mid, old.hi]

    # -- contacts -----------------------------------------------------------------------

    def _find(self, long_id: int) -> int:
        """Index of ``long_id`` in the sorted list, or -1."""
        longs = self._longs
        i = bisect.bisect_left(longs, long_id)
        return i if i < len(longs) and longs[i] == long_id else -1

    def _insert(self, c: Contact) -> None:
        i = bisect.bisect_left(self._longs, c.long_id)
        self._longs.insert(i, c.long_id)
        self._sorted.insert(i, c)

    def _unlist(self, c: Contact) -> None:
        i = self._find(c.long_id)
        if i >= 0:
            del self._sorted[i]
            del self._longs[i]

    def get(self, node_id: bytes) -> Contact | None:
        """The contact with ``node_id`` if it is in the table."""
        i = self._find(int.from_bytes(node_id, "big"))
        return self._sorted[i] if i >= 0 else None

    def add_contact(self, node: Contact, now: float = 0.0) -> Contact | None:
        """Add or refresh a contact that just answered or sent us a request.

        :returns: the contact that should be pinged, or None: the head of a full
            bucket, or the known contact when ``node`` claims its ID from another address.
        """
        long_id = node.long_id
        if long_id == self.own_long:
            return None
        longs = self._longs
        i = bisect.bisect_left(longs, long_id)
        if i < len(longs) and longs[i] == long_id:
            return self._refresh(self._sorted[i], node.ip, node.port, node.dialect, now)
        index = bisect.bisect_left(self._uppers, long_id)
        bucket = self.buckets[index]
        node.last_seen = now
        if len(bucket.nodes) < self.ksize:
            bucket.nodes.append(node)
            longs.insert(i, long_id)
            self._sorted.insert(i, node)
            if bucket.replacement_nodes:
                self._drop_replacement(bucket.waiting(), node.id)
            return None
        if bucket.lo <= self.own_long <= bucket.hi or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            return self.add_contact(node, now)
        reps = bucket.waiting()
        self._drop_replacement(reps, node.id)
        if self.replacements > 0:
            reps.append(node)
            if len(reps) > self.replacements:
                del reps[0]
        return bucket.nodes[0]

    def heard_from(
        self, node_id: bytes, ip: str, port: int, dialect: int, now: float
    ) -> Contact | None:
        """:meth:`add_contact` for a contact given by its fields: a known contact is
        refreshed without building a :class:`Contact` (the per-request path)."""
        long_id = int.from_bytes(node_id, "big")
        longs = self._longs
        i = bisect.bisect_left(longs, long_id)
        if i < len(longs) and longs[i] == long_id:
            return self._refresh(self._sorted[i], ip, port, dialect, now)
        return self.add_contact(Contact(node_id, ip, port, dialect), now)

    def refresh(
        self, existing: Contact, ip: str, port: int, dialect: int, now: float
    ) -> Contact | None:
        """A request from ``(ip, port)`` named the known contact ``existing``: refresh it
        if that is its address (the caller validated the address); otherwise return it,
        to be pinged."""
        return self._refresh(existing, ip, port, dialect, now)

    def _refresh(
        self, existing: Contact, ip: str, port: int, dialect: int, now: float
    ) -> Contact | None:
        if existing.port != port or existing.ip != ip:
            # The same ID from another address. Anyone can send a datagram claiming any
            # ID, so keep the contact we know and have the caller ping it: if it stops
            # answering it is evicted, and the new address is taken on its next contact.
            return existing
        existing.failures = 0
        existing.last_seen = now
        if dialect == DIALECT_DS and existing.dialect != DIALECT_DS:
            existing.set_dialect(DIALECT_DS)
        nodes = self.buckets[bisect.bisect_left(self._uppers, existing.long_id)].nodes
        if nodes[-1] is not existing:  # move to the tail: most recently seen
            nodes.remove(existing)
            nodes.append(existing)
        return None

    @staticmethod
    def _drop_replacement(reps: list[Contact], node_id: bytes) -> None:
        for j, r in enumerate(reps):
            if r.id == node_id:
                del reps[j]
                return

    def failed(self, node_id: bytes) -> bool:
        """Record an RPC failure; evict after ``max_failures`` in a row.

        :returns: True if the contact was evicted.
        """
        c = self.get(node_id)
        if c is None:
            return False
        c.failures += 1
        if c.failures < self.max_failures:
            self.suspect(c)
            return False
        self._evict(c)
        return True

    def is_good(self, c: Contact, now: float) -> bool:
        """Whether ``c`` is good: no failure since it last answered, heard from within
        ``good_for`` seconds."""
        return c.failures == 0 and now - c.last_seen <= self.good_for

    def suspect(self, c: Contact) -> None:
        """Queue ``c`` for a liveness ping (bounded: the oldest entry goes first)."""
        sus = self.suspects
        if c.id in sus:
            return
        sus[c.id] = c
        if len(sus) > self.max_suspects:
            del sus[next(iter(sus))]

    def left(self, node_id: bytes, ip: str, port: int) -> Contact | None:
        """A ``ds_leave`` from ``(ip, port)`` named ``node_id``: if that is the contact
        we know at that address, stop handing it out (it is no longer good) and return
        it, to be confirmed by one ping before it is evicted. Anyone can send the
        datagram, so it never evicts by itself."""
        c = self.get(node_id)
        if c is None or c.ip != ip or c.port != port:
            return None
        c.failures = max(c.failures, 1)
        self.suspects.pop(node_id, None)
        return c

    def closest_good(self, target: bytes | int, k: int, now: float) -> list[Contact]:
        """The k good contacts closest to ``target``, nearest first. Questionable ones
        met among the nearest are queued in :attr:`suspects` (not handed out)."""
        found = self.closest(target, k)
        bound = now - self.good_for
        for c in found:
            if c.failures or c.last_seen < bound:
                break
        else:
            return found
        good: list[Contact] = []
        for c in self.closest(target, 3 * k):
            if c.failures == 0 and c.last_seen >= bound:
                good.append(c)
                if len(good) == k:
                    break
            elif c.failures == 0:
                self.suspect(c)
        return good

    def questionable(self, now: float, limit: int) -> list[Contact]:
        """Up to ``limit`` contacts not heard from within ``good_for`` seconds (each
        bucket walked from its least recently seen contact)."""
        bound = now - self.good_for
        out: list[Contact] = []
        for b in self.buckets:
            for c in b.nodes:
                if c.last_seen >= bound:
                    break
                out.append(c)
                if len(out) >= limit:
                    return out
        return out

    def remove(self, node_id: bytes) -> None:
        """Drop a contact now (it spoke another network, or was replaced)."""
        c = self.get(node_id)
        if c is not None:
            self._evict(c)

    def _evict(self, c: Contact) -> None:
        self.suspects.pop(c.id, None)
        bucket = self.bucket(c)
        bucket.nodes.remove(c)
        self._unlist(c)
        if bucket.replacement_nodes:
            fresh = bucket.waiting().pop()
            bucket.nodes.append(fresh)
            self._insert(fresh)

    def contacts(self) -> list[Contact]:
        """Every contact in the table (not the replacement caches), sorted by ID.

        The list is the table's own: do not modify it.
        """
        return self._sorted

    def __len__(self) -> int:
        return len(self._sorted)

    def closest(
        self, target: bytes | int, k: int | None = None, exclude: Iterable[bytes] = ()
    ) -> list[Contact]:
        """The k contacts closest to ``target`` by XOR distance, nearest first.

        :param target: a 20-byte key or its integer value.
        :param k: how many (default, None: the bucket size).
        :param exclude: IDs to leave out.
        """
        t = target if isinstance(target, int) else int.from_bytes(target, "big")
        n = self.ksize if k is None else k  # k=0 asks for none, not for the bucket size
        if n <= 0:
            return []
        skip = set(exclude) if exclude else None
        # Every excluded contact could be among the nearest: take that many more.
        want = n + len(skip) if skip else n
        longs = self._longs
        size = len(longs)
        if want < size:
            lo, hi = self._block(t, want)
            dist = list(map(t.__xor__, longs[lo:hi]))
            block = self._sorted[lo:hi]
        else:
            dist = list(map(t.__xor__, longs))
            block = self._sorted
        order = sorted(range(len(dist)), key=dist.__getitem__)
        if skip:
            return [c for c in map(block.__getitem__, order) if c.id not in skip][:n]
        del order[n:]
        return list(map(block.__getitem__, order))

    def _block(self, t: int, want: int) -> tuple[int, int]:
        """Index range of the smallest aligned block around ``t`` holding ``want``
        contacts (``0 < want < len(self)``); see the module docstring."""
        longs = self._longs
        size = len(longs)
        i = bisect.bisect_left(longs, t)
        # Distances of the contacts below t grow as we walk down from i-1 (A), those of
        # the contacts from i up grow as we walk up (B): two sorted sequences. The block
        # is that of the want-th smallest of their bit lengths, found by binary search on
        # how many of the want smallest come from A (the k-th of two sorted arrays).
        lo_p = max(0, want - min(size - i, want))
        hi_p = min(want, i)
        while lo_p < hi_p:
            p = (lo_p + hi_p) >> 1
            if (t ^ longs[i - 1 - p]).bit_length() < (t ^ longs[i + want - p - 1]).bit_length():
                lo_p = p + 1
            else:
                hi_p = p
        q = want - lo_p
        d = (t ^ longs[i - lo_p]).bit_length() if lo_p else 0
        if q:
            d = max(d, (t ^ longs[i + q - 1]).bit_length())
        base = t >> d << d
        return (
            bisect.bisect_left(longs, base, 0, i),
            bisect.bisect_left(longs, base + (1 << d), i),
        )

    def find_neighbors(
        self, node: _NodeLike, k: int | None = None, exclude: _NodeLike | None = None
    ) -> list[Contact]:
        """The stock signature, corrected behaviour (see :meth:`closest`)."""
        found = self.closest(node.long_id, (k or self.ksize) + 1, exclude=(node.id,))
        if exclude is not None:
            found = [c for c in found if not c.same_home_as(exclude)]
        return found[: k or self.ksize]

    def stale_buckets(self, now: float, interval: float) -> list[tuple[int, int]]:
        """Ranges of buckets with no contact seen within ``interval`` seconds."""
        out = []
        for b in self.buckets:
            seen = max((c.last_seen for c in b.nodes), default=0.0)
            if now - seen > interval:
                out.append(b.range)
        return out
