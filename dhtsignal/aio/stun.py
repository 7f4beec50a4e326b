"""STUN Binding on a DHT node's own UDP port (RFC 8489), with aioice's ``stun`` module.

Theory of operation
-------------------
A DHT node that answers STUN Binding requests is a STUN server for every peer that knows
it: peers gather their server-reflexive candidates from the DHT nodes they already talk
to, and no third-party server is needed (:mod:`dhtsignal.ice` chooses which one).

The codec tells STUN apart from DHT RPCs by the first byte and the magic cookie
(:func:`dhtsignal.wire.codec.is_stun`, RFC 7983 section 7); the sans-I/O node hands such
a datagram to its ``stun_responder`` after the per-source rate limiter admitted it, and
sends back what :func:`binding_response` returns. Parsing and building are aioice's
(:func:`aioice.stun.parse_message`, :class:`aioice.stun.Message`): no parser of our own.

Only a Binding *request* without credentials is answered (a connectivity check of ICE
carries ``USERNAME`` and ``MESSAGE-INTEGRITY`` and is not for us), with one
``XOR-MAPPED-ADDRESS`` (and a ``FINGERPRINT`` if the request had one). Anything else is
dropped: no error responses, so nothing a spoofed source can bounce at a victim beyond
the Binding response itself, which is never larger than :data:`AMPLIFICATION` times the
request (a 20-byte request gets a 32-byte answer for IPv4, 44 for IPv6).

:func:`binding_request` and :func:`mapped_address` are the client half, for tests and
for probing a server.
"""

from __future__ import annotations

from typing import Any

from dhtsignal.wire.addr import Addr

aioice: Any
try:
    import aioice.stun
except ImportError:  # the WebRTC extra is not installed: a bootstrap node drops STUN
    aioice = None

AVAILABLE = aioice is not None
"""Whether aioice is installed (``pip install dhtsignal[webrtc]``); without it a DHT node
drops STUN (counted ``drop:stun``) and runs otherwise unchanged."""

AMPLIFICATION = 3
"""A STUN answer is at most this many times the size of the request (a bound on
reflection attacks, as QUIC's three-times rule, RFC 9000 section 8)."""
_ICE_CHECK = frozenset({"USERNAME", "MESSAGE-INTEGRITY", "PRIORITY"})
"""Attributes of an ICE connectivity check (RFC 8445 section 7.1.1): not for a server."""


def binding_response(data: bytes, source: Addr) -> bytes | None:
    """The Binding success response to ``data`` from ``source``, or None to drop it.

    :param data: a datagram the codec recognised as STUN.
    :param source: where it came from, ``(host, port)``: the mapped address we report.
    :returns: the response, at most :data:`AMPLIFICATION` times ``len(data)``; None for
        anything but a well-formed credential-free Binding request.
    """
    if aioice is None:
        return None
    try:
        request = aioice.stun.parse_message(data)
    except Exception:  # remote garbage: aioice raises ValueError, struct.error, ...
        return None
    if (
        request.message_method != aioice.stun.Method.BINDING
        or request.message_class != aioice.stun.Class.REQUEST
        or not _ICE_CHECK.isdisjoint(request.attributes)
    ):
        return None
    response = aioice.stun.Message(
        aioice.stun.Method.BINDING,
        aioice.stun.Class.RESPONSE,
        transaction_id=request.transaction_id,
    )
    response.attributes["XOR-MAPPED-ADDRESS"] = (source[0], source[1])
    if "FINGERPRINT" in request.attributes:
        response.add_fingerprint()
    try:
        out = bytes(response)
    except Exception:  # an address aioice cannot pack
        return None
    return out if len(out) <= AMPLIFICATION * len(data) else None


def binding_request() -> tuple[bytes, bytes]:
    """A fresh Binding request: ``(transaction id, datagram)``."""
    request = aioice.stun.Message(aioice.stun.Method.BINDING, aioice.stun.Class.REQUEST)
    return request.transaction_id, bytes(request)


def mapped_address(data: bytes, transaction_id: bytes) -> Addr | None:
    """The ``XOR-MAPPED-ADDRESS`` of a Binding success response to ``transaction_id``.

    :param data: a datagram received from the server.
    :param transaction_id: the request's transaction id.
    :returns: None if ``data`` is not that response.
    """
    try:
        response = aioice.stun.parse_message(data)
    except Exception:
        return None
    if (
        response.transaction_id != transaction_id
        or response.message_class != aioice.stun.Class.RESPONSE
    ):
        return None
    mapped = response.attributes.get("XOR-MAPPED-ADDRESS")
    if not isinstance(mapped, tuple):
        return None
    return (str(mapped[0]), int(mapped[1]))
