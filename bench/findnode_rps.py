#!/usr/bin/env python3
"""FIND_NODE replies per second of one node: dhtsignal vs stock kademlia 2.2.3.

What it measures
----------------
One node under test runs alone in its own OS process (``--serve``), on the
asyncio or the uvloop event loop, with a routing table pre-filled with
``--contacts`` contacts (random IDs, fake ports on 127.0.0.1; the same seeded
IDs for both implementations). A load generator in another process (``--gen``)
spreads the load over ``--sockets`` UDP source sockets, each bound to its own
127.0.N.1 address in its own /24 (so no single source host or prefix exceeds
dhtsignal's default rate limits of 1000 req/s per host and 4000 per /24; the
dhtsignal node runs its *default* NodeConfig), keeps ``--window`` requests
outstanding per socket, and counts the valid replies (matching message id, a
20-contact list) received during ``--duration`` seconds after ``--warmup``.
Each socket is a distinct sender with its own node id, like real peers.

Cases, all in one run, interleaved per loop:

* stock kademlia answering the stock ``find_node``;
* dhtsignal answering ``ds_find_node`` (its own RPC);
* dhtsignal answering the stock ``find_node`` (it answers both).

The generator is a tight non-asyncio epoll loop. To show it is not the
bottleneck, the run also measures it against a minimal blocking echo loop that
returns a canned 20-contact reply (its *ceiling*), and reports the CPU the
generator and the server used during the window. With two or more CPUs the
server is pinned to CPU 0 and the generator to CPU 1.

Usage::

    python bench/findnode_rps.py                 # full run, 2 rounds (about 80 s)
    python bench/findnode_rps.py --quick         # shorter windows
    python bench/findnode_rps.py --profile       # also cProfile the dhtsignal server
    python bench/findnode_rps.py --breakdown     # in-process cost of each reply stage

Internal entry points (started by the bench itself)::

    python bench/findnode_rps.py --serve dhtsignal --loop uvloop
    python bench/findnode_rps.py --gen --port P --rpc ds_find_node
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HOST = "127.0.0.1"
NETWORK = "dhtsignal/1"
FAKE_PORT_BASE = 2000  # contacts live on 127.0.0.1:2000+i; nothing listens there
SEED = 20240611
STOCK_FIGURES = {"asyncio": 4000.0, "uvloop": 5500.0}  # FACTS.md, measured on this machine kind
TARGET_RATIO = 4.0


# -- process hygiene ---------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the parent dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def _pin(cpu: int) -> None:
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        data = fh.read()
    fields = data[data.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_busy_seconds() -> float:
    """CPU seconds all processes of the host spent busy so far (from /proc/stat)."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _ids(rng: random.Random, n: int) -> list[bytes]:
    return [rng.randbytes(20) for _ in range(n)]


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


# -- the node under test -----------------------------------------------------------------


async def _start_dhtsignal(own_id: bytes, contacts: list[bytes]) -> tuple[int, Any, Any]:
    from dhtsignal.aio.node import DhtNode
    from dhtsignal.dht.routing import Contact

    node = DhtNode(own_id)  # default NodeConfig: rate limit 1000 req/s per source
    addr = await node.listen_udp(HOST, 0)
    now = asyncio.get_running_loop().time()
    for i, cid in enumerate(contacts):
        node.table.add_contact(Contact(cid, HOST, FAKE_PORT_BASE + i), now)  # heads not pinged

    def report() -> dict[str, Any]:
        return {"table": len(node.table), "stats": dict(node.stats)}

    return addr[1], node.close, report


