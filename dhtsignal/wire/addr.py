"""UDP addresses: ``(host, port)`` pairs, parsed from and shown as ``HOST:PORT``.

IPv6 hosts are written in brackets (``[::1]:4000``), as in URLs; the pair itself holds
the bare host. This module is the one place that parses and shows addresses, so the CLI,
the configuration, the daemons' ready lines and the error messages agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Addr = tuple[str, int]
"""A UDP address: host (an IP literal or a name) and port."""


def parse_addr(text: str) -> Addr:
    """``"HOST:PORT"`` (``"[V6]:PORT"`` for IPv6) to ``(host, port)``.

    :param text: the address as a person writes it.
    :raises ValueError: no port, an empty host, or a port out of range.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]")
    p = int(port)
    if not 0 <= p < 65536:
        raise ValueError(f"port {p} out of range in {text!r}")
    return (host, p)


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
    if type(host) is not str or not 0 < len(host) <= 45 or "%" in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
