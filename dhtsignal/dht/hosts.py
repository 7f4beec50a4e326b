"""Hosts and prefixes: what a node counts a remote party's usage by.

Theory of operation
-------------------
A sender can open as many UDP ports as it likes, so limits keyed by ``(ip, port)``
never bind. Everything a remote party can grow is accounted twice instead:

* per **host**: an IPv4 address, or an IPv6 /64 (the block one subscriber or one
  machine usually gets, RFC 6177 section 2);
* per **prefix**: an IPv4 /24, or an IPv6 /48 (one site), so that one party with a
  block of addresses still counts as one.

Addresses a node sees come from its sockets, so they are IP literals; anything else
(a host name in a test, a malformed string) is its own host and its own prefix, which
is safe: it can only be reached by whoever sent from it. IPv4-mapped IPv6 addresses
(``::ffff:a.b.c.d``, as a dual-stack socket reports IPv4 senders) count as the IPv4
address. Results are cached: the same few addresses come again and again.
"""

from __future__ import annotations

import functools
import ipaddress

from dhtsignal.wire.addr import Addr

#: Cached host and prefix keys (the rate limiter and the store ask per request); about
#: 300 bytes each, so a flood from ever new source addresses costs at most ~2.5 MiB.
_CACHE = 8_192


@functools.lru_cache(maxsize=_CACHE)
def keys_of(ip: str) -> tuple[str, str]:
    """``(host, prefix)`` of an address: ``("10.1.2.3", "10.1.2.0/24")``,
    ``("2001:db8:1:2::/64", "2001:db8:1::/48")``.

    :param ip: the IP literal a datagram came from.
    """
    try:
        a = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return ip, ip
    if a.version == 6:
        mapped = a.ipv4_mapped
        if mapped is not None:
            a = mapped
    if a.version == 4:
        n = int(a)
        return str(a), f"{ipaddress.IPv4Address(n & 0xFFFFFF00)}/24"
    n = int(a)
    host = ipaddress.IPv6Address(n & ~((1 << 64) - 1))
    site = ipaddress.IPv6Address(n & ~((1 << 80) - 1))
    return f"{host}/64", f"{site}/48"


def host_of(addr: Addr) -> str:
    """The host ``addr`` belongs to (IPv4 address, IPv6 /64)."""
    return keys_of(addr[0])[0]


def prefix_of(addr: Addr) -> str:
    """The prefix ``addr`` belongs to (IPv4 /24, IPv6 /48)."""
    return keys_of(addr[0])[1]


@functools.lru_cache(maxsize=_CACHE)
def _is_public(ip: str) -> bool:
    try:
        a = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if a.version == 6 and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_global


def diversity_group(ip: str, private_too: bool = False) -> str | None:
    """The prefix a contact at ``ip`` counts against in per-prefix diversity limits
    (among a lookup's closest), or None: not limited. Only public addresses are limited
    unless ``private_too`` (tests and the simulator, where every address is private).

    :param ip: the contact's IP literal.
    :param private_too: limit private, loopback and link-local addresses too.
    """
    return (prefix_if_any if private_too else public_prefix)(ip)


def prefix_if_any(ip: str) -> str:
    """:func:`diversity_group` with ``private_too``: the prefix of ``ip``, whatever it is."""
    return keys_of(ip)[1]


@functools.lru_cache(maxsize=_CACHE)
def public_prefix(ip: str) -> str | None:
    """:func:`diversity_group` without ``private_too``: the prefix of a public ``ip``, or
    None (one cached call: lookups ask for every contact they meet)."""
    return keys_of(ip)[1] if _is_public(ip) else None