async def _start_stock(own_id: bytes, contacts: list[bytes]) -> tuple[int, Any, Any]:
    from kademlia.network import Server
    from kademlia.node import Node

    server = Server(node_id=own_id)
    await server.listen(0, interface=HOST)
    router = server.protocol.router
    cancelled = 0
    for i, cid in enumerate(contacts):
        before = asyncio.all_tasks()
        router.add_contact(Node(cid, HOST, FAKE_PORT_BASE + i))
        # A full bucket that cannot split schedules a ping of its head: cancel it before it
        # runs, so both implementations start with the same silent table.
        for t in asyncio.all_tasks() - before:
            t.cancel()
            cancelled += 1
    await asyncio.sleep(0)

    def report() -> dict[str, Any]:
        n = sum(len(b.nodes) for b in router.buckets)
        return {"table": n, "prefill_pings_cancelled": cancelled, "buckets": len(router.buckets)}

    async def close() -> None:
        server.stop()

    return server.transport.get_extra_info("sockname")[1], close, report


async def _serve_async(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    rng = random.Random(SEED)
    own_id = rng.randbytes(20)
    contacts = _ids(rng, a.contacts)
    starter = _start_dhtsignal if a.serve == "dhtsignal" else _start_stock
    port, close, report = await starter(own_id, contacts)
    prof = None
    if a.profile:
        import cProfile

        prof = cProfile.Profile()
    print(json.dumps({"ready": True, "port": port, "pid": os.getpid(), **report()}), flush=True)
    if prof is not None:
        prof.enable()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), a.max_seconds)
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(a.profile)
        print(json.dumps({"done": True, **report()}), flush=True)
        await close()


