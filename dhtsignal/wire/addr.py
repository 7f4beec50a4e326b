"""UDP addresses: ``(host, port)`` pairs, parsed from and shown as ``HOST:PORT``.

IPv6 hosts are written in brackets (``[::1]:4000``), as in URLs; the pair itself holds
the bare host. This module is the one place that parses and shows addresses, so the CLI,
the configuration, the daemons' ready lines and the error messages agree.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

Addr = tuple[str, int]
"""A UDP address: host (an IP literal or a name) and port."""


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


def parse_addr(text: str) -> Addr:
    """``"HOST:PORT"`` (``"[V6]:PORT"`` for IPv6) to ``(host, port)``.

    HOST is an IPv4 address, a bracketed IPv6 address or a host name; a host of digits
    and dots must be a valid IPv4 address (``300.1.1.1`` is refused, not looked up).

    :param text: the address as a person writes it.
    :raises ValueError: no port, a port that is not a number or out of range, an
        unbracketed IPv6 address, or a malformed host.
    """
    raw = text.strip()
    if raw.startswith("["):
        inside, sep, port = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [V6]:PORT")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ValueError(f"{inside!r} in {text!r} is not an IPv6 address") from None
        host = inside
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [V6]:PORT")
        if all(c.isdigit() or c == "." for c in host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in {text!r} is not an IPv4 address") from None
        elif not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} in {text!r} is not a host name or IP address")
    if not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT (the port must be a number)")
    p = int(port)
    if not 0 <= p < 65536:
        raise ValueError(f"port {p} out of range in {text!r}")
    return (host, p)


def is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 literal."""
    return ":" in host


def listen_for(listen: Addr, targets: Iterable[Addr]) -> Addr:
    """Where to bind to reach ``targets``: the IPv4 wildcard becomes the dual-stack
    wildcard ``::`` when a target is an IPv6 address.

    :raises ValueError: ``listen`` is one family's specific address and a target is a
        literal of the other family.
    """
    hosts = [h for h, _ in targets]
    if listen[0] == "0.0.0.0" and any(is_ipv6(h) for h in hosts):
        return ("::", listen[1])
    if listen[0] in ("0.0.0.0", "::"):
        return listen
    for h in hosts:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            continue  # a name: resolved in the socket's family
        if is_ipv6(h) != is_ipv6(listen[0]):
            raise ValueError(
                f"{show_addr(listen)} cannot reach {h}: listen on "
                f"{'[::]' if is_ipv6(h) else '0.0.0.0'}:PORT (dual-stack) or the same family"
            )
    return listen


def show_addr(addr: Addr | None) -> str:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6); ``-`` for None (an unbound socket).

    :param addr: the address to show.
    """
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def show_addrs(addrs: Iterable[Addr]) -> str:
    """Addresses as a comma-separated list, for messages.

    :param addrs: the addresses to show.
    """
    return ", ".join(show_addr(a) for a in addrs)


def is_ip_literal(host: object) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address written as a literal (no host name, no
    IPv6 zone): what contact addresses from the network must be.

    :param host: the host part of an address as received.
    """
    if type(host) is not str or not 0 < len(host) <= 45:
        return False
    return _is_ip_literal(host)


#: Strings remembered by :func:`is_ip_literal` (every contact of every find answer is
#: checked, and the same few addresses come again and again); at most 45 characters
#: each, so the cache stays under about 1 MiB however many a remote party sends.
_LITERALS_CACHED = 4_096


@functools.lru_cache(maxsize=_LITERALS_CACHED)
def _is_ip_literal(host: str) -> bool:
    if "%" in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
