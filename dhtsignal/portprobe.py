"""Is anything listening on a UDP port? A closed port answers with ICMP.

Theory of operation
-------------------
A process killed with SIGKILL leaves its presence record behind, naming a DHT address
nobody listens on any more. When its host is still up, the host's kernel answers every
datagram sent there with an ICMP *port unreachable* (RFC 1122 section 3.2.2.1, RFC 4443
section 3.1). The DHT node's own socket is unconnected and never sees those (Linux
reports ICMP errors only to connected sockets); a connected socket of its own does: the
error arrives as ``ConnectionRefusedError`` in
:meth:`asyncio.DatagramProtocol.error_received`, one round trip after the send.

:func:`refused` sends one STUN Binding request (RFC 8489, :mod:`dhtsignal.aio.stun`;
DHT nodes answer it, or drop it, and nothing else is asked of them) from a connected
socket to each address, and reports whether *every* one of them was refused within the
timeout. A refusal is proof that no process listens there; silence proves nothing (a
host that is down, a firewall, a NAT, a lost or rate-limited ICMP): the caller then
keeps waiting for whatever it waited for before.

An off-path attacker would have to forge an ICMP error that quotes our connected
socket's exact address and port pair (the kernel checks it) to make a live callee look
closed; one who is on the path can drop its traffic anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any

from dhtsignal.aio.stun import binding_request
from dhtsignal.wire.addr import Addr

log = logging.getLogger(__name__)


class _Probe(asyncio.DatagramProtocol):
    """One connected socket: ``outcome`` becomes True on a refusal, False on an answer."""

    def __init__(self, outcome: asyncio.Future[bool]) -> None:
        self.outcome = outcome

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.outcome.done():
            self.outcome.set_result(False)  # something listens there

    def error_received(self, exc: Exception) -> None:
        if not self.outcome.done() and isinstance(exc, ConnectionRefusedError):
            self.outcome.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.outcome.done():
            self.outcome.set_result(False)  # closed before anything came back


async def _one(addr: Addr, timeout: float) -> bool:
    """Whether ``addr`` refused one Binding request within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[bool] = loop.create_future()
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    try:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Probe(outcome), remote_addr=(addr[0], addr[1]), family=family
        )
    except OSError as exc:  # no route, a family we cannot use: nothing learnt
        log.debug("port probe of %s not sent: %r", addr, exc)
        return False
    try:
        _, datagram = binding_request()
        transport.sendto(datagram)  # a send error goes to error_received as well
        return await asyncio.wait_for(outcome, timeout)
    except TimeoutError:
        return False
    finally:
        transport.close()


async def refused(addrs: Sequence[Addr], timeout: float) -> bool:
    """Whether every address of ``addrs`` refused a datagram (ICMP port unreachable)
    within ``timeout`` seconds: then nothing listens on any of them.

    :param addrs: UDP addresses (IP literals), at least one.
    :param timeout: seconds to wait for the refusals.
    :returns: False as soon as one address answers or stays silent; False for none.
    """
    if not addrs:
        return False
    probes = [asyncio.create_task(_one(a, timeout)) for a in addrs]
    try:
        for done in asyncio.as_completed(probes):
            if not await done:
                return False
        return True
    finally:
        for p in probes:
            p.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
