"""DHT nodes answer STUN Binding requests on their own UDP port (RFC 8489).

Real sockets on 127.0.0.1: a raw Binding request, and aioice's own gathering with the
DHT node as its STUN server.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import aioice.ice
import aioice.stun
import pytest

from dhtsignal.aio import stun
from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.params import NodeConfig
from dhtsignal.wire.addr import Addr


async def _exchange(sock: socket.socket, data: bytes, to: Addr, timeout: float = 2.0) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, data, to)
    return await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


async def test_binding_request_gets_the_source_address(client: socket.socket) -> None:
    node = DhtNode(os.urandom(20))
    addr = await node.listen_udp()
    try:
        txid, request = stun.binding_request()
        reply = await _exchange(client, request, addr)
        assert stun.mapped_address(reply, txid) == client.getsockname()
        assert len(reply) <= stun.AMPLIFICATION * len(request)
        assert node.stats["stun:answered"] == 1
        # With a FINGERPRINT the answer carries one too (aioice checks it on parsing).
        message = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
        message.add_fingerprint()
        reply = await _exchange(client, bytes(message), addr)
        parsed = aioice.stun.parse_message(reply)
        assert "FINGERPRINT" in parsed.attributes
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == client.getsockname()
        # The DHT still works on the same port.
        assert await node.ping(addr) == node.id
    finally:
        await node.close()


async def test_aioice_gathers_a_server_reflexive_candidate_from_a_dht_node() -> None:
    node = DhtNode(os.urandom(20))
    addr = await node.listen_udp()
    connection = aioice.ice.Connection(ice_controlling=True, stun_server=addr)
    saved = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        await connection.gather_candidates()
        assert loop.time() - began < 1.0  # answered, not timed out (aioice waits 5 s)
        srflx = [c for c in connection.local_candidates if c.type == "srflx"]
        host = [c for c in connection.local_candidates if c.type == "host"]
        assert host and srflx
        assert (srflx[0].host, srflx[0].port) == (host[0].host, host[0].port)
        assert node.stats["stun:answered"] == 1
    finally:
        aioice.ice.get_host_addresses = saved
        await connection.close()
        await node.close()


def test_only_credential_free_binding_requests_are_answered() -> None:
    source = ("192.0.2.7", 4444)
    txid, request = stun.binding_request()
    assert stun.mapped_address(stun.binding_response(request, source) or b"", txid) == source
    allocate = aioice.stun.Message(aioice.stun.Method.ALLOCATE, aioice.stun.Class.REQUEST)
    indication = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.INDICATION)
    check = aioice.stun.Message(
        aioice.stun.Method.BINDING,
        aioice.stun.Class.REQUEST,
        attributes={"USERNAME": "a:b", "PRIORITY": 1},
    )
    check.add_message_integrity(b"key")
    response = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.RESPONSE)
    for datagram in (bytes(allocate), bytes(indication), bytes(check), bytes(response)):
        assert stun.binding_response(datagram, source) is None
    # Garbage after a valid header, wrong lengths, a bad fingerprint.
    assert stun.binding_response(request + b"\x00", source) is None
    assert stun.binding_response(request[:-1], source) is None
    bad = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
    bad.add_fingerprint()
    raw = bytearray(bytes(bad))
    raw[-1] ^= 1
    assert stun.binding_response(bytes(raw), source) is None


def test_the_answer_never_exceeds_three_times_the_request() -> None:
    _, request = stun.binding_request()  # the smallest request: a bare 20-byte header
    for source in (("192.0.2.7", 1), ("2001:db8::1", 65535)):
        reply = stun.binding_response(request, source)
        assert reply is not None
        assert len(reply) <= stun.AMPLIFICATION * len(request)


async def test_stun_is_rate_limited_per_source(client: socket.socket) -> None:
    node = DhtNode(os.urandom(20), NodeConfig(rate_per_source=1.0, rate_burst=3))
    addr = await node.listen_udp()
    try:
        loop = asyncio.get_running_loop()
        for _ in range(10):
            await loop.sock_sendto(client, stun.binding_request()[1], addr)
        answered = 0
        while True:
            try:
                await asyncio.wait_for(loop.sock_recv(client, 2048), 0.3)
            except TimeoutError:
                break
            answered += 1
            assert answered <= 10
        assert answered <= 4
        assert node.stats["drop:stun"] >= 6
    finally:
        await node.close()