def _serve_echo(a: argparse.Namespace) -> None:
    """A minimal blocking loop answering every request with a canned 20-contact reply."""
    import msgpack

    rng = random.Random(SEED)
    canned = msgpack.packb(
        [[cid, HOST, FAKE_PORT_BASE + i] for i, cid in enumerate(_ids(rng, 20))], use_bin_type=True
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.settimeout(0.1)
    print(json.dumps({"ready": True, "port": s.getsockname()[1], "pid": os.getpid()}), flush=True)
    deadline = time.monotonic() + a.max_seconds
    answered = 0
    while not stop and time.monotonic() < deadline:
        try:
            data, addr = s.recvfrom(2048)
        except (TimeoutError, InterruptedError):
            continue
        except OSError:
            continue
        if len(data) > 21 and data[0] == 0:
            s.sendto(b"\x01" + data[1:21] + canned, addr)
            answered += 1
    print(json.dumps({"done": True, "answered": answered}), flush=True)
    s.close()


def serve_main(a: argparse.Namespace) -> None:
    _die_with_parent()
    _pin(a.cpu)
    if a.serve == "echo":
        _serve_echo(a)
        return
    with asyncio.Runner(loop_factory=_loop_factory(a.loop)) as runner:
        runner.run(_serve_async(a))


# -- the load generator ------------------------------------------------------------------


def gen_main(a: argparse.Namespace) -> None:
    """Keep ``window`` requests outstanding on each of ``sockets`` sockets; count replies."""
    import msgpack

    _die_with_parent()
    _pin(a.cpu)
    unpackb = msgpack.unpackb
    packer = msgpack.Packer(use_bin_type=True)
    rng = random.Random(SEED + 1)
    n = a.sockets
    socks: list[socket.socket] = []
    bodies: list[list[bytes]] = []
    pongs: list[dict[str, bytes]] = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # Each socket is its own host in its own /24 (127.0.i+1.1): the node limits
        # requests per host and per /24 (issue 10), not per port.
        s.bind((f"127.0.{i % 254 + 1}.1", 0))
        s.connect((HOST, a.port))
        s.setblocking(False)
        socks.append(s)
        sender = rng.randbytes(20)
        # The node validates a new address by pinging it (issue 10): answer as a node would.
        seen = list(s.getsockname()[:2])
        pongs.append({"ds_ping": packer.pack([sender, seen]), "ping": packer.pack(sender)})
        mine = []
        for _ in range(16):
            target = rng.randbytes(20)
            if a.rpc == "ds_find_node":
                mine.append(packer.pack(["ds_find_node", [NETWORK, sender, 0, target]]))
            else:
                mine.append(packer.pack(["find_node", [sender, target]]))
        bodies.append(mine)
    ep = select.epoll()
    index = {}
    for i, s in enumerate(socks):
        ep.register(s.fileno(), select.EPOLLIN)
        index[s.fileno()] = i
    outstanding: list[dict[bytes, float]] = [{} for _ in range(n)]
    turn = [0] * n
    prefix = os.urandom(12)
    counter = 0
    send_errors = 0
    expected = a.expect

    def send(i: int, now: float) -> None:
        nonlocal counter, send_errors
        counter += 1
        mid = prefix + counter.to_bytes(8, "big")
        t = turn[i] = (turn[i] + 1) & 15
        try:
            socks[i].send(b"\x00" + mid + bodies[i][t])
        except OSError:
            send_errors += 1
            return
        outstanding[i][mid] = now

    t0 = time.perf_counter()
    for i in range(n):
        for _ in range(a.window):
            send(i, t0)
    w_start = t0 + a.warmup
    w_end = w_start + a.duration
    hard_end = w_end + 0.05
    valid = invalid = stray = lost = recv_errors = 0
    rtts: list[float] = []
    measuring = False
    cpu0 = srv0 = host0 = 0.0
    t_meas0 = w_start
    next_sweep = t0 + 0.1
    now = t0
    poll = ep.poll
    while now < hard_end:
        events = poll(0.01)
        now = time.perf_counter()
        if not measuring and now >= w_start:
            measuring = True
            t_meas0 = now
            cpu0 = time.process_time()
            srv0 = _proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
            host0 = _host_busy_seconds()
        in_window = measuring and now < w_end
        for fd, _ev in events:
            i = index[fd]
            s = socks[i]
            out = outstanding[i]
            for _ in range(64):
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                except OSError:
                    recv_errors += 1
                    break
                if data[:1] == b"\x00":  # a ping from the node: answer it
                    try:
                        name = unpackb(data[21:])[0]
                        s.send(b"\x01" + data[1:21] + pongs[i][name])
                    except Exception:
                        stray += 1
                    continue
                sent = out.pop(data[1:21], None)
                if sent is None or data[0] != 1:
                    stray += 1
                    continue
                try:
                    body = unpackb(data[21:])
                    ok = type(body) is list and len(body) == expected and type(body[0]) is list
                except Exception:
                    ok = False
                if in_window:
                    if ok:
                        valid += 1
                        rtts.append(now - sent)
                    else:
                        invalid += 1
                send(i, now)
        if now >= next_sweep:  # requests (or replies) lost to full socket buffers
            next_sweep = now + 0.1
            limit = now - a.timeout
            for i in range(n):
                out = outstanding[i]
                old = [m for m, t in out.items() if t < limit]
                for m in old:
                    del out[m]
                    lost += 1
                for _ in range(a.window - len(out)):
                    send(i, now)
        if measuring and now >= w_end:
            break
    t_meas1 = time.perf_counter()
    cpu1 = time.process_time()
    srv1 = _proc_cpu_seconds(a.server_pid) if a.server_pid else 0.0
    host1 = _host_busy_seconds()
    for s in socks:
        s.close()
    ep.close()
    span = max(1e-9, t_meas1 - t_meas0)
    rtts.sort()

    def pct(p: float) -> float:
        return round(rtts[min(len(rtts) - 1, int(p * len(rtts)))] * 1e3, 3) if rtts else 0.0

    print(
        json.dumps(
            {
                "rps": valid / span,
                "valid": valid,
                "invalid": invalid,
                "stray": stray,
                "lost": lost,
                "send_errors": send_errors,
                "recv_errors": recv_errors,
                "window_s": span,
                "gen_cpu_pct": 100.0 * (cpu1 - cpu0) / span,
                "gen_us_per_reply": 1e6 * (cpu1 - cpu0) / valid if valid else None,
                # CPU used by everything else on the host (other jobs, kernel threads): noise.
                "other_cpu_pct": 100.0 * ((host1 - host0) - (cpu1 - cpu0) - (srv1 - srv0)) / span,
                "server_cpu_pct": 100.0 * (srv1 - srv0) / span,
                "server_us_per_reply": 1e6 * (srv1 - srv0) / valid if valid else None,
                "rtt_ms_p50": pct(0.5),
                "rtt_ms_p99": pct(0.99),
            }
        ),
        flush=True,
    )


# -- orchestration -----------------------------------------------------------------------


class _Lines:
    """Read newline-terminated JSON from a child's stdout with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next_json(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("child did not answer in time")
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise RuntimeError("child exited before answering")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


def run_case(
    impl: str, loop: str, rpc: str, a: argparse.Namespace, profile: str | None = None
) -> dict[str, Any]:
    """Start one server and one generator; return the generator's figures plus server info."""
    multi = len(os.sched_getaffinity(0)) >= 2 if hasattr(os, "sched_getaffinity") else False
    cpu_srv, cpu_gen = (0, 1) if multi else (-1, -1)
    limit = a.warmup + a.duration + 30
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryFile() as errlog:
        try:
            return _run_case(impl, loop, rpc, a, profile, (cpu_srv, cpu_gen), limit, procs, errlog)
        except Exception:
            errlog.seek(0)
            sys.stderr.write(errlog.read().decode(errors="replace")[-4000:])
            raise
        finally:
            for p in reversed(procs):
                _stop(p)


def _run_case(
    impl: str,
    loop: str,
    rpc: str,
    a: argparse.Namespace,
    profile: str | None,
    cpus: tuple[int, int],
    limit: float,
    procs: list[subprocess.Popen[bytes]],
    errlog: Any,
) -> dict[str, Any]:
    me = str(Path(__file__).resolve())
    cmd = [sys.executable, me, "--serve", impl, "--loop", loop]
    cmd += ["--contacts", str(a.contacts), "--cpu", str(cpus[0]), "--max-seconds", str(limit)]
    if profile:
        cmd += ["--profile", profile]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog)
    procs.append(srv)
    lines = _Lines(srv)
    ready = lines.next_json(30)
    gcmd = [sys.executable, me, "--gen", "--port", str(ready["port"]), "--rpc", rpc]
    gcmd += ["--sockets", str(a.sockets), "--window", str(a.window)]
    gcmd += ["--warmup", str(a.warmup), "--duration", str(a.duration)]
    gcmd += ["--server-pid", str(srv.pid), "--cpu", str(cpus[1])]
    gen = subprocess.Popen(gcmd, stdout=subprocess.PIPE, stderr=errlog)
    procs.append(gen)
    out, _ = gen.communicate(timeout=limit)
    if gen.returncode != 0:
        raise RuntimeError(f"generator failed with {gen.returncode}")
    res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    srv.send_signal(signal.SIGTERM)
    done = lines.next_json(30 if profile else 10)
    srv.wait(timeout=10)
    res.update(impl=impl, loop=loop, rpc=rpc, table=ready.get("table"))
    res["server_after"] = {k: v for k, v in done.items() if k != "done"}
    return res


