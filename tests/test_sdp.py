"""Compact SDP: round trips, hostile blobs, and a real aiortc connection through it."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import string
from collections.abc import Iterator
from typing import Any

import aioice.ice
import msgpack
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from hypothesis import assume, given
from hypothesis import strategies as st

from dhtsignal.dht import records
from dhtsignal.dht.records import RecordType, inbox_key
from dhtsignal.errors import ProtocolError, UsageError
from dhtsignal.identity import Identity
from dhtsignal.signaling import envelope, sdp
from dhtsignal.signaling.envelope import MessageType
from dhtsignal.wire import codec

ICE_CHARS = string.ascii_letters + string.digits + "+/"


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """aioice skips 127.0.0.1 when gathering; make it the only host address."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
    yield


ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(0, 65535)


@st.composite
def candidate_lines(draw: st.DrawFn) -> str:
    cand_type = draw(st.sampled_from(sdp.CANDIDATE_TYPES))
    foundation = draw(
        st.one_of(
            st.binary(min_size=1, max_size=16).map(bytes.hex),
            st.text(ICE_CHARS, min_size=1, max_size=32),
        )
    )
    line = (
        f"a=candidate:{foundation} {draw(st.integers(1, 256))} udp "
        f"{draw(st.integers(0, 2**32 - 1))} {draw(ips)} {draw(ports)} typ {cand_type}"
    )
    if cand_type != "host":
        line += f" raddr {draw(ips)} rport {draw(ports)}"
    return line


@st.composite
def aiortc_like(draw: st.DrawFn) -> tuple[str, str, dict[str, object]]:
    """An SDP laid out as aiortc writes it, with the values that must survive."""
    algorithm = draw(st.sampled_from(sorted(sdp.DIGEST_SIZES)))
    size = sdp.DIGEST_SIZES[algorithm]
    fingerprint = draw(st.binary(min_size=size, max_size=size))
    fields: dict[str, object] = {
        "type": draw(st.sampled_from(sdp.TYPES)),
        "mid": draw(st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)),
        "ufrag": draw(st.text(ICE_CHARS, min_size=4, max_size=40)),
        "pwd": draw(st.text(ICE_CHARS, min_size=22, max_size=60)),
        "fingerprint_algorithm": algorithm,
        "fingerprint": fingerprint,
        "setup": draw(st.sampled_from(sdp.SETUPS)),
        "sctp_port": draw(ports),
        "max_message_size": draw(st.integers(0, 2**40)),
    }
    candidates = draw(st.lists(candidate_lines(), max_size=sdp.MAX_CANDIDATES))
    digest = ":".join(f"{b:02X}" for b in fingerprint)
    text = "\r\n".join(
        [
            "v=0",
            "o=- 4004302174 4004302174 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            f"a=group:BUNDLE {fields['mid']}",
            "a=msid-semantic:WMS *",
            f"m=application {draw(ports)} UDP/DTLS/SCTP webrtc-datachannel",
            "c=IN IP4 192.0.2.2",
            f"a=mid:{fields['mid']}",
            f"a=sctp-port:{fields['sctp_port']}",
            f"a=max-message-size:{fields['max_message_size']}",
            *candidates,
            "a=end-of-candidates",
            f"a=ice-ufrag:{fields['ufrag']}",
            f"a=ice-pwd:{fields['pwd']}",
            f"a=fingerprint:{algorithm} {digest}",
            "a=fingerprint:sha-512 " + ":".join(["AB"] * 64),
            f"a=setup:{fields['setup']}",
            "",
        ]
    )
    fields["candidates"] = [c[len("a=candidate:") :] for c in candidates]
    return text, str(fields["type"]), fields


@given(aiortc_like())
def test_round_trip_keeps_every_field(case: tuple[str, str, dict[str, object]]) -> None:
    text, type_, fields = case
    original = sdp.Description.parse(text, type_)
    assume(len(original.pack()) <= sdp.MAX_BLOB)  # larger ones: see the trimming test
    blob = sdp.compact(text, type_)
    expanded_type, expanded = sdp.expand(blob)
    assert expanded_type == type_
    assert sdp.compact(expanded, expanded_type) == blob
    assert sdp.Description.parse(expanded, expanded_type) == original
    assert [c.to_sdp() for c in original.candidates] == fields.pop("candidates")
    assert {name: getattr(original, name) for name in fields} == fields


@given(aiortc_like(), st.integers(200, sdp.MAX_BLOB))
def test_too_large_descriptions_lose_their_least_preferred_candidates(
    case: tuple[str, str, dict[str, object]], limit: int
) -> None:
    text, type_, _ = case
    original = sdp.Description.parse(text, type_)
    try:
        blob = sdp.compact(text, type_, limit)
    except UsageError:  # even without candidates it does not fit
        assert len(dataclasses.replace(original, candidates=()).pack()) > limit
        return
    assert len(blob) <= limit
    kept = sdp.Description.unpack(blob)
    assert dataclasses.replace(kept, candidates=()) == dataclasses.replace(original, candidates=())
    # The kept candidates are the original's in their order, and none dropped is preferred.
    it = iter(original.candidates)
    assert all(any(c == o for o in it) for c in kept.candidates)
    dropped = [c for c in original.candidates if c not in kept.candidates]
    if dropped and kept.candidates:
        assert max(c.priority for c in dropped) <= min(c.priority for c in kept.candidates)
    if len(original.pack()) <= limit:
        assert kept == original


