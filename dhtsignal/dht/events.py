"""What the sans-I/O DHT node reports: results of operations and past-tense events.

Theory of operation
-------------------
An operation started on :class:`~dhtsignal.dht.node.Node` ends in exactly one event:
its result (:class:`RequestAnswered`, :class:`LookupFinished`, :class:`RecordsStored`,
:class:`RecordsFound`, :class:`PingAnswered`, :class:`Bootstrapped`) or a failure
(:class:`RequestFailed`, :class:`OperationFailed`). Listening goes on until the last
listener leaves and reports as it goes (:class:`RecordsReceived`,
:class:`SubscriptionRenewed`). The node's own steps chain through continuations
(:data:`Then`) instead of events. Everything here is a frozen dataclass: plain data,
no behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dhtsignal.dht.records import Record
from dhtsignal.dht.routing import Contact
from dhtsignal.errors import DhtSignalError, RpcTimeout

# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LookupResult:
    """Outcome of an iterative lookup."""

    closest: list[Contact]
    hops: int
    queried: int
    records: list[Record] = field(default_factory=list)
    #: for each record's raw bytes, the IDs of the nodes whose answers held it
    held_by: dict[bytes, set[bytes]] = field(default_factory=dict)
    #: a storing lookup's store results, per ID of the node that answered
    stored: dict[bytes, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HeldRecords:
    """What a get found: the merged records, and how many distinct storing nodes
    answered with at least one live record of each signer."""

    records: list[Record]
    support: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class PutResult:
    """How a ``put`` went: storing nodes that accepted, and refusals by reason."""

    stored: int
    refused: dict[str, int]
    hops: int


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Something the node reports to its driver."""


@dataclass(frozen=True, slots=True)
class RequestAnswered(Event):
    """An RPC started with :meth:`Node.send_request` was answered."""

    request_id: bytes
    result: Any


@dataclass(frozen=True, slots=True)
class RequestFailed(Event):
    """An RPC got no answer after all its tries (also reported for the node's own RPCs)."""

    request_id: bytes
    error: RpcTimeout


@dataclass(frozen=True, slots=True)
class LookupFinished(Event):
    """A lookup started with :meth:`Node.start_lookup` finished."""

    op_id: int
    result: LookupResult


@dataclass(frozen=True, slots=True)
class RecordsStored(Event):
    """A put started with :meth:`Node.start_put` stored its records."""

    op_id: int
    result: PutResult


@dataclass(frozen=True, slots=True)
class RecordsFound(Event):
    """A get started with :meth:`Node.start_get` finished."""

    op_id: int
    held: HeldRecords


@dataclass(frozen=True, slots=True)
class PingAnswered(Event):
    """A ping started with :meth:`Node.start_ping` was answered by ``node_id``."""

    op_id: int
    node_id: bytes


@dataclass(frozen=True, slots=True)
class Bootstrapped(Event):
    """A bootstrap finished; the routing table holds ``contacts``."""

    op_id: int
    contacts: int


@dataclass(frozen=True, slots=True)
class OperationFailed(Event):
    """An operation (lookup, put, get, ping, bootstrap) failed."""

    op_id: int
    error: DhtSignalError


@dataclass(frozen=True, slots=True)
class RecordsReceived(Event):
    """Records under a listened key: pushed by a storing node, or polled."""

    key: bytes
    records: list[Record]
    pushed: bool


@dataclass(frozen=True, slots=True)
class SubscriptionRenewed(Event):
    """A (re)subscription to ``key`` ended; ``accepted`` storing nodes took it (0: polling)."""

    key: bytes
    accepted: int


#: Continuation of an internal step: (result, error, now).
Then = Callable[[Any, "DhtSignalError | None", float], None]


def ignore(result: Any, error: DhtSignalError | None, now: float) -> None:
    """A continuation that wants nothing."""
