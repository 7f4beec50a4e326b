#!/usr/bin/env python3
"""put/get latency at N nodes in one process: dhtsignal vs OpenDHT vs stock kademlia.

What it measures
----------------
For each system in turn (never two at once, so none steals CPU from another):
start ``--nodes`` nodes on 127.0.0.1, bootstrap each from the first one
(sequentially), let the network settle ``--settle`` seconds, then for every
operation put a fresh key from a random node and get it from another random
node, timing each call alone. ``--warmup`` operations are discarded, then
``--ops`` are measured. The payload is the same ``--size`` random bytes for all.

* dhtsignal: ``DhtNode.put([record])`` / ``DhtNode.get(key)`` with signed DATA
  records (signing happens before the clock starts: OpenDHT values are unsigned),
  default NodeConfig (8 storing nodes), on asyncio and on uvloop.
* OpenDHT 4.4.2 Python bindings: ``DhtRunner.run(port=0, ipv4="127.0.0.1")``
  binds one UDP socket on 127.0.0.1 only (no IPv6 socket; with the default
  arguments it binds 0.0.0.0 and [::]). put/get are the callback forms with a
  bounded wait, exactly what the bindings' blocking forms do internally, but
  with a timeout.
* stock kademlia 2.2.3: ``Server.set`` / ``Server.get`` (on asyncio; ``--stock-uvloop``
  adds uvloop).

Before measuring, every socket the process holds is checked to be bound to
127.0.0.1 or ::1; the phase aborts otherwise.

Usage::

    python bench/putget.py                # 100 nodes, 200 ops each after 20 warm-up
    python bench/putget.py --quick        # 60 ops each
    python bench/putget.py --profile      # also cProfile one dhtsignal phase
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HOST = "127.0.0.1"
OP_TIMEOUT = 15.0
#: FACTS.md, this machine kind: OpenDHT put / get p50 (ms); stock kademlia set / get p50.
FACTS = {"opendht": (2.7, 0.9), "stock": (19.0, 0.7)}
TARGET_RATIO = 2.0


# -- helpers -----------------------------------------------------------------------------


def _nonloopback_sockets() -> list[str]:
    """Sockets of this process bound to anything but 127.0.0.0/8 or ::1."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    bad = []
    for proto in ("udp", "udp6", "tcp", "tcp6", "raw", "raw6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] not in inodes:
                continue
            host = f[1].split(":")[0]
            if len(host) == 8:
                ok = int(host[6:8], 16) == 127
            else:
                ok = host == "00000000000000000000000001000000" or (
                    host.startswith("0000000000000000FFFF0000") and int(host[30:32], 16) == 127
                )
            if not ok:
                bad.append(f"{proto} {f[1]}")
    return bad


def _check_loopback(system: str) -> None:
    bad = _nonloopback_sockets()
    if bad:
        raise RuntimeError(f"{system}: sockets not bound to loopback: {bad[:5]}")


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def _host_busy_seconds() -> float:
    """CPU seconds all processes of the host spent busy so far (from /proc/stat)."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Samples:
    """Latencies (wall) and process CPU (all threads) of measured operations."""

    def __init__(self) -> None:
        self.put: list[float] = []
        self.get: list[float] = []
        self.put_cpu: list[float] = []
        self.get_cpu: list[float] = []
        self.found = 0
        self.failures = 0
        self.extra: dict[str, Any] = {}
        self.wall = 0.0
        self.other_cpu = 0.0  # CPU seconds used by other processes during the ops

    def add(self, t: tuple[float, float, float], c: tuple[float, float, float]) -> None:
        self.put.append(t[1] - t[0])
        self.get.append(t[2] - t[1])
        self.put_cpu.append(c[1] - c[0])
        self.get_cpu.append(c[2] - c[1])


class Clock:
    """Marks ops' boundaries: wall clock and this process's CPU clock."""

    def __init__(self, s: Samples) -> None:
        self.s = s

    def __enter__(self) -> Clock:
        self.w0 = time.perf_counter()
        self.h0 = _host_busy_seconds()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.w0
        own = time.process_time() - self.c0
        self.s.wall += wall
        self.s.other_cpu += max(0.0, _host_busy_seconds() - self.h0 - own)


def _summ(rounds: list[Samples]) -> dict[str, Any]:
    def pooled(attr: str) -> list[float]:
        return [x for r in rounds for x in getattr(r, attr)]

    put, get = pooled("put"), pooled("get")
    wall = sum(r.wall for r in rounds)
    out: dict[str, Any] = {
        "put_ms_p50": round(_pct(put, 0.5) * 1e3, 3),
        "put_ms_p90": round(_pct(put, 0.9) * 1e3, 3),
        "get_ms_p50": round(_pct(get, 0.5) * 1e3, 3),
        "get_ms_p90": round(_pct(get, 0.9) * 1e3, 3),
        "put_cpu_ms_p50": round(_pct(pooled("put_cpu"), 0.5) * 1e3, 3),
        "get_cpu_ms_p50": round(_pct(pooled("get_cpu"), 0.5) * 1e3, 3),
        "put_ms_p50_per_round": [round(_pct(r.put, 0.5) * 1e3, 3) for r in rounds],
        "get_ms_p50_per_round": [round(_pct(r.get, 0.5) * 1e3, 3) for r in rounds],
        "ops": len(put),
        "gets_found": sum(r.found for r in rounds),
        "failures": sum(r.failures for r in rounds),
        # Other processes' CPU during the measured ops, in % of one CPU (noise indicator).
        "other_cpu_pct": round(100 * sum(r.other_cpu for r in rounds) / wall, 1) if wall else 0,
    }
    for r in rounds:
        for k, v in r.extra.items():
            out.setdefault(k, v)
    return out


def _plan(n_nodes: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [tuple(rng.sample(range(n_nodes), 2)) for _ in range(count)]  # type: ignore[misc]


# -- dhtsignal ---------------------------------------------------------------------------


async def _dhtsignal(a: argparse.Namespace, tag: str, payload: bytes) -> Samples:
    from dhtsignal.aio.node import DhtNode
    from dhtsignal.dht import records
    from dhtsignal.dht.records import RecordType
    from dhtsignal.identity import Identity

    out = Samples()
    nodes: list[Any] = []
    try:
        t_setup = time.perf_counter()
        for _ in range(a.nodes):
            node = DhtNode(os.urandom(20))
            await node.listen_udp(HOST, 0)
            nodes.append(node)
        _check_loopback("dhtsignal")
        for node in nodes[1:]:
            async with asyncio.timeout(OP_TIMEOUT):
                await node.bootstrap([nodes[0].address])
        out.extra["setup_s"] = round(time.perf_counter() - t_setup, 2)
        await asyncio.sleep(a.settle)
        ident = Identity.generate()
        rpcs: dict[str, Counter[str]] = {"put": Counter(), "get": Counter()}

        def counters() -> Counter[str]:
            c: Counter[str] = Counter()
            for nd in nodes:
                for k, v in nd.stats.items():
                    if k.startswith("rpc"):
                        c[k] += v
            return c

        prof = getattr(a, "profiler", None)
        if prof is not None:
            prof.enable()
        with Clock(out):
            for i, (src, dst) in enumerate(_plan(a.nodes, a.warmup + a.ops, a.seed)):
                key = records.data_key(f"putget-{tag}-{a.seed}-{i}")
                rec = records.sign(
                    ident, RecordType.DATA, key, payload, seq=1, expires=time.time() + 300
                )
                c0 = counters()
                try:
                    c_0, t0 = time.process_time(), time.perf_counter()
                    async with asyncio.timeout(OP_TIMEOUT):
                        await nodes[src].put([rec])
                    c_1, t1 = time.process_time(), time.perf_counter()
                    async with asyncio.timeout(OP_TIMEOUT):
                        got = await nodes[dst].get(key)
                    c_2, t2 = time.process_time(), time.perf_counter()
                except Exception:
                    out.failures += 1
                    continue
                if i >= a.warmup:
                    out.add((t0, t1, t2), (c_0, c_1, c_2))
                    out.found += any(r.payload == payload for r in got)
                    # which RPCs the network answered (the put's stores end with its call)
                    for k, v in (counters() - c0).items():
                        rpcs["get" if k == "rpc:ds_find_value" else "put"][k] += v
        if prof is not None:
            prof.disable()
        n = max(1, len(out.put))
        out.extra["rpcs_per_op"] = {
            kind: {k: round(v / n, 1) for k, v in sorted(c.items())} for kind, c in rpcs.items()
        }
        out.extra["table_mean"] = round(statistics.fmean(len(nd.table) for nd in nodes), 1)
        return out
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.close()


def _factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run_dhtsignal(a: argparse.Namespace, loop: str, payload: bytes) -> Samples:
    with asyncio.Runner(loop_factory=_factory(loop)) as runner:
        return runner.run(_dhtsignal(a, loop, payload))


# -- OpenDHT -----------------------------------------------------------------------------


def run_opendht(a: argparse.Namespace, payload: bytes) -> Samples:
    import opendht as dht

    out = Samples()
    runners: list[Any] = []

    def put(r: Any, key: Any) -> bool:
        done = threading.Event()
        res = [False]

        def cb(ok: bool, _nodes: Any) -> None:
            res[0] = ok
            done.set()

        r.put(key, dht.Value(payload), cb)
        if not done.wait(OP_TIMEOUT):
            raise TimeoutError("put")
        return res[0]

    def get(r: Any, key: Any) -> list[bytes]:
        done = threading.Event()
        vals: list[bytes] = []

        def on_value(v: Any) -> bool:
            vals.append(v.data)
            return True

        def cb(_ok: bool, _nodes: Any) -> None:
            done.set()

        r.get(key, on_value, cb)
        if not done.wait(OP_TIMEOUT):
            raise TimeoutError("get")
        return vals

    try:
        t_setup = time.perf_counter()
        for _ in range(a.nodes):
            r = dht.DhtRunner()
            r.run(port=0, ipv4=HOST)  # one UDP socket on 127.0.0.1, no IPv6 socket
            runners.append(r)
        _check_loopback("opendht")
        port0 = runners[0].getBound().getPort()
        for r in runners[1:]:
            r.bootstrap(HOST, str(port0))
        out.extra["setup_s"] = round(time.perf_counter() - t_setup, 2)
        out.extra["bound_example"] = runners[0].getBound().toString().decode()
        time.sleep(a.settle)
        put_false = 0
        with Clock(out):
            for i, (src, dst) in enumerate(_plan(a.nodes, a.warmup + a.ops, a.seed)):
                key = dht.InfoHash.get(f"putget-opendht-{a.seed}-{i}")
                try:
                    c0, t0 = time.process_time(), time.perf_counter()
                    ok = put(runners[src], key)
                    c1, t1 = time.process_time(), time.perf_counter()
                    vals = get(runners[dst], key)
                    c2, t2 = time.process_time(), time.perf_counter()
                except TimeoutError:
                    out.failures += 1
                    continue
                if i >= a.warmup:
                    put_false += not ok
                    out.add((t0, t1, t2), (c0, c1, c2))
                    out.found += payload in vals
        out.extra["put_reported_failure"] = put_false
        return out
    finally:
        # join() alone stops a runner; shutdown() followed by join() hangs in 4.4.2.
        def join_all() -> None:
            for r in runners:
                with contextlib.suppress(Exception):
                    r.join()

        joiner = threading.Thread(target=join_all, daemon=True)
        joiner.start()
        joiner.join(30.0)
        if joiner.is_alive():
            print("  warning: OpenDHT runners did not stop within 30 s", file=sys.stderr)


# -- stock kademlia ----------------------------------------------------------------------


async def _stock(a: argparse.Namespace, tag: str, payload: bytes) -> Samples:
    from kademlia.network import Server

    out = Samples()
    servers: list[Any] = []
    try:
        t_setup = time.perf_counter()
        for _ in range(a.nodes):
            srv = Server()
            await srv.listen(0, interface=HOST)
            servers.append(srv)
        _check_loopback("stock kademlia")
        port0 = servers[0].transport.get_extra_info("sockname")[1]
        for srv in servers[1:]:
            async with asyncio.timeout(OP_TIMEOUT):
                await srv.bootstrap([(HOST, port0)])
        out.extra["setup_s"] = round(time.perf_counter() - t_setup, 2)
        await asyncio.sleep(a.settle)
        with Clock(out):
            for i, (src, dst) in enumerate(_plan(a.nodes, a.warmup + a.ops, a.seed)):
                name = f"putget-stock-{tag}-{a.seed}-{i}"
                try:
                    c0, t0 = time.process_time(), time.perf_counter()
                    async with asyncio.timeout(OP_TIMEOUT):
                        await servers[src].set(name, payload)
                    c1, t1 = time.process_time(), time.perf_counter()
                    async with asyncio.timeout(OP_TIMEOUT):
                        got = await servers[dst].get(name)
                    c2, t2 = time.process_time(), time.perf_counter()
                except Exception:
                    out.failures += 1
                    continue
                if i >= a.warmup:
                    out.add((t0, t1, t2), (c0, c1, c2))
                    out.found += got == payload
        return out
    finally:
        for srv in servers:
            with contextlib.suppress(Exception):
                srv.stop()
        await asyncio.sleep(0)
        for t in asyncio.all_tasks() - {asyncio.current_task()}:
            t.cancel()


def run_stock(a: argparse.Namespace, loop: str, payload: bytes) -> Samples:
    with asyncio.Runner(loop_factory=_factory(loop)) as runner:
        return runner.run(_stock(a, loop, payload))


# -- orchestration -----------------------------------------------------------------------


def _profile(a: argparse.Namespace, payload: bytes) -> str:
    import cProfile
    import io
    import pstats

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "profile_putget_dhtsignal.pstats"
    prof = cProfile.Profile()
    pa = argparse.Namespace(
        **{**vars(a), "ops": min(a.ops, 100), "seed": a.seed + 7, "profiler": prof}
    )
    res = _summ([run_dhtsignal(pa, "asyncio", payload)])
    prof.dump_stats(str(path))
    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(45)
    print(
        f"\n=== cProfile of the dhtsignal put/get loop on asyncio ({pa.warmup + pa.ops} "
        f"put+get, setup excluded; under the profiler put p50 {res['put_ms_p50']} ms, get p50 "
        f"{res['get_ms_p50']} ms) -> {path}"
    )
    print(buf.getvalue())
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--ops", type=int, default=200, help="measured ops per system, all rounds")
    p.add_argument("--warmup", type=int, default=20, help="warm-up ops per system and round")
    p.add_argument("--rounds", type=int, default=2, help="fresh networks per system, interleaved")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--size", type=int, default=200, help="payload bytes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--systems", default="dhtsignal-asyncio,dhtsignal-uvloop,opendht,stock-asyncio")
    p.add_argument("--stock-uvloop", action="store_true", help="also stock kademlia on uvloop")
    p.add_argument("--quick", action="store_true", help="60 ops, 1 round, 1 s settle")
    p.add_argument("--profile", action="store_true", help="also cProfile a dhtsignal phase")
    p.add_argument("--json", default="", help="write results to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.ops, a.warmup, a.settle, a.rounds = min(a.ops, 60), min(a.warmup, 10), 1.0, 1
    # stock kademlia/rpcudp print a warning per RPC timeout through logging's last resort
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    payload = random.Random(a.seed).randbytes(a.size)
    systems = [s for s in a.systems.split(",") if s]
    if a.stock_uvloop and "stock-uvloop" not in systems:
        systems.append("stock-uvloop")

    def runner(name: str, ra: argparse.Namespace) -> Samples:
        if name.startswith("dhtsignal-"):
            return run_dhtsignal(ra, name.split("-", 1)[1], payload)
        if name.startswith("stock-"):
            return run_stock(ra, name.split("-", 1)[1], payload)
        if name == "opendht":
            return run_opendht(ra, payload)
        raise SystemExit(f"unknown system {name}")

    per_round = max(1, a.ops // a.rounds)
    print(
        f"putget: {a.nodes} nodes per system in this process, bootstrap from node 0, settle "
        f"{a.settle}s; {a.rounds} round(s) of a fresh network per system, systems interleaved, "
        f"{a.warmup} warm-up + {per_round} measured ops per round (fresh key: put from a random "
        f"node, get from another); {a.size}-byte payload",
        flush=True,
    )
    samples: dict[str, list[Samples]] = {name: [] for name in systems}
    for rnd in range(a.rounds):
        order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
        for name in order:
            ra = argparse.Namespace(**{**vars(a), "ops": per_round, "seed": a.seed + 1000 * rnd})
            sm = runner(name, ra)
            samples[name].append(sm)
            r1 = _summ([sm])
            print(
                f"  [{rnd}] {name:18s} put p50 {r1['put_ms_p50']:7.2f} ms, get p50 "
                f"{r1['get_ms_p50']:6.2f} ms  (other processes {r1['other_cpu_pct']:.0f}% CPU)",
                flush=True,
            )
    results = {name: _summ(rs) for name, rs in samples.items()}
    print()
    print(
        f"  {'system':18s} {'put p50':>8s} {'p90':>7s} {'get p50':>8s} {'p90':>7s}  "
        f"{'CPU/put':>7s} {'CPU/get':>7s}  found  fail  other-CPU"
    )
    for name, r in results.items():
        print(
            f"  {name:18s} {r['put_ms_p50']:8.2f} {r['put_ms_p90']:7.2f} {r['get_ms_p50']:8.2f} "
            f"{r['get_ms_p90']:7.2f}  {r['put_cpu_ms_p50']:7.2f} {r['get_cpu_ms_p50']:7.2f}  "
            f"{r['gets_found']:>3d}/{r['ops']:<3d} {r['failures']:>3d}  {r['other_cpu_pct']:5.0f}%"
        )
        if "rpcs_per_op" in r:
            print(f"  {'':18s} RPCs answered per op: {json.dumps(r['rpcs_per_op'])}")
    print("  (times in ms; CPU = this process's CPU time per op, all threads, p50)")
    ratios: dict[str, Any] = {}
    base = results.get("opendht")
    if base:
        print(f"\nratios vs OpenDHT (target for dhtsignal <= {TARGET_RATIO}x):")
        for name, r in results.items():
            if name == "opendht":
                continue
            rr = {
                f"{m}_{q}": round(r[f"{m}_ms_{q}"] / base[f"{m}_ms_{q}"], 2)
                for m in ("put", "get")
                for q in ("p50", "p90")
                if base[f"{m}_ms_{q}"]
            }
            ratios[name] = rr
            print(
                f"  {name:18s} put p50 {rr['put_p50']:5.2f}x p90 {rr['put_p90']:5.2f}x | "
                f"get p50 {rr['get_p50']:5.2f}x p90 {rr['get_p90']:5.2f}x"
            )
    out: dict[str, Any] = {
        "bench": "putget",
        "params": {
            k: getattr(a, k) for k in ("nodes", "ops", "warmup", "rounds", "settle", "size")
        },
        "systems": results,
        "ratios_vs_opendht": ratios,
        "facts_p50_ms": FACTS,
    }
    if a.profile:
        out["profile"] = _profile(a, payload)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
