"""The aiortc wrapper over loopback: connect, fail fast and clearly, read the selected pair."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioice.ice
import aioice.stun
import pytest
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from dhtsignal.aio import rtc
from dhtsignal.aio.rtc import IceServer, PeerConnection
from dhtsignal.errors import ConfigError, ConnectFailed, DependencyChanged, UsageError
from dhtsignal.signaling import sdp

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """aioice skips 127.0.0.1 when gathering; make it the only host address."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    yield


@dataclasses.dataclass
class Side:
    pc: PeerConnection
    data: RTCDataChannel
    ctl: RTCDataChannel


@pytest.fixture
async def sides() -> AsyncIterator[tuple[Side, Side]]:
    caller, callee = rtc.new_connection(), rtc.new_connection()
    pair = (Side(caller, *rtc.open_channels(caller)), Side(callee, *rtc.open_channels(callee)))
    yield pair
    await caller.close()
    await callee.close()


async def _negotiate(caller: PeerConnection, callee: PeerConnection) -> bytes:
    """Offer and answer through compact SDP, as a session does; return the compact answer."""
    offer = sdp.compact(await rtc.local_description(caller, offer=True), "offer")
    await rtc.apply_remote(callee, sdp.expand(offer)[1], "offer")
    return sdp.compact(await rtc.local_description(callee, offer=False), "answer")


@pytest.mark.asyncio
async def test_two_peers_connect_and_carry_messages(sides: tuple[Side, Side]) -> None:
    caller, callee = sides
    answer = await _negotiate(caller.pc, callee.pc)
    assert rtc.selected_pair(caller.pc) is None
    await rtc.apply_remote(caller.pc, sdp.expand(answer)[1], "answer")
    loop = asyncio.get_running_loop()
    ice_times = await asyncio.gather(
        rtc.wait_open(caller.pc, [caller.data, caller.ctl], 10),
        rtc.wait_open(callee.pc, [callee.data, callee.ctl], 10),
    )
    assert all(t <= loop.time() for t in ice_times)
    got: asyncio.Queue[Any] = asyncio.Queue()
    callee.data.on("message", got.put_nowait)
    callee.ctl.on("message", got.put_nowait)
    caller.data.send(b"data over loopback")
    assert await asyncio.wait_for(got.get(), 10) == b"data over loopback"
    caller.ctl.send("ctl over loopback")
    assert await asyncio.wait_for(got.get(), 10) == "ctl over loopback"
    for side in sides:
        assert rtc.selected_pair(side.pc) == ("host", "host")
        assert rtc.candidate_types(side.pc) == (("host",), ("host",), ("host->host",))
    assert rtc.candidate_summary(caller.pc) == (
        "local candidates: host; remote candidates: host; pairs tried: host->host"
    )


@pytest.mark.asyncio
async def test_unreachable_peer_fails_fast_and_clearly(sides: tuple[Side, Side]) -> None:
    caller, callee = sides
    answer = await _negotiate(caller.pc, callee.pc)
    await callee.pc.close()  # its candidates now point to closed loopback ports
    assert aioice.stun.RETRY_MAX == rtc.ICE_CHECK_RETRANSMISSIONS
    loop = asyncio.get_running_loop()
    started = loop.time()
    await rtc.apply_remote(caller.pc, sdp.expand(answer)[1], "answer")
    with pytest.raises(ConnectFailed) as caught:
        await rtc.wait_open(caller.pc, [caller.data], 10)
    assert loop.time() - started < 9.0
    error = caught.value
    assert error.reason == "ice-failed"
    assert (error.local_types, error.remote_types, error.tried) == (
        ("host",),
        ("host",),
        ("host->host",),
    )
    assert "(ice-failed)" in str(error) and "remote candidates: host" in str(error)


@pytest.mark.asyncio
async def test_a_swapped_fingerprint_fails_dtls(sides: tuple[Side, Side]) -> None:
    caller, callee = sides
    answer = sdp.Description.unpack(await _negotiate(caller.pc, callee.pc))
    forged = dataclasses.replace(answer, fingerprint=bytes(len(answer.fingerprint)))
    await rtc.apply_remote(caller.pc, forged.render(), "answer")
    with pytest.raises(ConnectFailed) as caught:
        await rtc.wait_open(caller.pc, [caller.data], 10)
    assert caught.value.reason == "dtls-failed"
    assert caught.value.tried == ("host->host",)


