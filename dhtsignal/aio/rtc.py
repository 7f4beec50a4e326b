"""The thin aiortc wrapper: the only module that touches aiortc and aioice.

Theory of operation
-------------------

A session is one :class:`PeerConnection` (an ``RTCPeerConnection`` that records when ICE
connected) carrying two *negotiated* data channels (RFC 8832 section 6): ``data`` on
SCTP stream 0 for the application and ``ctl`` on stream 1 for control messages. Both
sides create them with :func:`open_channels` before any description is made, so they
open on both sides as soon as the SCTP association is up, with no in-band DCEP round
trip. The steps, each a function of the connection:

- :func:`new_connection` with an explicit ICE server list (empty by default: aiortc's
  own default is Google's public STUN server);
- :func:`local_description` makes the offer or answer (aiortc gathers every candidate
  first, so it is complete) and :func:`apply_remote` applies the other side's;
- :func:`wait_open` waits for the channels within a deadline and raises
  :class:`~dhtsignal.errors.ConnectFailed` naming the stage that failed and the
  candidate types gathered, received and tried (:func:`candidate_types`);
- :func:`selected_pair` reports the nominated pair's candidate types;
- :func:`dtls_fingerprints` the SHA-256 fingerprints of both certificates as used in
  the DTLS handshake, for the channel binding (:mod:`dhtsignal.signaling.binding`).

aiortc uses only the first STUN and the first TURN URL, so a second one is a
configuration error rather than silently ignored.

Failing fast: aioice reports ICE failure only when every candidate pair's check has timed
out, and a check is a STUN transaction with RTO 0.5 s doubling for ``RETRY_MAX``
retransmissions: 63.5 s with aioice's default of 6. aioice 0.13 has no per-connection
setting (``Connection.check_start`` passes no retransmission count, and
``stun.Transaction`` reads the module global when it is created), so
:func:`limit_ice_retransmissions` lowers the global to :data:`ICE_CHECK_RETRANSMISSIONS`
(3: 0.5 + 1 + 2 + 4 = 7.5 s) when the first connection is made. ICE failure is then
reported 7.5 s plus 20 ms per candidate pair after checks start, inside the session's
10 s connect deadline, which the session machine's timer enforces (or :func:`wait_open`'s
own ``timeout``). The change also shortens TURN transactions to 7.5 s; server-reflexive
gathering has its own 5 s limit in aioice, and consent checks pass their own count.

The nominated pair and the check list are only reachable through private attributes of
aiortc and aioice; :func:`_ice_pairs` is the one place that reads them and raises
:class:`~dhtsignal.errors.DependencyChanged` if an upgrade moved them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice
import aioice.stun
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSctpTransport,
    RTCSessionDescription,
)
from cryptography.hazmat.primitives.serialization import Encoding

from dhtsignal.errors import ConfigError, ConnectFailed, DependencyChanged, UsageError

logger = logging.getLogger(__name__)

ICE_CHECK_RETRANSMISSIONS = 3
"""Retransmissions of each ICE connectivity check (RFC 8489 section 6.2.1 ``Rc - 1``):
with aioice's 0.5 s initial RTO, a check gives up after 7.5 s."""
GATHER_TIMEOUT = 1.0
"""Seconds gathering waits for STUN and TURN servers (aioice's own default is 5 s): a
silent server costs at most this, and :func:`dhtsignal.ice.gathering_problems` names it."""
DATA_CHANNEL = ("data", 0)
"""Label and SCTP stream of the application's channel."""
CTL_CHANNEL = ("ctl", 1)
"""Label and SCTP stream of the control channel (always reliable and ordered)."""
_TRIED = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED"})
"""aioice pair states of a pair whose check has started."""
_ICE_URL = re.compile(r"(?P<scheme>stun|turns?):[^?:\s]+(:[0-9]{1,5})?(\?transport=(udp|tcp))?")


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, as in RFC 7064 and RFC 7065 URLs."""

    url: str
    """``stun:host[:port]``, ``turn:host[:port][?transport=udp|tcp]`` or ``turns:...``."""
    username: str | None = None
    """TURN only: the username (for example an ephemeral HMAC credential's name)."""
    credential: str | None = None
    """TURN only: the password."""

    def __post_init__(self) -> None:
        match = _ICE_URL.fullmatch(self.url)
        if match is None:
            raise ConfigError("ice_servers", f"{self.url!r} is not a stun:, turn: or turns: URL")
        if not all(v is None or isinstance(v, str) for v in (self.username, self.credential)):
            raise ConfigError("ice_servers", f"{self.url!r}: username and credential are text")
        if match["scheme"] != "stun" and not (self.username and self.credential):
            raise ConfigError("ice_servers", f"{self.url!r} needs a username and credential")

    @property
    def is_turn(self) -> bool:
        """Whether this is a TURN server."""
        return not self.url.startswith("stun:")

    @classmethod
    def parse(cls, spec: IceServerSpec) -> list[IceServer]:
        """Servers from a URL string or a WebRTC-style ``{"urls": ..., "username": ...,
        "credential": ...}`` mapping (``urls`` a string or a list).

        :param spec: one configured server.
        :raises ConfigError: if it is malformed.
        """
        if isinstance(spec, IceServer):
            return [spec]
        if isinstance(spec, str):
            return [cls(spec)]
        urls = spec.get("urls")
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ConfigError("ice_servers", f"{spec!r} has no URL string or list in 'urls'")
        return [cls(url, spec.get("username"), spec.get("credential")) for url in urls]


IceServerSpec = IceServer | str | Mapping[str, Any]
"""One configured server: an :class:`IceServer`, a URL, or a WebRTC-style mapping."""


class PeerConnection(RTCPeerConnection):
    """An ``RTCPeerConnection`` that records when ICE connected.

    :param configuration: the aiortc configuration (see :func:`new_connection`).
    """

    def __init__(self, configuration: RTCConfiguration) -> None:
        super().__init__(configuration)
        self.ice_connected_at: float | None = None
        """Event-loop time at which ICE nominated a pair."""
        self.on("iceconnectionstatechange", self._on_ice_state)

    def _on_ice_state(self) -> None:
        if self.iceConnectionState == "completed":
            self.ice_connected_at = time.monotonic()


def rtc_configuration(ice_servers: Sequence[IceServerSpec]) -> RTCConfiguration:
    """The aiortc configuration for exactly these servers (never aiortc's default).

    :param ice_servers: at most one STUN and one TURN server.
    :raises ConfigError: for a malformed server or more servers than aiortc uses.
    """
    servers = [server for spec in ice_servers for server in IceServer.parse(spec)]
    if sum(s.is_turn for s in servers) > 1 or sum(not s.is_turn for s in servers) > 1:
        raise ConfigError("ice_servers", "aiortc uses at most one STUN and one TURN server")
    return RTCConfiguration(
        iceServers=[RTCIceServer(s.url, s.username, s.credential) for s in servers]
    )


_GATHER_ALL = aioice.ice.get_host_addresses


def use_host_addresses(addresses: Sequence[str] | None) -> None:
    """Gather host candidates on exactly ``addresses`` (None: every interface, aioice's default).

    aioice never gathers loopback addresses and has no per-connection setting, so this
    is process-wide. Tests, the demo and the benchmarks pass ``["127.0.0.1"]`` so that
    ICE traffic stays on loopback.

    :param addresses: IP addresses of this host, or None.
    """
    if addresses is None:
        aioice.ice.get_host_addresses = _GATHER_ALL
        return
    fixed = list(addresses)

    def gather(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = gather


def host_addresses() -> list[str]:
    """The addresses host candidates are gathered on now (see :func:`use_host_addresses`)."""
    return list(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))


def limit_ice_retransmissions() -> None:
    """Lower aioice's process-wide STUN retransmission count to
    :data:`ICE_CHECK_RETRANSMISSIONS` (a lower value set by the application stays)."""
    aioice.stun.RETRY_MAX = min(aioice.stun.RETRY_MAX, ICE_CHECK_RETRANSMISSIONS)


_GET_COMPONENT_CANDIDATES = aioice.ice.Connection.get_component_candidates


def limit_gathering(timeout: float = GATHER_TIMEOUT) -> None:
    """Make aioice wait at most ``timeout`` seconds for STUN and TURN servers while
    gathering (process-wide: aioice has no per-connection setting, and
    ``Connection.gather_candidates`` passes none to ``get_component_candidates``).

    :param timeout: seconds; host candidates are never waited for.
    """

    limit: Any = timeout  # aioice annotates it int; asyncio.wait takes any number

    async def gather(
        self: aioice.ice.Connection, component: int, addresses: list[str], timeout_: Any = None
    ) -> list[aioice.Candidate]:
        candidates: list[aioice.Candidate] = await _GET_COMPONENT_CANDIDATES(
            self, component, addresses, timeout=limit
        )
        return candidates

    aioice.ice.Connection.get_component_candidates = gather  # type: ignore[method-assign,assignment]


def has_ipv4_host(pc: RTCPeerConnection) -> bool:
    """Whether the connection gathered an IPv4 host candidate (the only kind aioice asks
    a STUN server about).

    :param pc: a connection with a data channel whose local description is set.
    """
    ice = _sctp(pc).transport.transport
    return any(c.type == "host" and ":" not in c.ip for c in ice.iceGatherer.getLocalCandidates())


def new_connection(ice_servers: Sequence[IceServerSpec] = ()) -> PeerConnection:
    """A new connection using exactly ``ice_servers``, with fast ICE failure.

    :param ice_servers: see :func:`rtc_configuration`; none by default (host candidates).
    :raises ConfigError: for a malformed server list.
    """
    configuration = rtc_configuration(ice_servers)
    limit_ice_retransmissions()
    limit_gathering()
    return PeerConnection(configuration)


def open_channels(
    pc: RTCPeerConnection,
    ordered: bool = True,
    max_retransmits: int | None = None,
    max_packet_life_time: int | None = None,
) -> tuple[RTCDataChannel, RTCDataChannel]:
    """Create the negotiated ``data`` and ``ctl`` channels; call before any description.

    :param pc: the connection.
    :param ordered: whether ``data`` delivers in order.
    :param max_retransmits: partial reliability of ``data``: retransmissions at most.
    :param max_packet_life_time: partial reliability of ``data``: milliseconds at most.
    :raises UsageError: if both partial-reliability limits are given.
    """
    if max_retransmits is not None and max_packet_life_time is not None:
        raise UsageError("give max_retransmits or max_packet_life_time, not both")
    data = pc.createDataChannel(
        DATA_CHANNEL[0],
        ordered=ordered,
        maxRetransmits=max_retransmits,
        maxPacketLifeTime=max_packet_life_time,
        negotiated=True,
        id=DATA_CHANNEL[1],
    )
    return data, pc.createDataChannel(CTL_CHANNEL[0], negotiated=True, id=CTL_CHANNEL[1])


async def local_description(pc: RTCPeerConnection, *, offer: bool) -> str:
    """Make and apply the local offer or answer, with every candidate gathered.

    :param pc: the connection.
    :param offer: True for an offer, False for the answer to the applied remote offer.
    :returns: the SDP text.
    """
    await pc.setLocalDescription(await (pc.createOffer() if offer else pc.createAnswer()))
    text: str = pc.localDescription.sdp
    return text


async def apply_remote(pc: RTCPeerConnection, sdp: str, type: str) -> None:
    """Apply the remote offer or answer; after an answer, ICE starts.

    :param pc: the connection.
    :param sdp: the SDP text, for example from :func:`dhtsignal.signaling.sdp.expand`.
    :param type: ``"offer"`` or ``"answer"``.
    """
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=type))


