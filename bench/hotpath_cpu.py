#!/usr/bin/env python3
"""CPU of the DHT hot path in one process, without sockets or an event loop: a measure
that other processes on the machine disturb less than ``findnode_rps.py`` and
``putget.py`` (and, counted in instructions, not at all).

What it measures
----------------
``findnode``: ``--ops`` ``ds_find_node`` requests handed to one sans-I/O node's
``receive_datagram``, round robin from 64 senders (each its own host in its own /24, each
a contact at an address the node validated, as in ``bench/findnode_rps.py`` once its
pings are answered), with 200 other contacts; the figure is the CPU per request.

``putget``: ``--nodes`` sans-I/O nodes (default NodeConfig) join a simulated network
(:mod:`dhtsignal.testing.simnet`, seeded), which then idles ``--settle`` virtual seconds.
Then ``--ops`` times: a random node puts a fresh signed DATA record (signed before the
clock starts, as in ``bench/putget.py``) and another random node gets it. The figures
are the process CPU per put+get and the datagrams per put+get. There are no sockets and
no event loop: the figure is the code of :mod:`dhtsignal.dht` and :mod:`dhtsignal.wire`
(and the simulator's routing, the same on both sides of a comparison).

On a shared machine CPU time still swings with what else runs. For a figure that does
not, count instructions: run the script under ``valgrind --tool=callgrind`` with two
``--ops`` values and divide the difference of the totals by the difference of the ops
(the setup cancels out)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/hotpath_cpu.py putget --ops 30
    PYTHONHASHSEED=0 valgrind --tool=callgrind python bench/hotpath_cpu.py putget --ops 130

Run with ``PYTHONPATH`` set to another tree, it measures that tree's ``dhtsignal`` (the
script only uses what older trees have too).

Usage::

    python bench/hotpath_cpu.py findnode [--ops 40000] [--json out.json]
    python bench/hotpath_cpu.py putget [--nodes 100] [--ops 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import msgpack

from dhtsignal.dht import records
from dhtsignal.dht.node import Node
from dhtsignal.dht.records import RecordType
from dhtsignal.dht.routing import Contact
from dhtsignal.identity import Identity
from dhtsignal.testing.simnet import SimConfig, SimNetwork

NETWORK = "dhtsignal/1"
SENDERS = 64


def findnode(ops: int, seed: int) -> dict[str, float]:
    """``ops`` ds_find_node requests through one node's ``receive_datagram``."""
    rng = random.Random(seed)
    node = Node(rng.randbytes(20), wallclock=time.time)
    now = 1000.0
    for i in range(200):
        node.table.add_contact(Contact(rng.randbytes(20), "127.0.0.1", 2000 + i), now)
    senders = [rng.randbytes(20) for _ in range(SENDERS)]
    src = [(f"127.0.{i + 1}.1", 40000 + i) for i in range(SENDERS)]
    book = getattr(node, "addrs", None)  # trees before address validation have none
    for nid, addr in zip(senders, src, strict=True):
        node.table.add_contact(Contact(nid, addr[0], addr[1]), now)
        if book is not None:
            book.validate(addr)
            book.confirm(addr, nid)
    datagrams = [
        (
            b"\x00"
            + rng.randbytes(20)
            + msgpack.packb(
                ["ds_find_node", [NETWORK, senders[i % SENDERS], 0, rng.randbytes(20)]],
                use_bin_type=True,
            ),
            src[i % SENDERS],
        )
        for i in range(4 * SENDERS)
    ]
    receive = node.receive_datagram
    answered = 0
    c0 = time.process_time()
    for j in range(ops):
        data, addr = datagrams[j % len(datagrams)]
        # 100k requests per second in all: each sender stays under the per-host limit
        answered += receive(data, addr, now + j * 1e-5) is not None
    cpu = time.process_time() - c0
    return {"ops": ops, "us_per_request": round(cpu / max(1, ops) * 1e6, 3), "answered": answered}


def putget(nodes: int, ops: int, settle: float, seed: int) -> dict[str, float]:
    """Build the network, run the ops; returns the figures."""
    net = SimNetwork.build(nodes, SimConfig(seed=seed))
    net.run_for(settle)
    ident = Identity.generate()
    rng = random.Random(seed + 6)
    live = net.live_nodes()
    payload = os.urandom(200)
    recs = [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"sim-putget-{seed}-{i}"),
            payload,
            seq=1,
            expires=net.wallclock() + 300,
        )
        for i in range(ops)
    ]
    plan = [rng.sample(range(len(live)), 2) for _ in range(ops)]
    sent0 = net.traffic.sent
    found = 0
    c0 = time.process_time()
    for (a, b), rec in zip(plan, recs, strict=True):
        net.put(live[a], [rec])
        held = net.get_held(live[b], rec.key)
        found += any(r.payload == payload for r in held.records)
    cpu = time.process_time() - c0
    n = max(1, ops)
    return {
        "nodes": nodes,
        "ops": ops,
        "cpu_ms_per_op": round(cpu / n * 1e3, 4),
        "datagrams_per_op": round((net.traffic.sent - sent0) / n, 2),
        "found": found,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["findnode", "putget"])
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--ops", type=int, default=0, help="default 40000 findnode, 150 putget")
    p.add_argument("--settle", type=float, default=3.0, help="virtual seconds before the ops")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="", help="also write the figures to this file")
    a = p.parse_args(argv)
    if not 2 <= a.nodes <= 100_000 or not 0 <= a.ops <= 10_000_000:
        p.error("--nodes 2 to 100000, --ops 0 to 10000000")
    if a.what == "findnode":
        res = findnode(a.ops or 40_000, a.seed)
    else:
        res = putget(a.nodes, a.ops or 150, a.settle, a.seed)
    line = json.dumps(res)
    sys.stdout.write(line + "\n")
    if a.json:
        Path(a.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
