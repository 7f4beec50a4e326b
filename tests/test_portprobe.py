"""dhtsignal.portprobe on real UDP sockets on 127.0.0.1: a closed port is told apart from
a silent one and from one that answers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dhtsignal.portprobe import refused
from dhtsignal.wire.addr import Addr


def _closed_port() -> Addr:
    """An address nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        host, port = s.getsockname()
    return (str(host), int(port))


@pytest.fixture()
def silent() -> Iterator[Addr]:
    """A bound socket that reads nothing and answers nothing (no ICMP either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        host, port = s.getsockname()
        yield (str(host), int(port))


class _Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        self.transport.sendto(b"here", addr)


async def test_a_closed_port_is_refused_within_a_round_trip() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await refused([_closed_port()], 2.0) is True
    assert loop.time() - began < 1.0  # not the timeout: the ICMP error came back
    assert await refused([_closed_port(), _closed_port()], 2.0) is True


async def test_silence_proves_nothing(silent: Addr) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await refused([silent], 0.2) is False
    assert loop.time() - began >= 0.15  # waited for a refusal that never came
    # One address silent, the other closed: not every one refused.
    assert await refused([_closed_port(), silent], 0.2) is False


async def test_an_answering_port_is_not_refused() -> None:
    loop = asyncio.get_running_loop()
    transport, echo = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        began = loop.time()
        assert await refused([(host, port)], 2.0) is False
        assert loop.time() - began < 1.0  # the answer ended the wait
        assert echo.seen == 1  # one datagram per address
    finally:
        transport.close()


async def test_no_addresses_and_unusable_ones_are_not_refused() -> None:
    assert await refused([], 1.0) is False
    # A port no socket can send to: nothing learnt, no exception.
    assert await refused([("127.0.0.1", 0)], 0.2) is False
