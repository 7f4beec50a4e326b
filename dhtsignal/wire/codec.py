"""Datagram framing, compatible with rpcudp (the transport of the ``kademlia`` package).

Theory of operation
-------------------
A datagram is one marker byte (``0x00`` request, ``0x01`` response), a 20-byte
message id, and a msgpack body. A request body is ``[name, args]``; a response
body is the bare result. Stock ``kademlia`` nodes speak exactly this, with
u-msgpack; we use the C ``msgpack`` package, which produces the same bytes for
the types involved (``bin`` for bytes, ``str`` for text).

Decoding never raises anything but :class:`MalformedDatagram`, whose ``reason``
is a short tag the receive path counts by. Datagrams whose first byte is in the
STUN range (RFC 7983 section 7: 0-3 with the magic cookie) are recognised so a
node can answer STUN Binding requests on its DHT port.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

REQUEST = 0x00
RESPONSE = 0x01
MSG_ID_BYTES = 20
HEADER_BYTES = 1 + MSG_ID_BYTES
#: Largest datagram we accept or send (issue 2). 1400 leaves room for IPv6+UDP headers in 1500.
MAX_DATAGRAM = 1400
#: RFC 5389 section 6: the STUN magic cookie at bytes 4..8.
STUN_MAGIC = b"\x21\x12\xa4\x42"

_packer = msgpack.Packer(use_bin_type=True)


class MalformedDatagram(Exception):
    """A datagram that cannot be decoded. ``reason`` is a counter tag."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Request(NamedTuple):
    """A decoded request datagram (a named tuple: built once per datagram, so cheaply)."""

    msg_id: bytes
    name: str
    args: list[Any]


class Response(NamedTuple):
    """A decoded response datagram."""

    msg_id: bytes
    result: Any


def pack(obj: Any) -> bytes:
    """msgpack-encode ``obj`` (bytes as ``bin``, text as ``str``)."""
    return _packer.pack(obj)


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` items (followed by the packed items)."""
    if n < 16:
        return _FIXARRAY[n]
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_FIXARRAY = [bytes([0x90 | i]) for i in range(16)]


def unpack(data: bytes) -> Any:
    """Decode msgpack with bounds; raises :class:`MalformedDatagram`.

    Zero bytes after the body are padding (:func:`encode_request`) and are ignored."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_bin_len=MAX_DATAGRAM,
            max_str_len=MAX_DATAGRAM,
            max_array_len=256,
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        unpacked, extra = exc.args  # (the body, the bytes after it)
        if bytes(extra).strip(b"\x00"):
            raise MalformedDatagram("undecodable") from None
        return unpacked
    except Exception as exc:  # remote garbage: msgpack raises many types
        raise MalformedDatagram("undecodable") from exc


def unpack_file(data: bytes) -> Any:
    """Decode a msgpack file written by this program (no datagram bounds)."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def encode_request(
    msg_id: bytes, name: str, args: list[Any] | tuple[Any, ...], pad_to: int = 0
) -> bytes:
    """Frame a request. ``args`` is sent as an array.

    :param pad_to: append zero bytes up to this length: a request to a node that has not
        validated our address yet may only be answered with 3x its bytes (issue 10), so a
        request whose full answer is large is padded, as QUIC pads its first packet
        (RFC 9000 section 14.1). Stock nodes are never sent padding.
    """
    data = b"\x00" + msg_id + _packer.pack([name, list(args)])
    if len(data) < pad_to:
        data += bytes(pad_to - len(data))
    return data


def encode_response(msg_id: bytes, result: Any) -> bytes:
    """Frame a response to the request with ``msg_id``."""
    return b"\x01" + msg_id + _packer.pack(result)


def is_stun(data: bytes) -> bool:
    """Whether ``data`` looks like a STUN message (RFC 7983 demultiplexing)."""
    return len(data) >= 20 and data[0] < 4 and data[4:8] == STUN_MAGIC


def decode(data: bytes) -> Request | Response:
    """Decode one datagram.

    :param data: the datagram as received.
    :raises MalformedDatagram: with reason ``oversized``, ``short``, ``bad-kind``,
        ``undecodable`` or ``bad-shape``.
    """
    if len(data) > MAX_DATAGRAM:
        raise MalformedDatagram("oversized")
    if len(data) < HEADER_BYTES + 1:
        raise MalformedDatagram("short")
    marker = data[0]
    msg_id = data[1:HEADER_BYTES]
    body = unpack(data[HEADER_BYTES:])
    if marker == REQUEST:
        if type(body) is not list or len(body) != 2:
            raise MalformedDatagram("bad-shape")
        name, args = body
        if type(name) is not str or type(args) is not list:
            raise MalformedDatagram("bad-shape")
        return Request(msg_id, name, args)
    if marker == RESPONSE:
        return Response(msg_id, body)
    raise MalformedDatagram("bad-kind")  # counter name kept: operators read it
