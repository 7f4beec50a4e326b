"""Scale benchmark: a large simulated dhtsignal network on a virtual clock.

Builds ``--nodes`` real sans-I/O :class:`~dhtsignal.dht.node.Node` objects in one process
(:mod:`dhtsignal.testing.simnet`), then reports:

* lookup success rate over ``--gets`` gets of ``--keys`` values put by random nodes;
* the hop-count distribution of those lookups, their virtual latency, and the
  datagrams each one cost (requests and replies, counted by the simulator);
* memory per idle node, measured with ``tracemalloc`` around building the network,
  and the same measurement for ``--stock`` stock ``kademlia.network.Server`` nodes
  (server, protocol, routing table, storage; not listening) holding the same
  contacts as a random sample of our nodes, and for both kinds with empty tables.

Usage::

    .venv/bin/python bench/sim_scale.py --nodes 10000 --seed 1 --json results.json

Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

from kademlia.network import Server  # type: ignore[import-untyped]
from kademlia.node import Node

from dhtsignal.dht import records
from dhtsignal.dht.node import Node as CoreNode
from dhtsignal.dht.records import Record, RecordType
from dhtsignal.identity import Identity
from dhtsignal.testing import simnet
from dhtsignal.wire import codec

KIB = 1024.0


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def traced() -> int:
    """Bytes currently allocated and traced, after a full collection."""
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


class _NoPing:
    """Stands in for a stock protocol: the stock table pings a full bucket's head."""

    def __init__(self) -> None:
        self.pings = 0

    async def call_ping(self, node: Node) -> None:
        self.pings += 1


def stock_nodes(ids: list[bytes], contacts: list[list[tuple[bytes, str, int]]]) -> list[Server]:
    """Stock servers with their protocol (routing table) built, not listening.

    :param ids: node IDs.
    :param contacts: per node, the contacts to put in its routing table.
    """
    servers = []
    noping = _NoPing()
    for nid, cs in zip(ids, contacts, strict=True):
        s = Server(ksize=20, alpha=3, node_id=nid)
        s.protocol = s._create_protocol()
        router = s.protocol.router
        router.protocol = noping
        for cid, ip, port in cs:
            # Fresh copies of ID, address and port, made here inside the measured span:
            # a stock node decodes its own from datagrams.
            router.add_contact(Node(bytes(bytearray(cid)), "".join(list(ip)), int(str(port))))
        router.protocol = s.protocol
        servers.append(s)
    if noping.pings:
        progress(f"  (stock tables asked to ping {noping.pings} full-bucket heads; ignored)")
    return servers


def measure_stock(net: simnet.SimNetwork, count: int, rng: random.Random) -> dict[str, Any]:
    """Bytes per stock node (empty and with our sample's contacts), and ours empty."""
    sample = rng.sample(range(len(net.nodes)), min(count, len(net.nodes)))
    ids = [bytes(bytearray(net.nodes[i].id)) for i in sample]
    # stock_nodes copies IDs, addresses and ports while it is measured (copies made here,
    # before the measured span, would leave them out of the stock count).
    contacts = [[(c.id, c.ip, c.port) for c in net.nodes[i].table.contacts()] for i in sample]
    n = len(sample)

    before = traced()
    full = stock_nodes(ids, contacts)
    stock_full = (traced() - before) / n
    del full

    before = traced()
    empty = stock_nodes(ids, [[] for _ in ids])
    stock_empty = (traced() - before) / n
    del empty

    before = traced()
    ours = [CoreNode(nid, net.config.node_config, wallclock=net.wallclock) for nid in ids]
    ours_empty = (traced() - before) / n
    del ours

    return {
        "sample": n,
        "sample_mean_contacts": statistics.fmean(len(c) for c in contacts),
        "stock_full_bytes": stock_full,
        "stock_empty_bytes": stock_empty,
        "ours_empty_bytes": ours_empty,
    }


