"""What kind of NAT a peer is behind, from the addresses DHT nodes saw it from.

Theory of operation
-------------------
Every ``ds_ping`` answer carries the source address the answering node saw our datagram
come from (:func:`dhtsignal.dht.replies.ping_reply`). :func:`detect` pings up to
:data:`MAX_PROBES` public DHT nodes (the bootstrap nodes and contacts that answered
recently) from our one DHT socket and hands the answers to :func:`classify`
(RFC 4787 terms):

- ``open``: every node saw our own address (no NAT: the address is one of this host's);
- ``cone``: every node saw the same address, not ours: endpoint-independent mapping,
  so a server-reflexive candidate learned from one server works toward any peer, and
  hole punching works;
- ``symmetric``: nodes saw different ports or addresses: the mapping depends on the
  destination (address and port dependent mapping), a server-reflexive candidate is
  useless toward a peer that is also behind such a NAT, and only TURN connects two of
  them;
- ``unknown``: fewer than two nodes answered (one answer cannot tell cone from
  symmetric), unless that one saw our own address (``open``).

``open`` says nothing of filtering: a host with a public address may still sit behind a
firewall. The type goes in the presence record (``"n"``) and error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence

from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.replies import ping_reply
from dhtsignal.errors import DhtSignalError
from dhtsignal.wire.addr import Addr

OPEN, CONE, SYMMETRIC, UNKNOWN = "open", "cone", "symmetric", "unknown"
TYPES = (OPEN, CONE, SYMMETRIC, UNKNOWN)
"""Every NAT type :func:`classify` returns."""
MAX_PROBES = 4
"""Most DHT nodes :func:`detect` asks."""
DETECT_TIMEOUT = 1.5
"""Seconds :func:`detect` waits for answers."""


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this host (a socket can bind to it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return True
    return False


def classify(local: Addr | None, seen: Sequence[Addr], *, local_hosts: set[str]) -> str:
    """The NAT type from the addresses distinct DHT nodes saw us at.

    :param local: where our socket is bound (its host may be a wildcard).
    :param seen: one observed address per answering node.
    :param local_hosts: which of the observed hosts are addresses of this host.
    """
    if not seen:
        return UNKNOWN
    distinct = set(seen)
    ours = all(h in local_hosts and (local is None or p == local[1]) for h, p in distinct)
    if ours:
        return OPEN
    if len(seen) < 2:
        return UNKNOWN
    return CONE if len(distinct) == 1 else SYMMETRIC


def public_nodes(node: DhtNode, bootstrap: Sequence[Addr], now: float) -> list[Addr]:
    """Up to :data:`MAX_PROBES` addresses to ask: bootstrap nodes first (public by
    construction), then the contacts heard from most recently (same address family as
    our socket's most common observation is not required: each answer is classified
    per family by :func:`detect`)."""
    out: list[Addr] = []
    for a in bootstrap:
        if a not in out:
            out.append(a)
    recent = sorted(
        (c for c in node.table.contacts() if not c.failures), key=lambda c: -c.last_seen
    )
    for c in recent:
        if c.addr not in out:
            out.append(c.addr)
    return out[:MAX_PROBES]


async def detect(node: DhtNode, targets: Sequence[Addr], timeout: float = DETECT_TIMEOUT) -> str:
    """Ping ``targets`` and classify what they saw (IPv4 answers only, if any: an IPv6
    address and an IPv4 mapping are not the same mapping).

    :param node: our DHT node, bound.
    :param targets: DHT nodes to ask (:func:`public_nodes`).
    :param timeout: seconds to wait for answers.
    """
    futures = []
    for addr in targets:
        try:
            futures.append(node.request(addr, "ds_ping", node.ds_args()))
        except DhtSignalError:
            continue
    if not futures:
        return UNKNOWN
    done, pending = await asyncio.wait(futures, timeout=timeout)
    for fut in pending:
        fut.cancel()
    seen: list[Addr] = []
    for fut in done:
        if fut.cancelled() or fut.exception() is not None:
            continue
        parsed = ping_reply(fut.result())
        if parsed is not None and parsed[1] is not None:
            seen.append(parsed[1])
    v4 = [a for a in seen if ":" not in a[0]]
    seen = v4 or seen
    hosts = {h for h, _ in seen if is_local_address(h)}
    return classify(node.address, seen, local_hosts=hosts)
