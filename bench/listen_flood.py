#!/usr/bin/env python3
"""A ``ds_listen`` flood from thousands of ports of one host against a node in its own
process (issue 10): the node's RSS growth, the subscriptions it granted, and whether an
honest listen from another host is still granted.

The issue's baseline (per-port accounting, no global cap): 353,192 subscriptions granted
in 31 s, RSS 38 to 228 MB. Targets: RSS growth at most 32 MiB; the honest listen granted.

Usage::

    PYTHONPATH=. python bench/listen_flood.py                 # 350,000 from 4,000 ports
    PYTHONPATH=. python bench/listen_flood.py --quick         # 35,000 from 400 ports
    PYTHONPATH=. python bench/listen_flood.py --hosts 4000 --hosts-per-prefix 100
                                                  # 4,000 hosts in 40 /24s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

from dhtsignal.dht.params import DEFAULT_NETWORK
from dhtsignal.wire import codec

NET = DEFAULT_NETWORK
CHILD = """
import asyncio, os, sys
from dhtsignal.aio.node import DhtNode
async def main():
    n = DhtNode(os.urandom(20))
    host, port = await n.listen_udp("127.0.0.1", 0)
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await n.close()
asyncio.run(main())
"""


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sock(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.replies: dict[bytes, asyncio.Future[Any]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = codec.decode(data)
        except codec.MalformedDatagram:
            return
        if isinstance(msg, codec.Response):
            fut = self.replies.pop(msg.msg_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.result)

    def call(self, dst: tuple[str, int], name: str, args: list[Any]) -> asyncio.Future[Any]:
        assert self.transport is not None
        msg_id = os.urandom(codec.MSG_ID_BYTES)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.replies[msg_id] = fut
        self.transport.sendto(codec.encode_request(msg_id, name, args), dst)
        return fut


async def flood(
    count: int, ports: int, hosts: int, per_prefix: int, port: int, pid: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    dst = ("127.0.0.1", port)
    socks: list[_Sock] = []
    for i in range(ports):
        h = i % hosts  # host h: 127.5.(h // per_prefix).(h % per_prefix + 1)
        ip = f"127.5.{h // per_prefix}.{h % per_prefix + 1}"
        _, s = await loop.create_datagram_endpoint(_Sock, local_addr=(ip, 0))
        socks.append(s)
    _, barrier = await loop.create_datagram_endpoint(_Sock, local_addr=("127.0.4.1", 0))
    me = os.urandom(20)
    rss0 = _rss(pid)
    started = time.monotonic()
    granted = 0
    sent = 0
    batch = 100
    peak = rss0
    while sent < count:
        futs = []
        for i in range(min(batch, count - sent)):
            s = socks[(sent + i) % ports]
            futs.append(s.call(dst, "ds_listen", [NET, me, 1, os.urandom(20), 120]))
        sent += len(futs)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(barrier.call(dst, "ds_ping", [NET, me, 1]), 5.0)
        for f in futs:
            if f.done() and type(f.result()) in (int, float):
                granted += 1
            f.cancel()
        for s in socks:
            s.replies.clear()
        if sent % 10_000 == 0:
            peak = max(peak, _rss(pid))
    seconds = time.monotonic() - started
    peak = max(peak, _rss(pid))
    _, honest = await loop.create_datagram_endpoint(_Sock, local_addr=("127.0.6.1", 0))
    reply = await asyncio.wait_for(
        honest.call(dst, "ds_listen", [NET, os.urandom(20), 1, os.urandom(20), 60]), 5.0
    )
    for s in [*socks, barrier, honest]:
        assert s.transport is not None
        s.transport.close()
    return {
        "sent": sent,
        "ports": ports,
        "hosts": hosts,
        "prefixes": -(-hosts // per_prefix),
        "granted": granted,
        "seconds": round(seconds, 1),
        "rss_before_mib": round(rss0 / 2**20, 1),
        "rss_growth_mib": round((peak - rss0) / 2**20, 1),
        "honest_listen": reply,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=350_000)
    ap.add_argument("--ports", type=int, default=4_000)
    ap.add_argument("--hosts", type=int, default=1, help="spread the ports over this many hosts")
    ap.add_argument("--hosts-per-prefix", type=int, default=250)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    count, ports = (35_000, 400) if args.quick else (args.count, args.ports)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < ports + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, ports + 256), hard))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        out = asyncio.run(flood(count, ports, args.hosts, args.hosts_per_prefix, port, child.pid))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