def bench(args: argparse.Namespace) -> dict[str, Any]:
    cfg = simnet.SimConfig(seed=args.seed, loss=args.loss)
    rng = random.Random(args.seed ^ 0x5EED)
    out: dict[str, Any] = {"nodes": args.nodes, "seed": args.seed, "loss": args.loss}

    # -- build, under tracemalloc ------------------------------------------------------
    net = simnet.SimNetwork(cfg)
    untraced = args.nodes - args.marginal if args.memory == "marginal" else 0
    started = time.monotonic()
    last = [started]

    def reporter(offset: int) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 10 or done == total:
                last[0] = now
                progress(
                    f"  joined {offset + done}/{args.nodes} nodes, {now - started:.0f} s real, "
                    f"{net.now:.1f} s virtual, {net.traffic.sent} datagrams"
                )

        return report

    if untraced:
        progress(f"building {untraced} nodes (tracemalloc off)")
        net.grow(untraced, progress=reporter(0))
    progress(f"building {args.nodes - untraced} nodes (tracemalloc on)")
    tracemalloc.start(1)
    base = traced()
    before = tracemalloc.take_snapshot() if args.breakdown else None
    net.grow(args.nodes - untraced, progress=reporter(untraced))
    build_real = time.monotonic() - started
    build_virtual = net.now
    build_datagrams = net.traffic.sent
    net.run_for(5)  # settle: in-flight datagrams land, RPC timers expire
    after = traced()
    per_node = (after - base) / (args.nodes - untraced)
    if before is not None:
        diff = tracemalloc.take_snapshot().compare_to(before, "lineno")
        progress(f"top {args.breakdown} allocation sites of the network:")
        for stat in diff[: args.breakdown]:
            progress(f"  {stat}")
        del diff, before
    sizes = [len(n.table) for n in net.nodes]
    out["build"] = {
        "real_s": build_real,
        "virtual_s": build_virtual,
        "datagrams": build_datagrams,
        "datagrams_per_join": build_datagrams / args.nodes,
        "join_failures": net.join_failures,
        "contacts_min": min(sizes),
        "contacts_median": statistics.median(sizes),
        "contacts_mean": statistics.fmean(sizes),
        "contacts_max": max(sizes),
    }
    progress(f"measuring {args.stock} stock kademlia nodes")
    mem = measure_stock(net, args.stock, rng)
    tracemalloc.stop()
    mem["ours_bytes"] = per_node
    mem["method"] = (
        "full build traced"
        if not untraced
        else f"last {args.nodes - untraced} joins traced (marginal cost per node)"
    )
    mem["ratio_full"] = per_node / mem["stock_full_bytes"]
    mem["ratio_empty"] = mem["ours_empty_bytes"] / mem["stock_empty_bytes"]
    out["memory"] = mem

    # -- puts and gets -----------------------------------------------------------------
    progress(f"putting {args.keys} values")
    ident = Identity.generate()
    values: list[Record] = [
        records.sign(
            ident,
            RecordType.DATA,
            records.data_key(f"bench-{i}"),
            codec.pack({"n": i}),
            seq=1,
            expires=net.wallclock() + 3600,
        )
        for i in range(args.keys)
    ]
    t0 = net.traffic.copy()
    puts = net.wait(
        [net.start(net.random_node(), lambda n, now, v=v: n.start_put([v], now)) for v in values]
    )
    put_dgrams = (net.traffic - t0).sent / len(values)

    progress(f"getting {args.gets} times")
    wanted = [values[i % len(values)] for i in range(args.gets)]
    rng.shuffle(wanted)
    hops: list[int] = []
    latencies: list[float] = []
    queried: list[int] = []
    found = 0
    t0 = net.traffic.copy()
    real0 = time.monotonic()
    for start in range(0, len(wanted), args.batch):
        chunk = wanted[start : start + args.batch]
        askers = [net.random_node() for _ in chunk]
        began = net.now
        ops = [
            net.start(a, lambda n, now, key=w.key: n.start_lookup(key, now, k=8, want_value=True))
            for a, w in zip(askers, chunk, strict=True)
        ]
        ended: list[float] = []
        results = net.wait(ops, ended_at=ended)
        for asker, want, res, end in zip(askers, chunk, results, ended, strict=True):
            took = end - began
            held = asker.store.get(want.key, net.wallclock())
            if any(r.raw == want.raw for r in [*res.records, *held]):
                found += 1
            hops.append(res.hops)
            latencies.append(took)
            queried.append(res.queried)
    traffic = net.traffic - t0
    lat = sorted(latencies)
    out["lookups"] = {
        "gets": len(wanted),
        "found": found,
        "success_rate": found / len(wanted),
        "hops_histogram": dict(sorted(Counter(hops).items())),
        "hops_median": statistics.median(hops),
        "hops_mean": statistics.fmean(hops),
        "datagrams_per_lookup": traffic.sent / len(wanted),
        "queried_per_lookup": statistics.fmean(queried),
        "latency_ms_p50": 1000 * lat[len(lat) // 2],
        "latency_ms_p95": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.95))],
        "real_s": time.monotonic() - real0,
        "put_replicas_mean": statistics.fmean(p.stored for p in puts),
        "datagrams_per_put": put_dgrams,
    }
    net.close()
    return out


