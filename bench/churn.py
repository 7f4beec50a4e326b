"""Churn and mass join with real DHT nodes in separate processes on 127.0.0.1.

Two modes (``--mode``):

``churn`` (default)
    ``--nodes`` DHT nodes in ``--procs`` worker processes (100 in 10). After a quiet
    phase of ``--quiet`` seconds, one tenth of the nodes is replaced every minute for
    ``--minutes`` minutes, one replacement every ``60 / (nodes / 10)`` seconds rotating
    over the workers: half of them crash (the socket closes with no word) and half leave
    (dhtsignal's ``close()``: ``ds_leave`` notices); each is replaced by a new node
    joining through a random live one. Lookups run throughout: every worker, every
    ``--interval`` seconds, gets one of ``--values`` values (put by a node that never
    churns, republished every minute) from a random node of its own. The same run is
    made with stock ``kademlia`` 2.2.3 nodes (``Server``; a leave is a plain ``stop()``,
    it has no other), side by side. Reports success and p50/p99 lookup time, quiet vs
    churn, for both.

``massjoin``
    ``--nodes`` dhtsignal nodes (1,000) in ``--procs`` workers all join at once through
    one seed node; ``--join-wait`` (2) seconds after the last join answered, ``--values``
    (1,000) values are put from random nodes, and each is got from a node of another
    worker; and again ``--later`` (30) seconds later. Reports the share found.

Usage::

    .venv/bin/python bench/churn.py [--quick] [--json out.json]
    .venv/bin/python bench/churn.py --mode massjoin [--quick] [--json out.json]

Each worker is ``bench/churn.py --worker`` speaking JSON lines on stdin/stdout; every
worker is killed by PID at the end, also on failure. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: A lookup slower than this counts as failed.
LOOKUP_TIMEOUT = 10.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


# -- worker ------------------------------------------------------------------------------


def _reraise_if_cancelling() -> None:
    """Inside an ``except CancelledError``: re-raise if our own task is being cancelled
    (shutdown); otherwise the cancellation was an operation's, whose node closed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _Ours:
    """dhtsignal nodes of one worker."""

    def __init__(self, refresh: float | None, overrides: dict[str, Any]) -> None:
        import dataclasses

        from dhtsignal.aio.node import DhtNode
        from dhtsignal.dht.params import NodeConfig
        from dhtsignal.identity import Identity

        self.DhtNode = DhtNode
        cfg = NodeConfig()
        if refresh is not None:
            cfg = NodeConfig(
                refresh_interval=refresh,
                good_for=refresh,
                maintenance_interval=min(cfg.maintenance_interval, refresh / 4),
            )
        cfg = dataclasses.replace(cfg, **overrides)
        self.cfg = cfg
        self.ident = Identity.generate()
        self.records: dict[str, Any] = {}
        self.boot_sizes: list[int] = []  # the table's size as each bootstrap ended

    async def start(self, boot: tuple[str, int] | None) -> Any:
        node = self.DhtNode(os.urandom(20), self.cfg)
        await node.listen_udp(HOST, 0)
        if boot is not None:
            self.boot_sizes.append(await node.bootstrap([boot]))
        return node

    def addr(self, node: Any) -> tuple[str, int]:
        a = node.address
        return (a[0], a[1])

    async def stop(self, node: Any, leave: bool) -> None:
        await node.close(leave=leave)

    def _record(self, name: str) -> Any:
        from dhtsignal.dht import records
        from dhtsignal.dht.records import RecordType

        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = records.sign(
                self.ident,
                RecordType.DATA,
                records.data_key(name),
                b"v",
                seq=1,
                expires=time.time() + 3600,
            )
        return rec

    async def put(self, node: Any, name: str) -> bool:
        await node.put([self._record(name)])
        return True

    async def get(self, node: Any, name: str) -> bool:
        from dhtsignal.dht import records

        recs = await node.get(records.data_key(name))
        return bool(recs)


class _Stock:
    """Stock kademlia 2.2.3 servers of one worker (they have no leave: a stop)."""

    def __init__(self) -> None:
        from kademlia.network import Server  # type: ignore[import-untyped]

        self.Server = Server

    async def start(self, boot: tuple[str, int] | None) -> Any:
        srv = self.Server()
        await srv.listen(0, interface=HOST)
        if boot is not None:
            await srv.bootstrap([boot])
        return srv

    def addr(self, srv: Any) -> tuple[str, int]:
        name = srv.transport.get_extra_info("sockname")
        return (name[0], name[1])

    async def stop(self, srv: Any, leave: bool) -> None:
        srv.stop()

    async def put(self, srv: Any, name: str) -> bool:
        return bool(await srv.set(name, "v:" + name))

    async def get(self, srv: Any, name: str) -> bool:
        return bool(await srv.get(name) == "v:" + name)


