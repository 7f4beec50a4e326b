"""Compact SDP: a data-channel-only offer or answer in a few hundred bytes.

Theory of operation
-------------------

aiortc gathers every ICE candidate before ``setLocalDescription`` returns, so one offer
and one answer per session suffice, and each must fit one sealed envelope in one UDP
datagram. aiortc's own description of a data-channel-only connection is about 1 kB of
text (three DTLS fingerprints, hex with colons, 32-character foundations); what the
remote side actually needs from it is small:

- the ICE username fragment and password (RFC 8839 section 5.4);
- one DTLS certificate fingerprint (RFC 8122 section 5), carried as raw digest bytes;
- the DTLS setup role (RFC 4145 section 4), the media ``mid`` (RFC 5888), the SCTP port
  and the maximum message size (RFC 8841 sections 5 and 6);
- the candidates (RFC 8839 section 5.1), each a tuple with its address packed into 4 or
  16 bytes and a hexadecimal foundation packed into bytes.

:func:`compact` parses a local SDP into a :class:`Description` and packs it with msgpack:
``[FORMAT, type, mid, ufrag, pwd, fingerprint algorithm, digest, setup, sctp port,
max message size, [candidate, ...]]`` where a candidate is ``[foundation, component,
transport, priority, ip, port, type]`` plus ``[related ip, related port]`` for
server-reflexive and relayed candidates. Types, setup roles and candidate types travel as
small integers.

:func:`expand` is the boundary for remote input: it checks every field's type, length,
range and alphabet (so nothing can inject SDP lines) and turns any defect into
:class:`~dhtsignal.errors.ProtocolError`; then it renders the minimal SDP that aiortc's
``setRemoteDescription`` accepts, always with ``a=end-of-candidates`` since aiortc sends
no trickled candidates. Expanding and compacting again yields the same bytes.

A description that would exceed :data:`MAX_BLOB` (a host with many addresses, say)
loses its least preferred candidates, lowest ICE priority first, until it fits: the
remote side still gets the best paths, and the envelope still fits its record.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from dhtsignal.errors import ProtocolError, UsageError

logger = logging.getLogger(__name__)

FORMAT = 1
"""Version of the compact layout; the first element of every blob."""
MAX_BLOB = 560
"""The largest compact description: an offer this size, sealed with the largest offer
body (a 64-character node ID, three IPv6 DHT addresses) into a signed INBOX record,
stays within one record (:data:`dhtsignal.dht.records.MAX_RECORD`, 1200 bytes).
:func:`compact` drops the least preferred candidates of a larger one; :func:`expand`
refuses a larger blob."""
MAX_CANDIDATES = 16
"""Bound on candidates per description, far above what aiortc gathers (a host and at most
one server-reflexive candidate per local address, one relayed candidate)."""
TYPES = ("offer", "answer")
SETUPS = ("actpass", "active", "passive")
CANDIDATE_TYPES = ("host", "srflx", "prflx", "relay")
DIGEST_SIZES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
"""Fingerprint hash functions aiortc supports, with their digest sizes (RFC 8122)."""
MEDIA_PROTO = "UDP/DTLS/SCTP webrtc-datachannel"
"""The protocol and format of a data-channel media section (RFC 8841 section 4)."""

_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")  # RFC 8839 section 5.4: 4*256ice-char
_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")  # 22*256ice-char
_FOUNDATION = re.compile(r"[A-Za-z0-9+/]{1,32}")  # RFC 8839 section 5.1: 1*32ice-char
_HEX_FOUNDATION = re.compile(r"(?:[0-9a-f]{2}){1,16}")  # packed as bytes
_MID = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
_TRANSPORT = re.compile(r"[A-Za-z]{1,8}")
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U53 = 2**53


@dataclass(frozen=True)
class Candidate:
    """One ICE candidate, as on an ``a=candidate`` line."""

    foundation: str
    component: int
    transport: str
    priority: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    type: str
    related: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int] | None = None

    @classmethod
    def from_sdp(cls, value: str) -> Candidate:
        """Parse the value of a local ``a=candidate:`` line.

        :param value: the text after ``candidate:``.
        :raises UsageError: for a line this module cannot represent.
        """
        bits = value.split()
        shape = (len(bits), bits[6:7], bits[8:9], bits[10:11])
        if shape not in ((8, ["typ"], [], []), (12, ["typ"], ["raddr"], ["rport"])):
            raise UsageError(f"unsupported candidate line {value!r}")
        try:
            return cls(
                foundation=bits[0],
                component=int(bits[1]),
                transport=bits[2],
                priority=int(bits[3]),
                ip=ipaddress.ip_address(bits[4]),
                port=int(bits[5]),
                type=bits[7],
                related=(ipaddress.ip_address(bits[9]), int(bits[11])) if len(bits) == 12 else None,
            )
        except ValueError as exc:
            raise UsageError(f"unsupported candidate line {value!r}: {exc}") from exc

    def to_sdp(self) -> str:
        """The value of this candidate's ``a=candidate:`` line."""
        line = (
            f"{self.foundation} {self.component} {self.transport} {self.priority} "
            f"{self.ip} {self.port} typ {self.type}"
        )
        if self.related is not None:
            line += f" raddr {self.related[0]} rport {self.related[1]}"
        return line

    def pack(self) -> list[Any]:
        """This candidate as a compact msgpack-ready list."""
        packed: list[Any] = [
            bytes.fromhex(self.foundation)
            if _HEX_FOUNDATION.fullmatch(self.foundation)
            else self.foundation,
            self.component,
            self.transport,
            self.priority,
            self.ip.packed,
            self.port,
            _index(CANDIDATE_TYPES, self.type, "candidate type"),
        ]
        if self.related is not None:
            packed += [self.related[0].packed, self.related[1]]
        return packed

    @classmethod
    def unpack(cls, item: object) -> Candidate:
        """Validate and decode a packed candidate.

        :param item: one element of the blob's candidate list.
        :raises ProtocolError: if anything is out of shape.
        """
        if not isinstance(item, list) or len(item) not in (7, 9):
            raise ProtocolError("compact SDP: a candidate is a list of 7 or 9 fields")
        foundation = item[0]
        if isinstance(foundation, bytes) and 1 <= len(foundation) <= 16:
            foundation = foundation.hex()
        return cls(
            foundation=_text(foundation, _FOUNDATION, "foundation"),
            component=_int(item[1], 1, 256, "component"),
            transport=_text(item[2], _TRANSPORT, "transport"),
            priority=_int(item[3], 0, _U32, "priority"),
            ip=_ip(item[4]),
            port=_int(item[5], 0, _U16, "port"),
            type=CANDIDATE_TYPES[_int(item[6], 0, len(CANDIDATE_TYPES) - 1, "candidate type")],
            related=(_ip(item[7]), _int(item[8], 0, _U16, "related port"))
            if len(item) == 9
            else None,
        )


