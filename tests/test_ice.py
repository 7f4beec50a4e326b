"""Choosing ICE servers: DHT nodes as STUN servers by default, TURN REST credentials,
a silent server bounded to a second of gathering and named; the NAT classification.

Real sockets on 127.0.0.1 (a silent server is a bound UDP socket that never answers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from aiortc.rtcicetransport import RTCIceGatherer

from dhtsignal import ice, nat
from dhtsignal.aio import rtc
from dhtsignal.errors import ConfigError
from dhtsignal.peer import PeerConfig

if TYPE_CHECKING:
    from conftest import StartDht, StartPeer


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 where a socket is bound and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def test_rest_credential_is_coturns_use_auth_secret_scheme() -> None:
    username, password = ice.rest_credential("s3cret", "alice", now=1000.0, ttl=60.0)
    assert username == "1060:alice"
    expected = hmac.new(b"s3cret", b"1060:alice", hashlib.sha1).digest()
    assert base64.b64decode(password) == expected
    [server] = ice.expand(
        [{"urls": "turn:192.0.2.1:3478", "secret": "s3cret"}], "alice", now=1000.0
    )
    assert server.username is not None and server.username.endswith(":alice")
    assert server.credential is not None and int(server.username.split(":")[0]) > 1000
    with pytest.raises(ConfigError):
        ice.expand([{"urls": "turn:192.0.2.1", "secret": ""}], "alice", now=0.0)


async def test_no_server_list_is_ever_aiortcs_default(
    monkeypatch: pytest.MonkeyPatch, loopback_ice: None
) -> None:
    config = rtc.rtc_configuration([])
    assert config.iceServers == []  # None would make aiortc use its public server
    asked: list[str] = []

    def default(cls: object) -> list[object]:
        asked.append("default")
        return []

    monkeypatch.setattr(RTCIceGatherer, "getDefaultIceServers", classmethod(default))
    pc = rtc.new_connection([])
    rtc.open_channels(pc)
    try:
        sdp = await rtc.local_description(pc, offer=True)
    finally:
        await pc.close()
    assert asked == [] and "srflx" not in sdp


async def test_a_dht_node_that_answered_is_the_default_stun_server(
    dht: StartDht, peers: StartPeer
) -> None:
    nodes = await dht(3)
    assert nodes[1].address is not None
    boot = [nodes[1].address]
    peer = await peers(None, boot)
    [server] = peer.ice_servers_now()
    assert server.url.startswith("stun:127.0.0.1:")
    assert ice.server_address(server.url) in {n.address for n in nodes}
    # A configured STUN server replaces it; a TURN server is added to it.
    turn = {"urls": "turn:127.0.0.1:9", "username": "u", "credential": "p"}
    peer.ice_servers = ["stun:127.0.0.1:7", turn]
    assert [s.url for s in peer.ice_servers_now()] == ["stun:127.0.0.1:7", "turn:127.0.0.1:9"]
    peer.ice_servers = [turn]
    urls = [s.url for s in peer.ice_servers_now()]
    assert urls[0].startswith("stun:127.0.0.1:") and urls[1] == "turn:127.0.0.1:9"
    # Switched off: nothing but what is configured.
    quiet = await peers(None, boot, config=PeerConfig(dht_stun=False))
    assert quiet.ice_servers_now() == []


@pytest.mark.timeout(30)
async def test_a_silent_stun_or_turn_server_costs_a_second_and_is_named(
    silent_port: int, loopback_ice: None
) -> None:
    servers = ice.expand(
        [
            f"stun:127.0.0.1:{silent_port}",
            {"urls": f"turn:127.0.0.1:{silent_port}", "username": "u", "credential": "p"},
        ],
        "alice",
        now=0.0,
    )
    pc = rtc.new_connection(servers)
    rtc.open_channels(pc)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        await rtc.local_description(pc, offer=True)
        assert loop.time() - began < 1.5  # aioice alone waits 5 s
        problems = await ice.gathering_problems(pc, servers)
        assert loop.time() - began < 3.0
        assert problems == [
            f"STUN server stun:127.0.0.1:{silent_port} did not answer within 1 s",
            f"TURN server turn:127.0.0.1:{silent_port} did not answer within 1 s",
        ]
    finally:
        await pc.close()


async def test_probe_tells_a_server_from_a_silent_port(silent_port: int, dht: StartDht) -> None:
    [node] = await dht(1)
    assert node.address is not None
    assert await ice.probe(f"stun:{node.address[0]}:{node.address[1]}")
    assert not await ice.probe(f"stun:127.0.0.1:{silent_port}", timeout=0.2)


def test_nat_classification() -> None:
    local = ("10.0.0.2", 5000)
    mine = {"10.0.0.2"}
    assert nat.classify(local, [], local_hosts=set()) == "unknown"
    assert nat.classify(local, [("10.0.0.2", 5000)], local_hosts=mine) == "open"
    assert nat.classify(local, [("203.0.113.5", 5000)], local_hosts=set()) == "unknown"
    seen = [("203.0.113.5", 5000)] * 3
    assert nat.classify(local, seen, local_hosts=set()) == "cone"
    seen = [("203.0.113.5", 40001), ("203.0.113.5", 40002)]
    assert nat.classify(local, seen, local_hosts=set()) == "symmetric"
    # A local address but another port: a NAT on this host (port-mapping firewall).
    assert nat.classify(local, [("10.0.0.2", 6000)] * 2, local_hosts=mine) == "cone"


async def test_a_peer_on_loopback_is_open_and_says_so(dht: StartDht, peers: StartPeer) -> None:
    nodes = await dht(4)
    boot = [n.address for n in nodes if n.address is not None]
    alice = await peers("alice", boot)
    assert alice.nat == "open"
    reader = await peers(None, boot)
    from dhtsignal.presence import resolve

    info = await resolve(reader.node, "alice", None)
    assert info.nat == "open" and info.to_json()["nat"] == "open"
