"""The routing table: ``kademlia``'s k-buckets with its defects corrected.

Theory of operation
-------------------
We keep ``kademlia.routing.RoutingTable`` and ``KBucket`` for bucket splitting
and replacement caches (paper section 4.2), with these corrections:

* :meth:`RoutingTable.closest` returns the k closest contacts by XOR distance,
  from all buckets. The stock ``find_neighbors`` returns the first k contacts
  met while walking buckets, and nothing when one side of the walk runs out.
* Adding a contact to a full bucket never starts I/O: it returns the bucket's
  least-recently-seen contact, which the caller should ping (paper section 2.2).
* A failed RPC does not evict at once: a contact is dropped after
  ``max_failures`` consecutive failures, and its place goes to the freshest
  replacement.
* A datagram claiming a known contact's ID from another address does not move the
  contact (the stock bucket would): the known contact is returned to be pinged.
* Contacts remember whether they speak our RPCs (:attr:`Contact.kind`) or only
  the stock ``kademlia`` ones, and client-mode peers never enter the table.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable

from kademlia.node import Node
from kademlia.routing import KBucket
from kademlia.routing import RoutingTable as _StockTable

ID_BITS = 160

KIND_STOCK = 0
KIND_DS = 1


class Contact(Node):
    """A remote node: 20-byte ID, address, what it speaks, how it has behaved.

    :param node_id: the 20-byte routing ID.
    :param ip: IP address (text).
    :param port: UDP port.
    :param kind: :data:`KIND_DS` for dhtsignal nodes, :data:`KIND_STOCK` otherwise.
    """

    def __init__(self, node_id: bytes, ip: str, port: int, kind: int = KIND_DS) -> None:
        # Node.__init__ does the same with int(node_id.hex(), 16), three times slower.
        self.id = node_id
        self.ip = ip
        self.port = port
        self.long_id = int.from_bytes(node_id, "big")
        self.kind = kind
        self.failures = 0
        self.last_seen = 0.0

    @property
    def addr(self) -> tuple[str, int]:
        """``(ip, port)``."""
        return (self.ip, self.port)

    def wire(self) -> list[object]:
        """The contact as sent in our find replies: ``[id, ip, port, kind]``."""
        return [self.id, self.ip, self.port, self.kind]


class RoutingTable(_StockTable):
    """k-buckets around ``own_id``.

    :param own_id: this node's 20-byte routing ID.
    :param ksize: bucket size k.
    :param max_failures: consecutive RPC failures before a contact is evicted.
    """

    def __init__(self, own_id: bytes, ksize: int = 20, max_failures: int = 3) -> None:
        super().__init__(None, ksize, Node(own_id))
        self.own_id = own_id
        self.own_long = int.from_bytes(own_id, "big")
        self.max_failures = max_failures
        self._flat: list[Contact] | None = None
        self._flat_longs: list[int] | None = None
        self._uppers: list[int] = [b.range[1] for b in self.buckets]

    # -- bucket bookkeeping -------------------------------------------------------------

    def split_bucket(self, index: int) -> None:
        super().split_bucket(index)
        self._flat = None
        self._uppers = [b.range[1] for b in self.buckets]

    def get_bucket_for(self, node: Node) -> int:
        # Ranges are inclusive; the stock version compares with '<' and scans linearly.
        return min(bisect.bisect_left(self._uppers, node.long_id), len(self.buckets) - 1)

    def bucket(self, node: Node) -> KBucket:
        """The bucket ``node`` falls in."""
        return self.buckets[self.get_bucket_for(node)]

    # -- contacts -----------------------------------------------------------------------

    def get(self, node_id: bytes) -> Contact | None:
        """The contact with ``node_id`` if it is in the table."""
        c: Contact | None = self.bucket(Node(node_id))[node_id]
        return c

    def add_contact(self, node: Contact, now: float = 0.0) -> Contact | None:
        """Add or refresh a contact that just answered or sent us a request.

        :returns: the contact that should be pinged, or None: the head of a full
            bucket, or the known contact when ``node`` claims its ID from another address.
        """
        if node.id == self.own_id:
            return None
        bucket = self.bucket(node)
        existing: Contact | None = bucket[node.id]
        if existing is not None and existing.addr == node.addr:
            existing.failures = 0
            existing.last_seen = now
            if node.kind == KIND_DS:
                existing.kind = KIND_DS
            bucket.add_node(existing)  # moves it to the tail: most recently seen
            return None
        if existing is not None:
            # The same ID from another address. Anyone can send a datagram claiming any
            # ID, so keep the contact we know and have the caller ping it: if it stops
            # answering it is evicted, and the new address is taken on its next contact.
            return existing
        node.last_seen = now
        self._flat = None
        if bucket.add_node(node):
            return None
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(self.get_bucket_for(node))
            return self.add_contact(node, now)
        head: Contact = bucket.head()
        return head

    def failed(self, node_id: bytes) -> bool:
        """Record an RPC failure; evict after ``max_failures`` in a row.

        :returns: True if the contact was evicted.
        """
        c = self.get(node_id)
        if c is None:
            return False
        c.failures += 1
        if c.failures < self.max_failures:
            return False
        self.bucket(c).remove_node(c)
        self._flat = None
        return True

    def remove(self, node_id: bytes) -> None:
        """Drop a contact now (it spoke another network, or was replaced)."""
        c = self.get(node_id)
        if c is not None:
            self.bucket(c).remove_node(c)
            self._flat = None

    def contacts(self) -> list[Contact]:
        """Every contact in the table (not the replacement caches)."""
        if self._flat is None:
            self._flat = [n for b in self.buckets for n in b.nodes.values()]
            self._flat_longs = None
        return self._flat

    def __len__(self) -> int:
        return len(self.contacts())

    def closest(
        self, target: bytes | int, k: int | None = None, exclude: Iterable[bytes] = ()
    ) -> list[Contact]:
        """The k contacts closest to ``target`` by XOR distance, nearest first.

        :param target: a 20-byte key or its integer value.
        :param k: how many (default, None: the bucket size).
        :param exclude: IDs to leave out.
        """
        t = target if isinstance(target, int) else int.from_bytes(target, "big")
        pool = self.contacts()
        if exclude:
            skip = set(exclude)
            pool = [c for c in pool if c.id not in skip]
            longs = [c.long_id for c in pool]
        else:
            longs = self._longs()
        # (distance, index) pairs built by C-level map: no Python call per contact.
        n = self.ksize if k is None else k  # k=0 asks for none, not for the bucket size
        best = heapq.nsmallest(n, zip(map(t.__xor__, longs), range(len(pool)), strict=True))
        return [pool[i] for _, i in best]

    def _longs(self) -> list[int]:
        if self._flat_longs is None or self._flat is None:
            self._flat_longs = [c.long_id for c in self.contacts()]
        return self._flat_longs

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Contact]:
        """Stock signature, corrected behaviour (see :meth:`closest`)."""
        found = self.closest(node.long_id, (k or self.ksize) + 1, exclude=(node.id,))
        if exclude is not None:
            found = [c for c in found if not c.same_home_as(exclude)]
        return found[: k or self.ksize]

    def stale_buckets(self, now: float, interval: float) -> list[tuple[int, int]]:
        """Ranges of buckets with no contact seen within ``interval`` seconds."""
        out = []
        for b in self.buckets:
            seen = max((c.last_seen for c in b.nodes.values()), default=0.0)
            if now - seen > interval:
                out.append(b.range)
        return out