async def _worker(impl: str, refresh: float | None, overrides: dict[str, Any]) -> None:
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys_impl: Any = _Ours(refresh, overrides) if impl == "ours" else _Stock()
    loop = asyncio.get_running_loop()
    if impl != "ours":
        # rpcudp's timeout callback fails on a future a timed-out get cancelled; quiet it.
        loop.set_exception_handler(lambda _loop, _ctx: None)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    nodes: list[Any] = []
    fixed: set[int] = set()  # indices that never churn (the seed, the owner)
    tasks: set[asyncio.Task[Any]] = set()
    rng = random.Random(os.getpid())

    def reply(req_id: int, **kw: Any) -> None:
        sys.stdout.write(json.dumps({"id": req_id, **kw}) + "\n")
        sys.stdout.flush()

    def live() -> list[int]:
        return [i for i, n in enumerate(nodes) if n is not None]

    async def timed_get(node: Any, name: str) -> tuple[float, bool]:
        """A get within LOOKUP_TIMEOUT: (milliseconds, found)."""
        began = time.perf_counter()
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                ok = bool(await sys_impl.get(node, name))
        except (Exception, asyncio.CancelledError):
            # CancelledError: the node was replaced (closed) meanwhile.
            _reraise_if_cancelling()
            ok = False
        return ((time.perf_counter() - began) * 1000, ok)

    async def handle(req: dict[str, Any]) -> None:
        op, rid = req["op"], req["id"]
        began = time.monotonic()
        try:
            await _handle(req, op, rid)
        finally:
            took = time.monotonic() - began
            if took > 5 and op not in ("lookloop", "get", "put", "start"):
                print(f"worker {os.getpid()}: {op} took {took:.1f} s", file=sys.stderr)

    async def _handle(req: dict[str, Any], op: str, rid: int) -> None:
        try:
            if op == "start":
                boot = tuple(req["boot"]) if req.get("boot") else None
                made = await asyncio.gather(
                    *(sys_impl.start(boot) for _ in range(req["n"])), return_exceptions=True
                )
                addrs = []
                for m in made:
                    if isinstance(m, BaseException):
                        continue
                    nodes.append(m)
                    addrs.append(sys_impl.addr(m))
                if req.get("fixed"):
                    fixed.add(len(nodes) - len(addrs))
                if req.get("rcvbuf") and addrs:
                    # A small receive buffer at the seed: a mass join overflows it for sure.
                    sock = nodes[-1].transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, req["rcvbuf"])
                sizes = getattr(sys_impl, "boot_sizes", [])
                empty = sum(1 for z in sizes[-len(addrs) :] if z == 0) if addrs else 0
                reply(rid, addrs=addrs, failed=len(made) - len(addrs), empty=empty)
            elif op == "replace":
                pool = [i for i in live() if i not in fixed]
                i = rng.choice(pool)
                old, nodes[i] = nodes[i], None
                await sys_impl.stop(old, req["how"] == "leave")
                fresh = await sys_impl.start(tuple(req["boot"]))
                nodes.append(fresh)
                reply(rid, gone=sys_impl.addr(old), new=sys_impl.addr(fresh))
            elif op == "stats":
                total: dict[str, int] = {}
                for i in live():
                    for name, count in getattr(nodes[i], "stats", {}).items():
                        if not name.startswith("rpc:"):
                            total[name] = total.get(name, 0) + count
                sizes = [len(nodes[i].core.table) for i in live() if hasattr(nodes[i], "core")]
                reply(rid, stats=total, tables=sizes)
            elif op == "where":
                from dhtsignal.dht import records as _r

                held: dict[str, list[str]] = {}
                for name in req["names"]:
                    key = _r.data_key(name)
                    held[name] = [
                        nodes[i].core.id.hex()
                        for i in live()
                        if nodes[i].core.store.get(key, time.time())
                    ]
                ids = [nodes[i].core.id.hex() for i in live()]
                tables = {nodes[i].core.id.hex(): len(nodes[i].core.table) for i in live()}
                reply(rid, held=held, ids=ids, tables=tables)
            elif op == "addrs":
                reply(rid, addrs=[sys_impl.addr(nodes[i]) for i in live()])
            elif op == "put":
                src = nodes[req["node"]] if "node" in req else None
                sem = asyncio.Semaphore(req.get("concurrency", 20))

                async def one(name: str) -> bool:
                    async with sem:
                        node = src if src is not None else nodes[rng.choice(live())]
                        try:
                            async with asyncio.timeout(LOOKUP_TIMEOUT):
                                return bool(await sys_impl.put(node, name))
                        except (Exception, asyncio.CancelledError):
                            _reraise_if_cancelling()
                            return False

                oks = await asyncio.gather(*(one(n) for n in req["names"]))
                reply(rid, ok=sum(oks), total=len(oks))
            elif op == "get":
                sem = asyncio.Semaphore(req.get("concurrency", 20))

                async def fetch(name: str) -> tuple[float, bool]:
                    async with sem:
                        node = nodes[rng.choice(live())]
                        ms, ok = await timed_get(node, name)
                        if not ok and hasattr(node, "core"):
                            misses.append((name, len(node.core.table), node.stats["rejoin"]))
                        return (ms, ok)

                misses: list[tuple[str, int, int]] = []
                res = await asyncio.gather(*(fetch(n) for n in req["names"]))
                reply(rid, ms=[r[0] for r in res], ok=[r[1] for r in res], misses=misses)
            elif op == "lookloop":
                out: dict[str, list[Any]] = {"ms": [], "ok": []}
                end = time.monotonic() + req["seconds"]
                names = req["names"]
                while time.monotonic() < end:
                    name = rng.choice(names)
                    ms, ok = await timed_get(nodes[rng.choice(live())], name)
                    out["ms"].append(round(ms, 3))
                    out["ok"].append(ok)
                    await asyncio.sleep(max(0.0, req["interval"] - ms / 1000))
                reply(rid, **out)
            elif op == "quit":
                for n in nodes:
                    if n is not None:
                        with contextlib.suppress(Exception):
                            await sys_impl.stop(n, False)
                reply(rid, bye=True)
            else:
                reply(rid, error=f"unknown op {op}")
        except Exception as exc:  # reported to the coordinator, which fails loudly
            reply(rid, error=repr(exc))

    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        t = asyncio.create_task(handle(req))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        if req["op"] == "quit":
            await t
            break
    for t in list(tasks):
        t.cancel()