CASES = [
    ("stock", "find_node"),
    ("dhtsignal", "ds_find_node"),
    ("dhtsignal", "find_node"),
]


def _fmt_k(x: float) -> str:
    return f"{x / 1000:.1f}k"


def orchestrate(a: argparse.Namespace) -> dict[str, Any]:
    loops = a.loops
    rows: list[dict[str, Any]] = []
    print(
        f"findnode_rps: {a.sockets} source sockets x window {a.window}, warmup {a.warmup}s, "
        f"window {a.duration}s, {a.contacts} contacts, {a.rounds} round(s); dhtsignal runs its "
        "default NodeConfig (1000 req/s per source address)",
        flush=True,
    )
    echo_args = argparse.Namespace(**{**vars(a), "window": max(8, a.window)})
    echo = run_case("echo", "asyncio", "find_node", echo_args)
    print(
        f"  generator ceiling vs a blocking echo loop (window {echo_args.window}): "
        f"{_fmt_k(echo['rps'])}/s (generator CPU {echo['gen_cpu_pct']:.0f}%, "
        f"{echo['gen_us_per_reply']:.1f} us/reply; echo CPU {echo['server_cpu_pct']:.0f}%)",
        flush=True,
    )
    for rnd in range(a.rounds):
        for loop in loops:
            for impl, rpc in CASES:
                r = run_case(impl, loop, rpc, a)
                r["round"] = rnd
                rows.append(r)
                print(
                    f"  [{rnd}] {impl:9s} {loop:7s} {rpc:12s} {_fmt_k(r['rps']):>7s}/s  "
                    f"srv CPU {r['server_cpu_pct']:3.0f}% "
                    f"({r['server_us_per_reply'] or 0:.0f} us/reply)  "
                    f"gen CPU {r['gen_cpu_pct']:3.0f}%  other CPU {r['other_cpu_pct']:3.0f}%  "
                    f"lost {r['lost']} invalid {r['invalid']}  rtt p50 {r['rtt_ms_p50']} ms",
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for loop in loops:
        med: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for impl, rpc in CASES:
            mine = [r for r in rows if (r["impl"], r["loop"], r["rpc"]) == (impl, loop, rpc)]
            med[f"{impl}/{rpc}"] = statistics.median(r["rps"] for r in mine)
            cpu[f"{impl}/{rpc}"] = statistics.median(r["server_us_per_reply"] or 0 for r in mine)
        stock, stock_cpu = med["stock/find_node"], cpu["stock/find_node"]
        summary[loop] = {
            "rps": {k: round(v) for k, v in med.items()},
            "server_us_per_reply": {k: round(v, 1) for k, v in cpu.items()},
            "ratio_ds_find_node_vs_stock": round(med["dhtsignal/ds_find_node"] / stock, 2),
            "ratio_ds_answering_find_node_vs_stock": round(med["dhtsignal/find_node"] / stock, 2),
            "ratio_ds_find_node_vs_facts_stock": round(
                med["dhtsignal/ds_find_node"] / STOCK_FIGURES[loop], 2
            ),
            # CPU per reply, stock / ours: what the throughput ratio would be with a whole CPU
            # each (robust to other jobs on the host taking CPU during the window).
            "cpu_ratio_ds_find_node_vs_stock": round(
                stock_cpu / max(1e-9, cpu["dhtsignal/ds_find_node"]), 2
            ),
            "cpu_ratio_ds_answering_find_node_vs_stock": round(
                stock_cpu / max(1e-9, cpu["dhtsignal/find_node"]), 2
            ),
        }
    print()
    print(
        f"{'loop':8s} {'stock':>8s} {'ds_find_node':>13s} {'ratio':>6s} "
        f"{'ds<-find_node':>14s} {'ratio':>6s}   target >= {TARGET_RATIO}x   "
        "server CPU us/reply: stock / ds / ds<-find_node (CPU ratios)"
    )
    for loop, s in summary.items():
        r, c = s["rps"], s["server_us_per_reply"]
        print(
            f"{loop:8s} {_fmt_k(r['stock/find_node']):>8s} "
            f"{_fmt_k(r['dhtsignal/ds_find_node']):>13s} "
            f"{s['ratio_ds_find_node_vs_stock']:>5.2f}x "
            f"{_fmt_k(r['dhtsignal/find_node']):>14s} "
            f"{s['ratio_ds_answering_find_node_vs_stock']:>5.2f}x   {'':13s}"
            f"{c['stock/find_node']:.0f} / {c['dhtsignal/ds_find_node']:.0f} / "
            f"{c['dhtsignal/find_node']:.0f} ({s['cpu_ratio_ds_find_node_vs_stock']:.2f}x, "
            f"{s['cpu_ratio_ds_answering_find_node_vs_stock']:.2f}x)"
        )
    gen_max = max(r["gen_cpu_pct"] for r in rows)
    other = statistics.median(r["other_cpu_pct"] for r in rows)
    best = max(r["rps"] for r in rows)
    print(
        f"generator: at most {gen_max:.0f}% of its CPU in the cases; best case {_fmt_k(best)}/s "
        f"vs its echo ceiling {_fmt_k(echo['rps'])}/s. Other processes on the host used a "
        f"median {other:.0f}% CPU during the windows (of {os.cpu_count()} CPUs).",
        flush=True,
    )
    result: dict[str, Any] = {
        "bench": "findnode_rps",
        "params": {
            "sockets": a.sockets,
            "window": a.window,
            "warmup_s": a.warmup,
            "duration_s": a.duration,
            "contacts": a.contacts,
            "rounds": a.rounds,
            "loops": loops,
        },
        "echo_ceiling": echo,
        "cases": rows,
        "summary": summary,
    }
    if a.profile:
        result["profiles"] = profile_cases(a)
    return result


def profile_cases(a: argparse.Namespace) -> dict[str, str]:
    """Run the dhtsignal cases once more under cProfile; print and save the top functions."""
    import io
    import pstats

    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for rpc in ("ds_find_node", "find_node"):
        path = RESULTS / f"profile_findnode_dhtsignal_{rpc}.pstats"
        r = run_case("dhtsignal", a.loops[0], rpc, a, profile=str(path))
        buf = io.StringIO()
        st = pstats.Stats(str(path), stream=buf)
        st.sort_stats("tottime").print_stats(18)
        st.sort_stats("cumulative").print_stats(25)
        text = buf.getvalue()
        print(
            f"\n=== cProfile of dhtsignal answering {rpc} on {a.loops[0]} "
            f"({_fmt_k(r['rps'])}/s under the profiler) -> {path}"
        )
        print(text)
        out[rpc] = str(path)
    return out


# -- in-process breakdown ----------------------------------------------------------------


def breakdown(a: argparse.Namespace) -> dict[str, float]:
    """Time each stage of dhtsignal's reply path in-process (no sockets, no loop overhead)."""
    import timeit

    import msgpack

    async def main() -> dict[str, float]:
        from dhtsignal.aio.node import DhtNode
        from dhtsignal.dht.routing import Contact
        from dhtsignal.wire import codec

        rng = random.Random(SEED)
        own = rng.randbytes(20)
        node = DhtNode(own)
        now = asyncio.get_running_loop().time()
        for i, cid in enumerate(_ids(rng, a.contacts)):
            node.table.add_contact(Contact(cid, HOST, FAKE_PORT_BASE + i), now)
        senders = [rng.randbytes(20) for _ in range(a.sockets)]
        src = [(HOST, 40000 + i) for i in range(a.sockets)]
        book = getattr(node.core, "addrs", None)  # trees before address validation: none
        for s, addr in zip(senders, src, strict=True):  # senders already known, as in the bench
            node.table.add_contact(Contact(s, addr[0], addr[1]), now)
            if book is not None:  # and validated, as once the bench's pings are answered
                book.validate(addr)
                book.confirm(addr, s)
        target = rng.randbytes(20)
        ds = (
            b"\x00"
            + os.urandom(20)
            + msgpack.packb(["ds_find_node", [NETWORK, senders[0], 0, target]], use_bin_type=True)
        )
        st = (
            b"\x00"
            + os.urandom(20)
            + msgpack.packb(["find_node", [senders[0], target]], use_bin_type=True)
        )
        req = codec.decode(ds)
        sreq = codec.decode(st)
        out = node.handler.handle(req, src[0], now)
        h = node.handler
        t = node.table
        twenty = t.closest(target, 20)
        n = 20000
        cases = {
            "codec.decode(ds_find_node)": lambda: codec.decode(ds),
            "rate.admit(src)": lambda: node.core.rate.admit(src[0], now),
            "handler.handle(ds_find_node)": lambda: h.handle(req, src[0], now),
            "handler.handle(find_node)": lambda: h.handle(sreq, src[0], now),
            "table.add_contact(existing)": lambda: t.add_contact(
                Contact(senders[0], src[0][0], src[0][1]), now
            ),
            "table.closest(target, 21) [cached flat]": lambda: t.closest(target, 21),
            "[c.wire() for 20 contacts]": lambda: [c.wire() for c in twenty],
            "codec.encode_response(20 contacts, msgpack)": lambda: codec.encode_response(
                req.msg_id, [c.wire() for c in twenty]
            ),
            "reply from cached packed contacts": lambda: (
                b"\x01"
                + req.msg_id
                + codec.array_header(20)
                + b"".join([c.packed() for c in twenty])
            ),
            "outcome.body() (ds_find_node)": out.body,
            "core.receive_datagram(ds_find_node) total": None,
        }
        transport = node.transport
        node.transport = None
        limiter = node.core.rate  # rate.admit timed above
        for table in (limiter.hosts, limiter.prefixes) if hasattr(limiter, "hosts") else (limiter,):
            table.rate = 0.0
        cases["core.receive_datagram(ds_find_node) total"] = lambda: node.core.receive_datagram(
            ds, src[1], now
        )
        res: dict[str, float] = {}
        for name, fn in cases.items():
            secs = min(timeit.repeat(fn, number=n, repeat=3, timer=time.process_time))
            res[name] = round(secs / n * 1e6, 2)
        node.transport = transport
        await node.close()
        return res

    with asyncio.Runner(loop_factory=_loop_factory(a.loops[0])) as runner:
        res = runner.run(main())
    print(
        f"dhtsignal reply path, in-process, us of CPU per call ({a.contacts} contacts + "
        f"{a.sockets} known senders):"
    )
    for k, v in res.items():
        print(f"  {v:8.2f}  {k}")
    return res


# -- entry -------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=["dhtsignal", "stock", "echo"], help=argparse.SUPPRESS)
    p.add_argument("--gen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--loops", default="asyncio,uvloop", help="event loops to compare")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--rpc", default="ds_find_node", choices=["ds_find_node", "find_node"])
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--cpu", type=int, default=-1, help="pin this process to a CPU")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--contacts", type=int, default=200)
    p.add_argument("--sockets", type=int, default=64)
    p.add_argument("--window", type=int, default=2, help="outstanding requests per socket")
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=0.5, help="request considered lost after")
    p.add_argument("--expect", type=int, default=20, help="contacts in a valid reply")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians)")
    p.add_argument("--quick", action="store_true", help="1.5 s windows")
    p.add_argument(
        "--profile",
        nargs="?",
        const="1",
        default=None,
        help="also cProfile the dhtsignal server (extra runs)",
    )
    p.add_argument("--breakdown", action="store_true", help="in-process per-stage timings only")
    p.add_argument("--json", default="", help="write results to this file")
    a = p.parse_args(argv)
    a.loops = [x for x in a.loops.split(",") if x]
    if a.quick and not (a.serve or a.gen):
        a.duration = min(a.duration, 1.5)
        a.warmup = min(a.warmup, 0.3)
        a.rounds = 1
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.serve:
        if a.profile == "1":
            a.profile = None
        serve_main(a)
        return 0
    if a.gen:
        gen_main(a)
        return 0
    if a.breakdown:
        res: dict[str, Any] = {"bench": "findnode_breakdown", "us_per_call": breakdown(a)}
    else:
        res = orchestrate(a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
