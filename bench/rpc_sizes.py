"""Bytes of every RPC: the request, the largest reply to an unvalidated and to a validated
address (issue 10's amplification table), measured on the sans-I/O node.

Usage::

    .venv/bin/python bench/rpc_sizes.py [--json PATH]

The node holds 20 good contacts on IPv4 addresses of the longest form
(``255.255.255.2xx``), a full page of 300-byte records under the key and a 1,000-byte
stock value, so the find replies are as large as they get. Each RPC is sent from a fresh
address (unvalidated) and from one the node validated; "to unvalidated" is the reply plus
the validation ping sent with it, "x" its ratio to the request.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from dhtsignal.dht import records
from dhtsignal.dht.node import PAD_TO, Node
from dhtsignal.dht.params import DEFAULT_NETWORK
from dhtsignal.dht.records import RecordType
from dhtsignal.dht.routing import Contact
from dhtsignal.identity import Identity
from dhtsignal.wire import codec
from dhtsignal.wire.addr import Addr

PADDED = ("ds_find_node", "ds_find_value", "ds_store_find")


def _node() -> Node:
    wall = time.time()
    n = Node(os.urandom(20), wallclock=lambda: wall)
    n.start(("192.0.2.1", 4000), 0.0)
    for i in range(20):
        n.table.add_contact(Contact(os.urandom(20), f"255.255.255.{200 + i}", 65000 + i), 1.0)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH")
    opts = p.parse_args()
    key = records.data_key("sizes")
    wall = time.time()

    def rec() -> bytes:
        who = Identity.generate()
        return records.sign(who, RecordType.DATA, key, b"v" * 300, seq=1, expires=wall + 600).raw

    me = os.urandom(20)
    net = DEFAULT_NETWORK

    def ds(*rest: Any) -> list[Any]:
        return [net, me, 0, *rest]

    rpcs: list[tuple[str, list[Any]]] = [
        ("ping", [me]),
        ("stun", []),
        ("store", [me, key, b"x" * 40]),
        ("find_node", [me, key]),
        ("find_value", [me, key]),
        ("ds_ping", ds()),
        ("ds_find_node", ds(key)),
        ("ds_find_value", ds(key, 0)),
        ("ds_store", ds([rec()])),
        ("ds_store_find", ds(key, [rec()])),
        ("ds_listen", ds(key, 60)),
        ("ds_unlisten", ds(key)),
        ("ds_notify", ds(key, [])),
        ("ds_leave", ds()),
    ]
    rows: list[dict[str, Any]] = []
    port = 1000
    for name, args in rpcs:
        sizes: dict[str, int] = {}
        for validated in (False, True):
            n = _node()
            for _ in range(6):
                n.store.put(records.decode(rec()), ("192.0.2.9", 1), wall)
            n.legacy.put(key, b"L" * 1000, wall)
            port += 1
            src: Addr = ("198.51.100.7", port)
            if validated:
                n.addrs.validate(src)
            # Our nodes pad a first find request (not yet validated there) to PAD_TO.
            pad = PAD_TO if name in PADDED and not validated else 0
            data = codec.encode_request(os.urandom(20), name, args, pad)
            reply = n.receive_datagram(data, src, 2.0)
            extra = sum(len(d) for d, a in n.datagrams_to_send(2.0) if a == src)
            sizes["padded" if not validated else "request"] = len(data)
            sizes["validated" if validated else "unvalidated"] = (len(reply or b"")) + (
                extra if not validated else 0
            )
        rows.append({"rpc": name, **sizes})
    print(
        "| RPC | request B (first, padded) | largest to unvalidated B (x first request) "
        "| largest to validated B (x request) |"
    )
    print("|---|---:|---:|---:|")
    for r in rows:
        q, f = r["request"], r["padded"]
        first = f"{q} ({f})" if f != q else f"{q}"
        print(
            f"| `{r['rpc']}` | {first} | {r['unvalidated']} ({r['unvalidated'] / f:.2f}x) "
            f"| {r['validated']} ({r['validated'] / q:.2f}x) |"
        )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