# -- coordinator -------------------------------------------------------------------------


class Worker:
    """One worker process and its pending requests."""

    def __init__(self, proc: asyncio.subprocess.Process, wid: int) -> None:
        self.proc = proc
        self.wid = wid
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                msg = json.loads(line)
                fut = self.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            progress(f"worker {self.wid}: unreadable reply: {exc!r}")
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"worker {self.wid} exited"))

    async def call(self, op: str, timeout: float = 600.0, **kw: Any) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, "id": self.next_id, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        msg = await asyncio.wait_for(fut, timeout)
        if "error" in msg:
            raise RuntimeError(f"worker {self.wid} {op}: {msg['error']}")
        return msg


async def _spawn(n: int, impl: str, a: argparse.Namespace) -> list[Worker]:
    workers = []
    for wid in range(n):
        args = [sys.executable, __file__, "--worker", "--impl", impl]
        if a.refresh is not None:
            args += ["--refresh", str(a.refresh)]
        if a.node_config:
            args += ["--node-config", a.node_config]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # a lookloop's reply is one line of every lookup
        )
        workers.append(Worker(proc, wid))
    return workers


async def _close(workers: list[Worker]) -> None:
    for w in workers:
        with contextlib.suppress(Exception):
            await w.call("quit", timeout=15)
    for w in workers:
        if w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.proc.pid, 9)
        await w.proc.wait()
        w.reader.cancel()


def _summary(ms: list[float], ok: list[bool]) -> dict[str, Any]:
    good = [m for m, o in zip(ms, ok, strict=True) if o]
    return {
        "lookups": len(ok),
        "found": sum(ok),
        "success": round(sum(ok) / len(ok), 5) if ok else None,
        "p50_ms": _pct(good, 0.5),
        "p99_ms": _pct(good, 0.99),
        "p99_all_ms": _pct(ms, 0.99),
    }