def test_largest_offer_body_fits_an_inbox_record() -> None:
    """MAX_BLOB is chosen so the worst-case offer still fits one signed INBOX record."""
    sender, recipient = Identity.generate(), Identity.generate()
    widest_ip = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
    body = {
        "sdp": b"\xff" * sdp.MAX_BLOB,
        "x": bytes(32),
        "id": "a" * 64,
        "dht": [[widest_ip, 65535]] * 3,
        "ch": [True, 65535, 65535],
    }
    now = 2.0e9
    blob = envelope.seal(
        sender,
        recipient.public_key,
        recipient.x25519_public,
        bytes(8),
        MessageType.OFFER,
        codec.pack(body),
        now,
    )
    rec = records.sign(
        sender,
        RecordType.INBOX,
        inbox_key(recipient.public_key),
        blob,
        seq=2**62,
        expires=now + 60,
        sub=bytes(8) + bytes([int(MessageType.OFFER)]),
    )
    assert len(rec.raw) <= records.MAX_RECORD


def _expand_or_refuse(blob: bytes) -> None:
    """Whatever ``expand`` accepts must render to an SDP that compacts back to itself."""
    try:
        type_, text = sdp.expand(blob)
    except ProtocolError:
        return
    assert sdp.expand(sdp.compact(text, type_)) == (type_, text)


@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_protocol_error(blob: bytes) -> None:
    _expand_or_refuse(blob)


def _containers_of(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Lists and maps of ``inner`` (the recursive step; a named function, since hypothesis
    reads a lambda's source to check it recurses, and that reading is not reliable)."""
    return st.one_of(
        st.lists(inner, max_size=10), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    )


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(allow_nan=False),
        st.text(max_size=40),
        st.binary(max_size=40),
    ),
    _containers_of,
    max_leaves=20,
)

VALID = sdp.Description(
    type="offer",
    mid="0",
    ufrag="abcd",
    pwd="a" * 22,
    fingerprint_algorithm="sha-256",
    fingerprint=bytes(32),
    setup="actpass",
    sctp_port=5000,
    max_message_size=262144,
    candidates=(
        sdp.Candidate("ab12", 1, "udp", 1, ipaddress.ip_address("127.0.0.1"), 9, "host"),
        sdp.Candidate(
            "x/+y",
            1,
            "udp",
            2,
            ipaddress.ip_address("::1"),
            9,
            "srflx",
            (ipaddress.ip_address("10.0.0.1"), 7),
        ),
    ),
)


@given(st.integers(0, 10), msgpack_values)
def test_garbage_field_raises_only_protocol_error(position: int, value: object) -> None:
    items = msgpack.unpackb(VALID.pack())
    items[position] = value
    _expand_or_refuse(msgpack.packb(items, use_bin_type=True))


@given(st.integers(0, 1), st.integers(0, 8), msgpack_values)
def test_garbage_candidate_field_raises_only_protocol_error(
    which: int, position: int, value: object
) -> None:
    items = msgpack.unpackb(VALID.pack())
    candidate = items[10][which]
    candidate[position % len(candidate)] = value
    _expand_or_refuse(msgpack.packb(items, use_bin_type=True))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n", "data-channel"),
        ("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:0\r\n", "needed field"),
        (
            "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
            "a=candidate:1 1 udp 1 1.2.3.4 5 typ host generation 0\r\n",
            "unsupported candidate",
        ),
    ],
)
def test_compact_refuses_what_it_cannot_carry(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sdp.compact(text, "offer")


def test_compact_refuses_unknown_type() -> None:
    with pytest.raises(UsageError, match="SDP type"):
        sdp.compact(VALID.render(), "pranswer")


def test_expand_refuses_injected_lines() -> None:
    items = msgpack.unpackb(VALID.pack())
    items[3] = "abcd\r\na=setup:passive"
    with pytest.raises(ProtocolError, match="ice-ufrag"):
        sdp.expand(msgpack.packb(items, use_bin_type=True))


def _remote(blob: bytes) -> RTCSessionDescription:
    type_, text = sdp.expand(blob)
    return RTCSessionDescription(sdp=text, type=type_)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.usefixtures("loopback_only")
async def test_aiortc_connects_through_compact_descriptions() -> None:
    config = RTCConfiguration(iceServers=[])
    caller, callee = RTCPeerConnection(config), RTCPeerConnection(config)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @callee.on("datachannel")
    def _on_channel(channel: Any) -> None:
        channel.on("message", received.set_result)

    try:
        channel = caller.createDataChannel("chat")
        opened = asyncio.Event()
        channel.on("open", opened.set)
        await caller.setLocalDescription(await caller.createOffer())
        offer = sdp.compact(caller.localDescription.sdp, "offer")
        await callee.setRemoteDescription(_remote(offer))
        await callee.setLocalDescription(await callee.createAnswer())
        answer = sdp.compact(callee.localDescription.sdp, "answer")
        await caller.setRemoteDescription(_remote(answer))

        assert len(offer) < 300 and len(answer) < 300
        await asyncio.wait_for(opened.wait(), 10)
        channel.send("hello over compact SDP")
        assert await asyncio.wait_for(received, 10) == "hello over compact SDP"
    finally:
        await caller.close()
        await callee.close()