@dataclass(frozen=True)
class Description:
    """The fields of a data-channel-only description that the remote side needs."""

    type: str
    mid: str
    ufrag: str
    pwd: str
    fingerprint_algorithm: str
    fingerprint: bytes
    setup: str
    sctp_port: int
    max_message_size: int
    candidates: tuple[Candidate, ...]

    @classmethod
    def parse(cls, sdp: str, type: str) -> Description:
        """Extract the needed fields from a local SDP (the first fingerprint is kept).

        :param sdp: an SDP produced by aiortc for one data channel.
        :param type: ``"offer"`` or ``"answer"``.
        :raises UsageError: if the SDP has other media or lacks a needed field.
        """
        if type not in TYPES:
            raise UsageError(f"SDP type must be one of {TYPES}, not {type!r}")
        attrs: dict[str, str] = {}
        candidates: list[Candidate] = []
        media: list[str] = []
        for line in sdp.splitlines():
            if line.startswith("m="):
                media.append(line)
            elif line.startswith("a=candidate:"):
                candidates.append(Candidate.from_sdp(line[len("a=candidate:") :]))
            elif line.startswith("a="):
                name, _, value = line[2:].partition(":")
                attrs.setdefault(name, value)
        if len(media) != 1 or not re.fullmatch(rf"m=application \d+ {MEDIA_PROTO}", media[0]):
            raise UsageError("only an SDP with exactly one data-channel media section compacts")
        try:
            algorithm, hex_digest = attrs["fingerprint"].split()
            return cls(
                type=type,
                mid=attrs["mid"],
                ufrag=attrs["ice-ufrag"],
                pwd=attrs["ice-pwd"],
                fingerprint_algorithm=algorithm.lower(),
                fingerprint=bytes.fromhex(hex_digest.replace(":", "")),
                setup=attrs["setup"],
                sctp_port=int(attrs["sctp-port"]),
                max_message_size=int(attrs["max-message-size"]),
                candidates=tuple(candidates),
            )
        except (KeyError, ValueError) as exc:
            raise UsageError(f"SDP lacks a needed field or has a bad one: {exc}") from exc

    def pack(self) -> bytes:
        """The compact msgpack form.

        :raises UsageError: if a field cannot be represented.
        """
        if len(self.candidates) > MAX_CANDIDATES:
            raise UsageError(f"more than {MAX_CANDIDATES} candidates")
        blob: bytes = msgpack.packb(
            [
                FORMAT,
                _index(TYPES, self.type, "SDP type"),
                self.mid,
                self.ufrag,
                self.pwd,
                self.fingerprint_algorithm,
                self.fingerprint,
                _index(SETUPS, self.setup, "setup role"),
                self.sctp_port,
                self.max_message_size,
                [c.pack() for c in self.candidates],
            ],
            use_bin_type=True,
        )
        return blob

    @classmethod
    def unpack(cls, blob: bytes) -> Description:
        """Validate and decode a compact blob from a remote peer.

        :param blob: the output of :meth:`pack` on the remote side.
        :raises ProtocolError: for any malformed input.
        """
        if len(blob) > MAX_BLOB:
            raise ProtocolError(f"compact SDP of {len(blob)} bytes exceeds {MAX_BLOB}")
        try:
            items = msgpack.unpackb(blob, raw=False, use_list=True, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"compact SDP is not msgpack: {exc}") from exc
        if not isinstance(items, list) or len(items) != 11 or items[0] != FORMAT:
            raise ProtocolError("compact SDP: not an 11-field format-1 list")
        algorithm = items[5]
        if not isinstance(algorithm, str) or algorithm not in DIGEST_SIZES:
            raise ProtocolError(f"compact SDP: unsupported fingerprint algorithm {algorithm!r}")
        digest = items[6]
        if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZES[algorithm]:
            raise ProtocolError("compact SDP: fingerprint digest of the wrong size")
        candidates = items[10]
        if not isinstance(candidates, list) or len(candidates) > MAX_CANDIDATES:
            raise ProtocolError(f"compact SDP: candidates are a list of <= {MAX_CANDIDATES}")
        return cls(
            type=TYPES[_int(items[1], 0, len(TYPES) - 1, "type")],
            mid=_text(items[2], _MID, "mid"),
            ufrag=_text(items[3], _UFRAG, "ice-ufrag"),
            pwd=_text(items[4], _PWD, "ice-pwd"),
            fingerprint_algorithm=algorithm,
            fingerprint=digest,
            setup=SETUPS[_int(items[7], 0, len(SETUPS) - 1, "setup")],
            sctp_port=_int(items[8], 0, _U16, "sctp-port"),
            max_message_size=_int(items[9], 0, _U53, "max-message-size"),
            candidates=tuple(Candidate.unpack(c) for c in candidates),
        )

    def render(self) -> str:
        """The minimal SDP text aiortc accepts as a remote description."""
        fingerprint = ":".join(f"{b:02X}" for b in self.fingerprint)
        lines = [
            "v=0",
            "o=- 0 0 IN IP4 0.0.0.0",
            "s=-",
            "t=0 0",
            f"a=group:BUNDLE {self.mid}",
            f"m=application 9 {MEDIA_PROTO}",
            "c=IN IP4 0.0.0.0",
            f"a=mid:{self.mid}",
            f"a=sctp-port:{self.sctp_port}",
            f"a=max-message-size:{self.max_message_size}",
            *(f"a=candidate:{c.to_sdp()}" for c in self.candidates),
            "a=end-of-candidates",
            f"a=ice-ufrag:{self.ufrag}",
            f"a=ice-pwd:{self.pwd}",
            f"a=fingerprint:{self.fingerprint_algorithm} {fingerprint}",
            f"a=setup:{self.setup}",
        ]
        return "\r\n".join(lines) + "\r\n"