@pytest.mark.asyncio
async def test_wait_open_enforces_its_deadline(sides: tuple[Side, Side]) -> None:
    caller, _ = sides
    await rtc.local_description(caller.pc, offer=True)
    with pytest.raises(ConnectFailed) as caught:
        await rtc.wait_open(caller.pc, [caller.data], 0.05)
    assert (caught.value.reason, caught.value.tried) == ("timeout", ())


@pytest.mark.asyncio
async def test_closing_ends_the_wait(sides: tuple[Side, Side]) -> None:
    caller, _ = sides
    await rtc.local_description(caller.pc, offer=True)
    waiting = asyncio.create_task(rtc.wait_open(caller.pc, [caller.data], 10))
    await caller.pc.close()
    with pytest.raises(ConnectFailed) as caught:
        await asyncio.wait_for(waiting, 5)
    assert caught.value.reason == "closed"


@pytest.mark.asyncio
async def test_selected_pair_fails_loudly_if_internals_move(sides: tuple[Side, Side]) -> None:
    ice = sides[0].data.transport.transport.transport
    connection = ice._connection
    ice._connection = object()  # type: ignore[assignment]
    try:
        with pytest.raises(DependencyChanged, match="_nominated"):
            rtc.selected_pair(sides[0].pc)
    finally:
        ice._connection = connection


@pytest.mark.asyncio
async def test_selected_pair_needs_a_data_channel() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        with pytest.raises(UsageError):
            rtc.selected_pair(pc)
    finally:
        await pc.close()


@pytest.mark.asyncio
async def test_no_stun_server_by_default(sides: tuple[Side, Side]) -> None:
    gatherer = sides[0].data.transport.transport.transport.iceGatherer
    assert gatherer._connection.stun_server is None
    assert gatherer._connection.turn_server is None


@pytest.mark.asyncio
async def test_channel_options(sides: tuple[Side, Side]) -> None:
    pc = sides[0].pc
    pc2 = rtc.new_connection()
    try:
        data, ctl = rtc.open_channels(pc2, ordered=False, max_retransmits=2)
        assert (data.label, data.id, data.ordered, data.maxRetransmits) == ("data", 0, False, 2)
        assert (ctl.label, ctl.id, ctl.ordered, ctl.maxRetransmits) == ("ctl", 1, True, None)
        with pytest.raises(UsageError):
            rtc.open_channels(pc, max_retransmits=1, max_packet_life_time=100)
    finally:
        await pc2.close()


def test_ice_servers_are_passed_explicitly() -> None:
    configuration = rtc.rtc_configuration(
        [
            "stun:127.0.0.1:3478",
            {"urls": ["turn:127.0.0.1:3478?transport=udp"], "username": "u", "credential": "p"},
        ]
    )
    assert configuration.iceServers is not None
    assert [(s.urls, s.username, s.credential) for s in configuration.iceServers] == [
        ("stun:127.0.0.1:3478", None, None),
        ("turn:127.0.0.1:3478?transport=udp", "u", "p"),
    ]
    assert rtc.rtc_configuration([]).iceServers == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("http://127.0.0.1", "not a stun"),
        ("stun:127.0.0.1:3478\r\n", "not a stun"),
        ("turn:127.0.0.1", "username and credential"),
        ({"urls": "turns:127.0.0.1:5349", "username": "u"}, "username and credential"),
        ({"urls": "turn:127.0.0.1", "username": "u", "credential": 7}, "are text"),
        ({"url": "stun:127.0.0.1"}, "'urls'"),
        ([IceServer("stun:127.0.0.1:1"), "stun:127.0.0.1:2"], "at most one STUN"),
    ],
)
def test_bad_ice_servers_are_config_errors(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        rtc.rtc_configuration(spec if isinstance(spec, list) else [spec])
    assert caught.value.setting == "ice_servers"
