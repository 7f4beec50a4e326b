"""An iterative Kademlia lookup as a state machine (no I/O).

Theory of operation
-------------------
Modelled on rust-libp2p's ``ClosestPeersIter``. The driver asks :meth:`Lookup.next`
what to do; it answers with contacts to query now, or that it is waiting, or that
it has finished. The driver reports each answer with :meth:`Lookup.on_success`
(with the closer contacts the peer returned) or :meth:`Lookup.on_failure`.

* At most ``alpha`` queries are in flight, not counting those that passed the
  soft ``peer_timeout`` (they may still answer, but no longer hold a slot).
* If ``alpha`` answers in a row bring no contact closer than the best known, the
  lookup is *stalled* and widens to ``k`` queries in flight (paper section 2.3).
* It finishes when the ``k`` closest contacts not known to have failed, and not
  past the soft timeout, have all answered; the result is those contacts, nearest
  first. A slow peer thus delays a lookup by ``peer_timeout`` at most.
* A *strict* lookup (``strict_wait`` > 0: a put's or a get's) also waits, up to
  ``strict_wait`` after it was sent, for a peer among the k closest that passed the
  soft timeout: it no longer holds a slot, but the lookup only ends once the k closest
  have all answered or failed, so two nodes looking up one key agree on its k closest.
* No contact is queried twice; the number of candidates kept is bounded.
* Per-prefix diversity (libp2p's, issue 10): with a ``group`` function, at most
  ``max_per_group`` contacts of one group (an IPv4 /24, IPv6 /48) count among the k
  closest, are queried as such and are in the result; the others wait behind them and
  move up only if one fails. So Sybil nodes with IDs chosen next to a key take at most
  one place per prefix the attacker holds, whatever number of addresses, ports and
  keys it uses there. Candidates kept per group are bounded too, so a flood of one
  group's contacts cannot push the others out of the candidate list.

Each candidate remembers the hop at which it was learned (initial contacts are
hop 1), so a finished lookup reports the hop count of its closest result.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Container
from dataclasses import dataclass

from dhtsignal.dht.routing import Contact

_DISTANCE = operator.attrgetter("distance")
#: Candidates kept beyond k, so a flood of fake contacts cannot grow memory.
MAX_CANDIDATES_FACTOR = 4


class _St(enum.IntEnum):
    NEW = 0
    INFLIGHT = 1
    OK = 2
    FAILED = 3


# Module-level names: reading an enum member off its class costs about 85 ns a time in
# CPython 3.11, and the loops of Lookup.next compare states several times per candidate.
_NEW, _INFLIGHT, _OK, _FAILED = _St.NEW, _St.INFLIGHT, _St.OK, _St.FAILED


@dataclass(slots=True)
class _Cand:
    contact: Contact
    distance: int
    hop: int
    state: _St = _St.NEW
    sent_at: float = 0.0
    group: str | None = None
    overdue: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """Send a query to each of these contacts now.

    ``until``, if not None, is what :meth:`Lookup.next` called again at once (with the
    same ``now``) would answer: after a query step it answers :class:`Wait` with the
    earliest soft deadline of the queries in flight, these included, so a driver may
    wait until then instead of calling again. None: call again (a ``peer_timeout`` of
    0 or less, where the queries just sent are at once past it)."""

    contacts: list[Contact]
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send; call :meth:`Lookup.next` again on an answer or at ``until``."""

    until: float | None


@dataclass(frozen=True, slots=True)
class Finished:
    """The lookup is over. ``closest`` answered, nearest first."""

    closest: list[Contact]
    hops: int
    queried: int


Step = Query | Wait | Finished


