"""Which STUN and TURN servers a session's ICE agent uses.

Theory of operation
-------------------
A peer needs a STUN server to learn its server-reflexive address, and every DHT node
answers STUN on its own port (:mod:`dhtsignal.aio.stun`). So by default a session's
STUN server is a DHT node the peer already talks to (:func:`dht_stun_server`): aiortc
uses only the first STUN URL, so it is the contact that answered us most recently
(IPv4 only: aioice asks STUN for IPv4 host candidates alone), or, before any contact
has, the first bootstrap node. A STUN server from the configuration replaces it; no
third-party server is ever contacted unless configured, and aiortc's public default
never appears (:func:`dhtsignal.aio.rtc.rtc_configuration` always passes a list).

TURN servers come only from the configuration. A server given with a shared ``secret``
instead of a password gets coturn's ``use-auth-secret`` credentials (the "TURN REST
API" draft, draft-uberti-behave-turn-rest-00 section 2.2): username
``EXPIRY:NAME`` (UNIX seconds), password ``base64(HMAC-SHA1(secret, username))``,
minted afresh for each session (:func:`rest_credential`).

:func:`probe` sends one STUN Binding request (every STUN and TURN server answers one)
to tell a silent server from one that refused our credentials, for error messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dhtsignal.aio import rtc, stun
from dhtsignal.aio.node import DhtNode
from dhtsignal.errors import ConfigError
from dhtsignal.wire.addr import Addr

REST_CREDENTIAL_TTL = 3600.0
"""Lifetime of minted TURN REST credentials, seconds (the draft's example is a day;
a session needs its allocation only while it lasts, and aioice refreshes it)."""
RECENT = 120.0
"""A contact heard from within this many seconds counts as answering recently."""
PROBE_TIMEOUT = 1.0
"""Seconds :func:`probe` waits for a server's answer."""
_HOSTPORT = re.compile(r"^(?:stun|turns?):(\[[^\]]+\]|[^:?]+)(?::(\d{1,5}))?")


def rest_credential(
    secret: str, name: str, now: float, ttl: float = REST_CREDENTIAL_TTL
) -> tuple[str, str]:
    """coturn ``use-auth-secret`` credentials: ``(username, password)``.

    :param secret: the shared secret (coturn's ``static-auth-secret``).
    :param name: who asks (our node ID); coturn ignores it, its logs show it.
    :param now: wall-clock UNIX seconds.
    :param ttl: seconds the credential stays valid.
    """
    username = f"{int(now + ttl)}:{name}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def expand(specs: Sequence[rtc.IceServerSpec], name: str, now: float) -> list[rtc.IceServer]:
    """The configured servers as :class:`~dhtsignal.aio.rtc.IceServer`, with REST
    credentials minted for entries that carry a ``secret``.

    :param specs: URL strings, WebRTC-style mappings (``urls``, ``username``,
        ``credential`` or ``secret``) or servers.
    :param name: our node ID (the REST username's second half).
    :param now: wall-clock UNIX seconds.
    :raises ConfigError: a malformed entry.
    """
    out: list[rtc.IceServer] = []
    for spec in specs:
        if isinstance(spec, Mapping) and spec.get("secret") is not None:
            secret = spec["secret"]
            if not isinstance(secret, str) or not secret:
                raise ConfigError("ice_servers", f"{spec.get('urls')!r}: the secret is text")
            username, password = rest_credential(secret, name, now)
            spec = {"urls": spec.get("urls"), "username": username, "credential": password}
        out.extend(rtc.IceServer.parse(spec))
    return out


def dht_stun_server(node: DhtNode, bootstrap: Sequence[Addr], now: float) -> Addr | None:
    """The DHT node to use as STUN server: the IPv4 contact that answered most recently
    (within :data:`RECENT` seconds, no failure since), else the first IPv4 bootstrap node.

    :param node: our DHT node.
    :param bootstrap: the bootstrap addresses (IP addresses).
    :param now: the node's monotonic time (contacts' ``last_seen``).
    """
    best = None
    for c in node.table.contacts():
        if c.failures or ":" in c.ip or c.last_seen < now - RECENT:
            continue
        if best is None or c.last_seen > best.last_seen:
            best = c
    if best is not None:
        return best.addr
    return next(((h, p) for h, p in bootstrap if ":" not in h), None)


def choose(
    configured: Sequence[rtc.IceServerSpec],
    node: DhtNode,
    bootstrap: Sequence[Addr],
    *,
    name: str,
    now: float,
    wallclock: float,
    dht_stun: bool = True,
) -> list[rtc.IceServer]:
    """The servers for one session: the configured ones, plus a DHT node as the STUN
    server unless one is configured (or ``dht_stun`` is off).

    :param configured: the configured servers (see :func:`expand`).
    :param node: our DHT node.
    :param bootstrap: the bootstrap addresses.
    :param name: our node ID, for REST credentials.
    :param now: the node's monotonic time.
    :param wallclock: wall-clock UNIX seconds.
    :param dht_stun: use a DHT node as the STUN server when none is configured.
    """
    servers = expand(configured, name, wallclock)
    if dht_stun and not any(not s.is_turn for s in servers):
        addr = dht_stun_server(node, bootstrap, now)
        if addr is not None:
            servers.insert(0, rtc.IceServer(f"stun:{addr[0]}:{addr[1]}"))
    return servers


def server_address(url: str) -> Addr | None:
    """``(host, port)`` of a ``stun:``/``turn:`` URL (default port 3478)."""
    match = _HOSTPORT.match(url)
    if match is None:
        return None
    return (match[1].strip("[]"), int(match[2] or 3478))


async def probe(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the server at ``url`` answers a STUN Binding request within ``timeout``
    (one request, one retransmission halfway). ``turns:`` and TCP are not probed (False).
    """
    addr = server_address(url)
    if addr is None or url.startswith("turns:") or "transport=tcp" in url:
        return False
    loop = asyncio.get_running_loop()
    txid, request = stun.binding_request()
    answered: asyncio.Future[None] = loop.create_future()

    class _Probe(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if stun.mapped_address(data, txid) is not None and not answered.done():
                answered.set_result(None)

    try:
        transport, _ = await loop.create_datagram_endpoint(_Probe, remote_addr=addr)
    except OSError:
        return False
    try:
        for _ in range(2):
            transport.sendto(request)
            try:
                await asyncio.wait_for(asyncio.shield(answered), timeout / 2)
                return True
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()


async def gathering_problems(pc: rtc.PeerConnection, servers: Sequence[rtc.IceServer]) -> list[str]:
    """Which of ``servers`` gave no candidate in this connection's gathering, and why
    (a silent server, or a TURN server that answers but refused the allocation).

    :param pc: a connection whose local description is set.
    :param servers: the servers it used.
    """
    local, _, _ = rtc.candidate_types(pc)
    out: list[str] = []
    for server in servers:
        if server.is_turn and "relay" not in local:
            if await probe(server.url):
                out.append(
                    f"TURN server {server.url} answers but gave no relay candidate: "
                    "it refused the TURN credentials (or the allocation)"
                )
            else:
                out.append(
                    f"TURN server {server.url} did not answer within {rtc.GATHER_TIMEOUT:g} s"
                )
        elif not server.is_turn and "srflx" not in local and rtc.has_ipv4_host(pc):
            out.append(f"STUN server {server.url} did not answer within {rtc.GATHER_TIMEOUT:g} s")
    return out