async def wait_open(
    pc: PeerConnection, channels: Sequence[RTCDataChannel], timeout: float | None = None
) -> float:
    """Wait until every channel is open. The caller still owns (and closes) ``pc``.

    :param pc: the connection, its remote description applied.
    :param channels: the channels that must open.
    :param timeout: seconds to wait at most; None leaves the deadline to the caller (the
        peer's session machine), which cancels the wait.
    :returns: the time.monotonic() at which ICE connected.
    :raises ConnectFailed: on ICE or DTLS failure (``ice-failed``, ``dtls-failed``), on
        closure (``closed``) or when ``timeout`` runs out (``timeout``).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    # When every channel is open: the time ICE connected; else the failure reason.
    outcome: asyncio.Future[str | float] = loop.create_future()

    def check() -> None:
        if outcome.done():
            return
        state = pc.connectionState
        if state == "failed":
            outcome.set_result("ice-failed" if pc.iceConnectionState == "failed" else "dtls-failed")
        elif state == "closed":
            outcome.set_result("closed")
        elif pc.ice_connected_at is not None and all(c.readyState == "open" for c in channels):
            outcome.set_result(pc.ice_connected_at)

    pc.on("connectionstatechange", check)
    for channel in channels:
        channel.on("open", check)
    check()
    try:
        result = await asyncio.wait_for(outcome, timeout)
    except TimeoutError:
        result = "timeout"
    finally:
        pc.remove_listener("connectionstatechange", check)
        for channel in channels:
            channel.remove_listener("open", check)
    if isinstance(result, float):
        return result
    error = ConnectFailed(result, loop.time() - started, *candidate_types(pc))
    logger.debug("%s", error)
    raise error


def candidate_types(
    pc: RTCPeerConnection,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The candidate types gathered locally, received from the peer, and the
    ``local->remote`` type pairs ICE has checked so far.

    :param pc: a connection with a data channel.
    """
    _, checks = _ice_pairs(pc)
    ice = _sctp(pc).transport.transport
    tried = {f"{local}->{remote}" for local, remote, state in checks if state in _TRIED}
    return (
        tuple(sorted({c.type for c in ice.iceGatherer.getLocalCandidates()})),
        tuple(sorted({c.type for c in ice.getRemoteCandidates()})),
        tuple(sorted(tried)),
    )