class Lookup:
    """One iterative lookup for ``target``.

    :param target: the 20-byte key.
    :param initial: contacts to start from (usually the routing table's closest).
    :param k: how many closest contacts the result holds.
    :param alpha: queries in flight.
    :param peer_timeout: soft per-peer timeout, seconds.
    :param own_id: our own ID, never a candidate.
    :param group: a contact's diversity group (None: not limited); None: no limit.
    :param max_per_group: contacts of one group among the k closest.
    :param strict_wait: seconds after sending that a query past the soft timeout is
        still waited for before the lookup ends (0: not at all).
    """

    def __init__(
        self,
        target: bytes,
        initial: list[Contact],
        *,
        k: int = 20,
        alpha: int = 3,
        peer_timeout: float = 0.5,
        own_id: bytes = b"",
        group: Callable[[Contact], str | None] | None = None,
        max_per_group: int = 1,
        strict_wait: float = 0.0,
    ) -> None:
        self.strict_wait = max(strict_wait, peer_timeout) if strict_wait > 0 else 0.0
        self.target = int.from_bytes(target, "big")
        self.group = group
        self.max_per_group = max_per_group
        self._group_n: dict[str, int] = {}
        self.k = k
        self.alpha = alpha
        self.peer_timeout = peer_timeout
        self.own_id = own_id
        self._cands: dict[bytes, _Cand] = {}
        self._order: list[_Cand] = []
        self._best = 1 << 161
        self._no_progress = 0
        self.stalled = False
        self.queried = 0
        #: contacts whose query passed the soft timeout since the driver last took them
        self.overdue: list[Contact] = []
        self._done = False
        self._add(initial, 1)

    def _add(self, contacts: list[Contact], hop: int) -> bool:
        progressed = False
        added = False
        cands, order, own, target = self._cands, self._order, self.own_id, self.target
        for c in contacts:
            cid = c.id
            if cid == own or cid in cands:
                continue
            g = None
            if self.group is not None:
                g = self.group(c)
                if g is not None:
                    n = self._group_n.get(g, 0)
                    if n >= self.max_per_group * MAX_CANDIDATES_FACTOR:
                        continue
                    self._group_n[g] = n + 1
            d = c.long_id ^ target
            cand = _Cand(c, d, hop, group=g)
            cands[cid] = cand
            order.append(cand)
            added = True
            if d < self._best:
                self._best = d
                progressed = True
        if added:
            order.sort(key=_DISTANCE)
            limit = self.k * MAX_CANDIDATES_FACTOR
            if len(order) > limit:
                # Drop the farthest that were never queried; queried ones stay for dedup.
                keep = order[:limit]
                for cand in order[limit:]:
                    if cand.state != _NEW:
                        keep.append(cand)
                    else:
                        del cands[cand.contact.id]
                        if cand.group is not None:
                            self._group_n[cand.group] -= 1
                self._order = keep
        return progressed

    def end(self) -> None:
        """End now: the next step is :class:`Finished` with the contacts that answered so
        far (queries in flight may still answer the driver; the lookup no longer waits)."""
        self._done = True

    def on_success(self, contact: Contact, closer: list[Contact]) -> None:
        """``contact`` answered and named ``closer`` contacts."""
        cand = self._cands.get(contact.id)
        if cand is None or cand.state in (_OK, _FAILED):
            return
        cand.state = _OK
        if self._add(closer, cand.hop + 1):
            self._no_progress = 0
            self.stalled = False
        else:
            self._no_progress += 1
            if self._no_progress >= self.alpha:
                self.stalled = True

    def on_failure(self, contact: Contact) -> None:
        """``contact`` did not answer (after the RPC layer's retries)."""
        cand = self._cands.get(contact.id)
        if cand is not None and cand.state in (_NEW, _INFLIGHT):
            cand.state = _FAILED

    def next(self, now: float) -> Step:
        """What to do now.

        :param now: the driver's monotonic clock, seconds.
        """
        if self._done:
            return self._finish()
        k, timeout, order = self.k, self.peer_timeout, self._order
        parallelism = k if self.stalled else self.alpha
        # Count every query in flight, wherever it now ranks: one that answers with
        # closer contacts pushes the others out of the first k, but they still hold a
        # slot until they answer or pass the soft timeout.
        active = 0
        earliest: float | None = None
        strict = self.strict_wait
        for cand in order:
            if cand.state == _INFLIGHT:
                due = cand.sent_at + timeout
                if due > now:
                    active += 1
                    earliest = due if earliest is None else min(earliest, due)
                    continue
                if not cand.overdue:  # past the soft timeout: the driver is told once
                    cand.overdue = True
                    self.overdue.append(cand.contact)
                if strict and cand.sent_at + strict > now:
                    due = cand.sent_at + strict
                    earliest = due if earliest is None else min(earliest, due)
        waiting = 0
        to_send: list[Contact] = []
        seen = 0
        groups: dict[str, int] | None = {} if self.group is not None else None
        for cand in order:
            state = cand.state
            if state == _FAILED:
                continue
            if (
                state == _INFLIGHT
                and cand.sent_at + timeout <= now
                and (not strict or cand.sent_at + strict <= now)
            ):
                # Unresponsive past the soft timeout: it may still answer, but the lookup
                # no longer waits for it (libp2p's "unresponsive" peers).
                continue
            if groups is not None and cand.group is not None:
                n = groups.get(cand.group, 0)
                if n >= self.max_per_group:
                    continue  # its group has its places among the closest
                groups[cand.group] = n + 1
            if seen >= k:
                break
            seen += 1
            if state == _INFLIGHT:
                waiting += 1
            elif state == _NEW:
                waiting += 1
                if active < parallelism:
                    cand.state = _INFLIGHT
                    cand.sent_at = now
                    active += 1
                    self.queried += 1
                    to_send.append(cand.contact)
        if to_send:
            if timeout <= 0:
                return Query(to_send)
            # Called again now, next() would send nothing (the free slots are taken, or
            # no new candidate is left among the k closest) and wait for the earliest
            # query in flight: the ones just sent if none was before.
            due = now + timeout
            return Query(to_send, due if earliest is None or due < earliest else earliest)
        if waiting == 0 and self._overdue_needed(now):
            return Wait(None)  # woken by their answer or their RPC's final failure
        if waiting == 0:
            self._done = True
            return self._finish()
        return Wait(earliest)

    def _overdue_needed(self, now: float) -> bool:
        """Whether to keep waiting for peers past the soft timeout: only while no peer has
        answered (a slow link or a lost first try must not end a lookup empty); otherwise a
        slow peer never delays a lookup beyond ``peer_timeout``."""
        ok = any(c.state == _OK for c in self._order)
        return not ok and any(
            c.state == _INFLIGHT and c.sent_at + self.peer_timeout <= now for c in self._order
        )

    def _finish(self) -> Finished:
        ok = [c for c in self._order if c.state == _OK]
        if self.group is not None:
            groups: dict[str, int] = {}
            kept = []
            for c in ok:
                if c.group is not None:
                    n = groups.get(c.group, 0)
                    if n >= self.max_per_group:
                        continue
                    groups[c.group] = n + 1
                kept.append(c)
            ok = kept
        ok = ok[: self.k]
        return Finished([c.contact for c in ok], ok[0].hop if ok else 0, self.queried)

    def skip_state(self) -> tuple[Container[bytes], int | None]:
        """For a driver filtering a whole answer at once: the IDs :meth:`skips` knows, and
        the distance from which it skips every contact (None: it skips none for distance)."""
        order = self._order
        limit = self.k * MAX_CANDIDATES_FACTOR
        far = order[limit - 1].distance if len(order) >= limit else None
        return self._cands, far

    def skips(self, contact_id: bytes) -> bool:
        """Whether a contact named in an answer would be ignored: it is (or was) a
        candidate, or the candidate list is full and it is farther than all of them.
        Lets the driver skip parsing most of a late answer."""
        if contact_id in self._cands:
            return True
        order = self._order
        limit = self.k * MAX_CANDIDATES_FACTOR
        if len(order) < limit:
            return False
        return bool(int.from_bytes(contact_id, "big") ^ self.target >= order[limit - 1].distance)

    def seen(self, contact_id: bytes) -> bool:
        """Whether ``contact_id`` is (or was) a candidate of this lookup."""
        return contact_id in self._cands