def render(r: dict[str, Any], out: Callable[[str], None] = print) -> None:
    b, m, lk = r["build"], r["memory"], r["lookups"]
    out(f"dhtsignal simulated network: {r['nodes']} nodes, seed {r['seed']}, loss {r['loss']:.0%}")
    out(
        f"  build      {b['real_s']:.0f} s real, {b['virtual_s']:.1f} s virtual, "
        f"{b['datagrams_per_join']:.0f} datagrams/join, {b['join_failures']} failed joins"
    )
    out(
        f"  contacts   min {b['contacts_min']}  median {b['contacts_median']:.0f}  "
        f"mean {b['contacts_mean']:.1f}  max {b['contacts_max']}"
    )
    out(
        f"  lookups    {lk['found']}/{lk['gets']} found = {lk['success_rate']:.1%}; "
        f"{lk['datagrams_per_lookup']:.1f} datagrams, {lk['queried_per_lookup']:.1f} nodes queried"
        f" per lookup; latency p50 {lk['latency_ms_p50']:.0f} ms p95 {lk['latency_ms_p95']:.0f} ms"
    )
    out(f"  hops       median {lk['hops_median']}  mean {lk['hops_mean']:.2f}")
    hist = lk["hops_histogram"]
    most = max(hist.values())
    for h, n in hist.items():
        out(f"    {h:>2} | {'#' * max(1, round(40 * n / most)):<40} {n}")
    out(
        f"  puts       {lk['put_replicas_mean']:.2f} replicas stored on average, "
        f"{lk['datagrams_per_put']:.1f} datagrams per put"
    )
    out(
        f"  memory     ours {m['ours_bytes'] / KIB:.1f} KiB/idle node ({b['contacts_mean']:.0f} "
        f"contacts); stock kademlia {m['stock_full_bytes'] / KIB:.1f} KiB/node with the same "
        f"contacts ({m['sample_mean_contacts']:.0f} mean, {m['sample']} sampled) -> "
        f"ratio {m['ratio_full']:.2f}"
    )
    out(
        f"             empty tables: ours {m['ours_empty_bytes'] / KIB:.1f} KiB, stock "
        f"{m['stock_empty_bytes'] / KIB:.1f} KiB -> ratio {m['ratio_empty']:.2f}"
    )
    out(f"             (tracemalloc; {m['method']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=10_000, help="simulated nodes (default 10000)")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice")
    p.add_argument("--keys", type=int, default=100, help="values put (default 100)")
    p.add_argument("--gets", type=int, default=500, help="gets of those values (default 500)")
    p.add_argument("--batch", type=int, default=50, help="gets run concurrently (default 50)")
    p.add_argument("--stock", type=int, default=1_000, help="stock nodes measured (default 1000)")
    p.add_argument("--loss", type=float, default=0.0, help="datagram loss rate (default 0)")
    p.add_argument(
        "--memory",
        choices=["full", "marginal"],
        default="full",
        help="full: trace the whole build, bytes / nodes (default); marginal: build untraced "
        "but for the last --marginal joins, bytes / those joins (about 3x faster)",
    )
    p.add_argument(
        "--marginal", type=int, default=1_000, help="joins traced with --memory marginal"
    )
    p.add_argument("--breakdown", type=int, default=0, help="print the N top allocation sites")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.nodes < 2 or args.keys < 1 or args.gets < 1 or args.batch < 1:
        p.error("--nodes must be at least 2; --keys, --gets and --batch at least 1")
    if args.memory == "marginal" and not 0 < args.marginal < args.nodes:
        p.error("--marginal must be between 1 and --nodes - 1")
    started = time.monotonic()
    saved = gc.get_threshold()
    gc.set_threshold(*simnet.SIM_GC_THRESHOLD)
    try:
        result = bench(args)
    finally:
        gc.set_threshold(*saved)
    result["total_real_s"] = time.monotonic() - started
    render(result)
    print(f"  total      {result['total_real_s']:.0f} s real")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
