"""Address validation and the amplification limit, without I/O.

Theory of operation
-------------------
A UDP source address proves nothing: anyone can send a datagram that seems to come
from a victim, and a node that answers it with more bytes than it received lends the
sender its bandwidth (a reflection attack). QUIC's anti-amplification rule (RFC 9000
section 8) bounds this: until an address is *validated*, a server sends it at most
three times the bytes it received from it. :class:`AddressBook` applies the same rule
to a DHT node:

* an address is validated once it answered a request of ours from that address (the
  answer carries the request's 20 random bytes of message id, so only a party that
  received the request can make it); the node pings a new sender to validate it, at
  most ``validation_pings`` per second;
* until then every byte the node sends it (replies, validation pings, their retries)
  is charged against ``factor`` times the bytes received from it
  (:meth:`AddressBook.allowance`, :meth:`AddressBook.spend`); a reply that does not fit
  is cut by the request handler (fewer contacts or records) or not sent;
* an address that leaves a request of ours unanswered (an RPC timeout) is no longer
  validated: pushes to a listener that stopped answering stop.

Both tables are bounded, least recently used first out: ``validated_size`` validated
addresses and ``unvalidated_size`` byte accounts. Forgetting an account forgets both
its counts, so the bound holds over every account's lifetime: what was sent to an
address while an account was kept is at most ``factor`` times what it received then.
"""

from __future__ import annotations

from dhtsignal.wire.addr import Addr


class AddressBook:
    """Validated addresses and the byte accounts of the others.

    :param factor: bytes that may be sent per byte received from an unvalidated address.
    :param validated_size: validated addresses remembered at most.
    :param unvalidated_size: byte accounts of unvalidated addresses kept at most.
    :param pings_per_second: validation pings allowed per second (token bucket).
    """

    __slots__ = (
        "_accounts",
        "_last",
        "_tokens",
        "_valid",
        "factor",
        "pings_per_second",
        "unvalidated_size",
        "validated_size",
    )

    def __init__(
        self,
        factor: float,
        validated_size: int,
        unvalidated_size: int,
        pings_per_second: float,
    ) -> None:
        self.factor = factor
        self.validated_size = validated_size
        self.unvalidated_size = unvalidated_size
        self.pings_per_second = pings_per_second
        #: validated address -> the routing ID confirmed there (None: not known yet)
        self._valid: dict[Addr, bytes | None] = {}
        #: address -> [bytes received, bytes sent], least recently used first
        self._accounts: dict[Addr, list[int]] = {}
        self._tokens = pings_per_second
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._valid)

    @property
    def accounts(self) -> int:
        """Byte accounts of unvalidated addresses kept now."""
        return len(self._accounts)

    def is_validated(self, addr: Addr) -> bool:
        """Whether ``addr`` answered a request of ours (and has not since failed one)."""
        return addr in self._valid

    def touch(self, addr: Addr) -> tuple[bool, bytes | None]:
        """:meth:`is_validated`, and keep a validated address as most recently used.

        :returns: whether it is validated, and the routing ID confirmed there.
        """
        valid = self._valid
        if addr not in valid:
            return False, None
        nid = valid.pop(addr)
        valid[addr] = nid
        return True, nid

    def confirm(self, addr: Addr, node_id: bytes) -> None:
        """A contact with ``node_id`` answered us from the validated ``addr``: requests
        from there naming that ID may refresh or add it without another ping."""
        if addr in self._valid:
            self._valid[addr] = node_id

    def validate(self, addr: Addr) -> None:
        """``addr`` answered a request of ours from that address."""
        self._accounts.pop(addr, None)
        valid = self._valid
        valid[addr] = valid.pop(addr, None)
        while len(valid) > self.validated_size:
            del valid[next(iter(valid))]

    def invalidate(self, addr: Addr) -> None:
        """``addr`` left a request of ours unanswered: validated no more."""
        self._valid.pop(addr, None)

    def received(self, addr: Addr, n: int) -> int:
        """Count ``n`` bytes received from the unvalidated ``addr``; returns how many bytes
        may be sent to it now."""
        accounts = self._accounts
        acct = accounts.pop(addr, None)
        if acct is None:
            acct = [0, 0]
            while len(accounts) >= self.unvalidated_size > 0:
                del accounts[next(iter(accounts))]
        acct[0] += n
        accounts[addr] = acct
        return int(acct[0] * self.factor) - acct[1]

    def allowance(self, addr: Addr) -> int | None:
        """Bytes that may still be sent to ``addr``; None: no limit (validated)."""
        if addr in self._valid:
            return None
        acct = self._accounts.get(addr)
        if acct is None:
            return 0
        return int(acct[0] * self.factor) - acct[1]

    def spend(self, addr: Addr, n: int) -> bool:
        """Charge ``n`` bytes sent to ``addr``; False (nothing charged): it may not be sent."""
        if addr in self._valid:
            return True
        acct = self._accounts.get(addr)
        if acct is None or acct[1] + n > acct[0] * self.factor:
            return False
        acct[1] += n
        return True

    def may_ping(self, now: float) -> bool:
        """Take one validation ping from the per-second budget (False: none left now)."""
        rate = self.pings_per_second
        if rate <= 0:
            return False
        tokens = min(rate, self._tokens + (now - self._last) * rate)
        self._last = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True