async def run_churn(a: argparse.Namespace, impl: str) -> dict[str, Any]:
    per = a.nodes // a.procs
    workers = await _spawn(a.procs, impl, a)
    try:
        seed_kw: dict[str, Any] = {"rcvbuf": a.seed_rcvbuf} if a.seed_rcvbuf else {}
        seed = (await workers[0].call("start", n=1, fixed=True, **seed_kw))["addrs"][0]
        joined = await asyncio.gather(
            *(w.call("start", n=per - (1 if w.wid == 0 else 0), boot=seed) for w in workers)
        )
        progress(f"{impl}: {sum(len(j['addrs']) for j in joined) + 1} nodes joined")
        names = [f"churn-{impl}-{os.getpid()}-{i}" for i in range(a.values)]
        owner = workers[0]
        put = await owner.call("put", names=names, node=0)
        progress(f"{impl}: {put['ok']}/{put['total']} values put")
        await asyncio.sleep(2.0)

        async def republish(stop: asyncio.Event) -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 60.0)
                if not stop.is_set():
                    await owner.call("put", names=names, node=0)

        stop = asyncio.Event()
        repub = asyncio.create_task(republish(stop))
        quiet = await asyncio.gather(
            *(
                w.call("lookloop", names=names, seconds=a.quiet, interval=a.interval)
                for w in workers
            )
        )
        progress(f"{impl}: quiet phase done")
        churn_s = a.minutes * 60.0
        loops = [
            asyncio.create_task(
                w.call("lookloop", names=names, seconds=churn_s, interval=a.interval)
            )
            for w in workers
        ]
        per_minute = max(1, a.nodes // 10)
        gap = 60.0 / per_minute
        began = time.monotonic()
        replaced = {"crash": 0, "leave": 0}
        k = 0
        stuck = 0
        while time.monotonic() - began < churn_s - gap / 2:
            w = workers[k % len(workers)]
            how = "crash" if k % 2 == 0 else "leave"
            try:
                addrs = (await workers[(k + 1) % len(workers)].call("addrs", 30))["addrs"]
                await w.call("replace", 60, how=how, boot=random.choice(addrs))
                replaced[how] += 1
            except TimeoutError:
                stuck += 1
                progress(f"{impl}: replacement {k} in worker {w.wid} took over 60 s")
            k += 1
            next_at = began + k * gap
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        churned = await asyncio.gather(*loops)
        stop.set()
        await repub
        progress(f"{impl}: churn phase done, replaced {replaced}")

        def merged(parts: list[dict[str, Any]]) -> tuple[list[float], list[bool]]:
            ms: list[float] = []
            ok: list[bool] = []
            for p in parts:
                ms += p["ms"]
                ok += p["ok"]
            return ms, ok

        return {
            "quiet": _summary(*merged(quiet)),
            "churn": _summary(*merged(churned)),
            "replaced": replaced,
            "replacements_over_60s": stuck,
        }
    finally:
        await _close(workers)


async def run_massjoin(a: argparse.Namespace) -> dict[str, Any]:
    per = a.nodes // a.procs
    workers = await _spawn(a.procs, "ours", a)
    try:
        seed_kw: dict[str, Any] = {"rcvbuf": a.seed_rcvbuf} if a.seed_rcvbuf else {}
        seed = (await workers[0].call("start", n=1, fixed=True, **seed_kw))["addrs"][0]
        began = time.monotonic()
        joined = await asyncio.gather(
            *(w.call("start", n=per - (1 if w.wid == 0 else 0), boot=seed) for w in workers)
        )
        join_s = time.monotonic() - began
        count = sum(len(j["addrs"]) for j in joined) + 1
        empty = sum(j.get("empty", 0) for j in joined)
        progress(f"massjoin: {count} nodes joined in {join_s:.1f} s, {empty} with an empty table")
        assert count == a.nodes, f"{a.nodes - count} nodes failed to start"
        await asyncio.sleep(a.join_wait)
        names = [f"mass-{os.getpid()}-{i}" for i in range(a.values)]
        share = [names[i :: len(workers)] for i in range(len(workers))]
        puts = await asyncio.gather(*(w.call("put", names=share[w.wid]) for w in workers))
        put_ok = sum(p["ok"] for p in puts)
        progress(f"massjoin: {put_ok}/{len(names)} put")

        async def gets() -> dict[str, Any]:
            # Each worker gets the values another worker put.
            res = await asyncio.gather(
                *(w.call("get", names=share[(w.wid + 1) % len(workers)]) for w in workers)
            )
            ms = [m for r in res for m in r["ms"]]
            ok = [o for r in res for o in r["ok"]]
            asked = [n for w in workers for n in share[(w.wid + 1) % len(workers)]]
            missed.update(n for n, o in zip(asked, ok, strict=True) if not o)
            for r in res:
                for name, table, rejoins in r.get("misses", []):
                    progress(f"miss {name}: getter's table {table}, its rejoins {rejoins}")
            return _summary(ms, ok)

        missed: set[str] = set()

        first = await gets()
        if os.environ.get("MASSJOIN_DIAG"):
            from dhtsignal.dht import records as _r

            parts = await asyncio.gather(*(w.call("where", names=names) for w in workers))
            ids = [int(x, 16) for p_ in parts for x in p_["ids"]]
            for name in sorted(missed) or names[:40]:
                held = [int(x, 16) for p_ in parts for x in p_["held"][name]]
                k = int.from_bytes(_r.data_key(name), "big")
                order = sorted(ids, key=lambda i: i ^ k)
                rank = {i: n for n, i in enumerate(order)}
                progress(f"diag {name}: holder ranks {sorted(rank[h] for h in held)[:12]}")
        progress(f"massjoin: found {first['found']}/{first['lookups']} right after")
        if missed:
            progress(f"massjoin: missed {sorted(missed)[:20]}")
        await asyncio.sleep(a.later)
        second = await gets()
        progress(f"massjoin: found {second['found']}/{second['lookups']} {a.later:g} s later")
        stats: dict[str, int] = {}
        tables: list[int] = []
        for part in await asyncio.gather(*(w.call("stats") for w in workers)):
            tables += part["tables"]
            for name, n in part["stats"].items():
                stats[name] = stats.get(name, 0) + n
        progress(f"massjoin: node counters {json.dumps(stats, sort_keys=True)}")
        sizes = [_pct(tables, q) for q in (0.1, 0.5, 0.9)]
        progress(f"massjoin: table sizes p10/p50/p90 {sizes}")
        return {
            "nodes": count,
            "join_s": round(join_s, 1),
            "alone_after_join": empty,
            "puts_ok": put_ok,
            "right_after": first,
            "later": second,
            "node_counters": stats,
            "table_sizes_p10_p50_p90": sizes,
        }
    finally:
        await _close(workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("churn", "massjoin"), default="churn")
    p.add_argument("--nodes", type=int)
    p.add_argument("--procs", type=int, default=10)
    p.add_argument("--minutes", type=float, default=5.0, help="churn phase")
    p.add_argument("--quiet", type=float, default=60.0, help="quiet phase, seconds")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between lookups")
    p.add_argument("--values", type=int)
    p.add_argument("--join-wait", type=float, default=2.0)
    p.add_argument("--later", type=float, default=30.0)
    p.add_argument(
        "--seed-rcvbuf", type=int, metavar="BYTES", help="massjoin: the seed's SO_RCVBUF"
    )
    p.add_argument("--systems", default="ours,stock", help="churn mode: ours,stock")
    p.add_argument(
        "--refresh", type=float, help="dhtsignal refresh interval and good-for bound, seconds"
    )
    p.add_argument(
        "--node-config", metavar="JSON", help='dhtsignal NodeConfig overrides, e.g. {"alpha": 4}'
    )
    p.add_argument("--quick", action="store_true", help="a scaled-down run")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        asyncio.run(_worker(a.impl, a.refresh, json.loads(a.node_config or "{}")))
        return 0
    if a.mode == "churn":
        a.nodes = a.nodes or 100
        a.values = a.values or 50
        if a.quick:
            a.minutes, a.quiet = min(a.minutes, 2.0), min(a.quiet, 30.0)
        out: dict[str, Any] = {"mode": "churn", "nodes": a.nodes, "procs": a.procs}
        out["minutes"], out["refresh"] = a.minutes, a.refresh
        out["node_config"] = a.node_config
        for impl in a.systems.split(","):
            out[impl] = asyncio.run(run_churn(a, impl))
            print(json.dumps({impl: out[impl]}), flush=True)
    else:
        a.nodes = a.nodes or 1000
        a.values = a.values or 1000
        if a.quick:
            a.later = min(a.later, 10.0)
        out = {"mode": "massjoin", **asyncio.run(run_massjoin(a))}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
