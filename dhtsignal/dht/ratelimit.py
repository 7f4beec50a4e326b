"""Per-host and per-prefix token buckets for the requests a node answers, bounded and pruned.

Theory of operation
-------------------
Each source address has a bucket of ``burst`` tokens refilling at ``rate`` per second;
a request takes one, and a source with none left is dropped (the node counts
``drop:rate-limited``). A bucket is stored as ``[tokens, last]`` and refilled lazily
when its source next sends. A source whose bucket has refilled is indistinguishable
from a new one, so the table only needs the sources that are being limited: a new
source evicts the oldest entry if that one has refilled (or the table is full,
``max_entries``), and :meth:`RateLimiter.prune` (the node's maintenance) drops every
refilled entry. No clock is read: ``now`` is an argument.

A source is not an address and port (a sender cycles ports for free) but a host and its
prefix (:mod:`dhtsignal.dht.hosts`): :class:`HostRateLimiter` keeps one table per host
(IPv4 address, IPv6 /64) and one per prefix (IPv4 /24, IPv6 /48), and a request needs a
token from both.
"""

from __future__ import annotations

from dhtsignal.dht.hosts import keys_of
from dhtsignal.wire.addr import Addr


class RateLimiter:
    """Token buckets, one per source (any hashable name: a host, a prefix). An entry
    whose bucket has refilled carries no information (a new source starts full), so
    such entries are dropped: the oldest ones as new sources arrive, all of them at
    each :meth:`prune`.

    :param rate: tokens per second (0 or less: no limit).
    :param burst: bucket size.
    :param max_entries: sources tracked at most.
    """

    __slots__ = ("_table", "burst", "max_entries", "rate")

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self._table: dict[object, list[float]] = {}

    def __len__(self) -> int:
        return len(self._table)

    def sources(self) -> list[object]:
        """The sources tracked, oldest first."""
        return list(self._table)

    def admit(self, src: object, now: float) -> bool:
        """Take a token for ``src``; False if it has none.

        :param src: the source address.
        :param now: monotonic time, seconds.
        """
        rate = self.rate
        if rate <= 0:
            return True
        table = self._table
        entry = table.get(src)
        if entry is None:
            # Drop the oldest entry if it has refilled (usually: 1/rate seconds after its
            # last request), so the table only holds sources that are being limited.
            if table:
                old = next(iter(table))
                e = table[old]
                if e[0] + (now - e[1]) * rate >= self.burst or len(table) >= self.max_entries:
                    del table[old]
            table[src] = [self.burst - 1.0, now]
            return True
        tokens = entry[0] + (now - entry[1]) * rate
        if tokens > self.burst:
            tokens = self.burst
        entry[1] = now
        if tokens < 1.0:
            entry[0] = tokens
            return False
        entry[0] = tokens - 1.0
        return True

    def prune(self, now: float) -> None:
        """Drop every entry whose bucket has refilled."""
        rate, burst = self.rate, self.burst
        full = [src for src, e in self._table.items() if e[0] + (now - e[1]) * rate >= burst]
        for src in full:
            del self._table[src]
        if not self._table:
            self._table = {}


class HostRateLimiter:
    """A request needs a token of its host's bucket and of its prefix's.

    :param rate: requests per second per host (0 or less: no limit).
    :param burst: a host's bucket size.
    :param prefix_rate: requests per second per prefix (0 or less: no limit).
    :param prefix_burst: a prefix's bucket size.
    :param max_entries: hosts (and prefixes) tracked at most.
    """

    __slots__ = ("hosts", "prefixes")

    def __init__(
        self,
        rate: float,
        burst: float,
        prefix_rate: float,
        prefix_burst: float,
        max_entries: int,
    ) -> None:
        self.hosts = RateLimiter(rate, burst, max_entries)
        self.prefixes = RateLimiter(prefix_rate, prefix_burst, max_entries)

    def __len__(self) -> int:
        return len(self.hosts) + len(self.prefixes)

    def sources(self) -> list[object]:
        """The hosts tracked, oldest first."""
        return self.hosts.sources()

    def admit(self, src: Addr, now: float) -> bool:
        """Take a token for ``src``'s host and one for its prefix; False if either has none.

        :param src: the source address.
        :param now: monotonic time, seconds.
        """
        host, prefix = keys_of(src[0])
        if not self.hosts.admit(host, now):
            return False
        return self.prefixes.admit(prefix, now)

    def prune(self, now: float) -> None:
        """Drop every entry whose bucket has refilled."""
        self.hosts.prune(now)
        self.prefixes.prune(now)