def compact(sdp: str, type: str, max_bytes: int = MAX_BLOB) -> bytes:
    """Pack a local data-channel-only SDP into its compact form of at most ``max_bytes``.

    Candidates beyond :data:`MAX_CANDIDATES`, and then the least preferred ones (lowest
    ICE priority) while the blob is too large, are left out.

    :param sdp: the SDP text of aiortc's local description.
    :param type: ``"offer"`` or ``"answer"``.
    :param max_bytes: the size limit.
    :raises UsageError: if the SDP is not a single data-channel description, or does not
        fit ``max_bytes`` even without candidates.
    """
    description = Description.parse(sdp, type)
    kept = sorted(description.candidates, key=lambda c: -c.priority)[:MAX_CANDIDATES]
    while True:
        trimmed = dataclasses.replace(
            description, candidates=tuple(c for c in description.candidates if c in kept)
        )
        blob = trimmed.pack()
        if len(blob) <= max_bytes:
            break
        if not kept:
            raise UsageError(
                f"the {type} takes {len(blob)} bytes without candidates, over {max_bytes}"
            )
        kept.pop()
    dropped = len(description.candidates) - len(trimmed.candidates)
    if dropped:
        logger.info("%s: left out %d least preferred ICE candidate(s) to fit", type, dropped)
    return blob


def expand(blob: bytes) -> tuple[str, str]:
    """Rebuild ``(type, sdp)`` from a compact blob received from a remote peer.

    :param blob: a compact description.
    :raises ProtocolError: for any malformed blob.
    """
    try:
        description = Description.unpack(blob)
    except ProtocolError as exc:
        logger.debug("refused a compact SDP of %d bytes: %s", len(blob), exc)
        raise
    return description.type, description.render()


def _index(table: tuple[str, ...], value: str, what: str) -> int:
    try:
        return table.index(value)
    except ValueError:
        raise UsageError(f"unsupported {what} {value!r}") from None


def _int(value: object, low: int, high: int, what: str) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"compact SDP: {what} must be an integer in [{low}, {high}]")
    return value


def _text(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"compact SDP: malformed {what}")
    return value


def _ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, bytes) and len(value) in (4, 16):
        return ipaddress.ip_address(value)
    raise ProtocolError("compact SDP: an address is 4 or 16 packed bytes")