def candidate_families(pc: RTCPeerConnection) -> tuple[frozenset[int], frozenset[int]]:
    """The IP versions (4, 6) of the candidates gathered locally and of those received
    from the peer: ICE pairs only candidates of one version, so disjoint sets mean no
    pair could even be tried.

    :param pc: a connection with a data channel.
    """
    ice = _sctp(pc).transport.transport

    def versions(cands: Sequence[Any]) -> frozenset[int]:
        return frozenset(6 if ":" in str(c.ip) else 4 for c in cands)

    return versions(ice.iceGatherer.getLocalCandidates()), versions(ice.getRemoteCandidates())


def candidate_summary(pc: RTCPeerConnection) -> str:
    """:func:`candidate_types` as text for error messages.

    :param pc: a connection with a data channel.
    """
    return ConnectFailed.describe(*candidate_types(pc))


def selected_pair(pc: RTCPeerConnection) -> tuple[str, str] | None:
    """The (local, remote) candidate types of the nominated pair, e.g. ``("host", "srflx")``.

    :param pc: a connection with a data channel.
    :returns: None until ICE has nominated a pair.
    :raises DependencyChanged: if aiortc or aioice no longer keep it where we read it.
    """
    return _ice_pairs(pc)[0]


def dtls_fingerprints(pc: RTCPeerConnection) -> tuple[bytes, bytes]:
    """SHA-256 of our DTLS certificate and of the one the remote presented, both as the
    handshake used them (DER), once the connection is up.

    aiortc keeps the OpenSSL connection private (``RTCDtlsTransport._ssl``); this is the one
    place that reads it.

    :param pc: a connection whose DTLS handshake completed.
    :raises ConnectFailed: no handshake has completed (``dtls-failed``).
    :raises DependencyChanged: aiortc no longer keeps the connection where we read it.
    """
    try:
        ssl = _sctp(pc).transport._ssl
        local = None if ssl is None else ssl.get_certificate(as_cryptography=True)
        remote = None if ssl is None else ssl.get_peer_certificate(as_cryptography=True)
    except (AttributeError, TypeError) as exc:
        raise DependencyChanged(
            "aiortc internals changed: cannot read the DTLS certificates at "
            f"pc.sctp.transport._ssl ({exc})"
        ) from exc
    if local is None or remote is None:
        raise ConnectFailed("dtls-failed", 0.0, *candidate_types(pc))
    return (
        hashlib.sha256(local.public_bytes(Encoding.DER)).digest(),
        hashlib.sha256(remote.public_bytes(Encoding.DER)).digest(),
    )


def _sctp(pc: RTCPeerConnection) -> RTCSctpTransport:
    if pc.sctp is None:
        raise UsageError("the RTCPeerConnection has no data channel")
    return pc.sctp


def _ice_pairs(pc: RTCPeerConnection) -> tuple[tuple[str, str] | None, list[tuple[str, str, str]]]:
    """Read aioice's private candidate pairs: the nominated pair's (local, remote) types
    or None, and (local type, remote type, state) for each pair of the check list."""
    sctp = _sctp(pc)
    try:
        connection = sctp.transport.transport._connection
        nominated = connection._nominated.get(1)
        checks = [
            (p.local_candidate.type, p.remote_candidate.type, p.state.name)
            for p in connection._check_list
        ]
        if nominated is None:
            return None, checks
        return (nominated.local_candidate.type, nominated.remote_candidate.type), checks
    except (AttributeError, TypeError) as exc:
        raise DependencyChanged(
            "aiortc/aioice internals changed: cannot read the ICE candidate pairs at "
            f"pc.sctp.transport.transport._connection._nominated/_check_list ({exc})"
        ) from exc
