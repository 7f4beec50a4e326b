"""What remote answers mean: parsing the replies a node's own RPCs get, as pure functions.

Theory of operation
-------------------
An answer is whatever msgpack decoded from a remote party, so nothing here trusts its
shape: each function takes the decoded value and returns the parsed parts, or None
when the answer is malformed (the node counts it and treats the peer as having failed).
Nothing here raises on remote input, keeps state, reads a clock or sends anything.

* :func:`value_page`: a ``ds_find_value`` answer ``[contacts, records, next]``;
  :func:`collect_records` takes at most :data:`MAX_PAGE_RECORDS` of its records.
* :func:`closer_contacts`: the contacts of a find answer that a lookup would use; the
  ones it would ignore (already known, or farther than it keeps) are skipped before
  parsing, which is most of them once a lookup converges.
* :func:`ping_reply`: a ``ds_ping`` answer ``[node id, address seen]``.

Contact addresses, in our replies and in stock ones, and the address a ping answer says
it saw us at, must be IP literals (:func:`~dhtsignal.wire.addr.is_ip_literal`): a host
name would make the node resolve names a stranger chose.
* :func:`shaped`: whether a value is a list of a given shape (state files).
"""

from __future__ import annotations

import contextlib
from typing import Any

from dhtsignal.dht.lookup import Lookup
from dhtsignal.dht.routing import Contact
from dhtsignal.dht.rpc import parse_contact
from dhtsignal.wire.addr import Addr, is_ip_literal

#: Records taken from one page of a ``ds_find_value`` answer.
MAX_PAGE_RECORDS = 64


def value_page(reply: Any) -> tuple[Any, list[Any], int | None] | None:
    """Parse a ``ds_find_value`` answer ``[contacts, records, next]``.

    :returns: (contacts as sent, records page, next cursor or None), or None if malformed.
    """
    if type(reply) is not list or len(reply) != 3:
        return None
    items, page, nxt = reply
    if type(page) is not list:
        return None
    return items, page, nxt if type(nxt) is int else None


def collect_records(found: dict[bytes, set[bytes]], page: list[Any], holder: bytes) -> None:
    """Note that ``holder`` answered with each record (raw bytes) of ``page``.

    :param found: for each record's raw bytes, the IDs of the nodes that held it; updated.
    :param page: a records page as sent (items that are not bytes are skipped).
    :param holder: the ID of the node that answered.
    """
    for raw in page[:MAX_PAGE_RECORDS]:
        if type(raw) is bytes:
            found.setdefault(raw, set()).add(holder)


def closer_contacts(lk: Lookup, items: list[Any], limit: int) -> list[Contact]:
    """The contacts of a find answer that ``lk`` would take, parsed.

    :param lk: the lookup the answer is for (its known IDs and distance bound).
    :param items: the contacts as sent.
    :param limit: how many items to look at (the rest are ignored).
    """
    out: list[Contact] = []
    known, far = lk.skip_state()
    target = lk.target
    for item in items[:limit]:
        if type(item) is list and item and type(nid := item[0]) is bytes:
            if nid in known:
                continue
            if far is not None and int.from_bytes(nid, "big") ^ target >= far:
                continue
        contact = parse_contact(item)
        if contact is not None:
            out.append(contact)
    return out


def ping_reply(reply: Any) -> tuple[bytes, Addr | None] | None:
    """Parse a ``ds_ping`` answer ``[node id, [host, port] seen]``.

    :returns: (the 20-byte node ID, the address it saw us at or None if unreadable),
        or None if the answer is malformed.
    """
    if type(reply) is not list or len(reply) != 2 or type(reply[0]) is not bytes:
        return None
    if len(reply[0]) != 20:
        return None
    seen = reply[1]
    observed: Addr | None = None
    if type(seen) is list and len(seen) == 2:
        # int() of a float infinity raises OverflowError: nothing a remote sends may escape.
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            host, port = str(seen[0]), int(seen[1])
            if is_ip_literal(host) and 0 < port < 65536:
                observed = (host, port)
    return bytes(reply[0]), observed


def shaped(value: Any, shape: list[Any]) -> bool:
    """Whether ``value`` is a list matching ``shape``: a list of types and nested shapes."""
    if type(value) is not list or len(value) != len(shape):
        return False
    return all(
        shaped(v, t) if type(t) is list else type(v) is t for v, t in zip(value, shape, strict=True)
    )
