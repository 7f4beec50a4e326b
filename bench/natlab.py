#!/usr/bin/env python3
"""Dial-to-open across NATs in the namespace lab (root only), against plain aiortc.

For each NAT pair (``cone/cone`` with no configured server and again with TURN
configured, where the path must stay direct; ``symmetric/symmetric`` and
``cone/symmetric`` with coturn TURN through a shared secret) one lab is built
(:mod:`dhtsignal.testing.natlab`): four DHT bootstrap nodes and coturn on the public
network, alice and bob behind their NAT routers. Then, interleaved trial by trial:

``dhtsignal``
    ``dhtsignal ping bob --json --count 1`` run in alice's namespace against bob's peer
    daemon (client mode) in his; the figure is the ``setup_ms`` it reports: from
    ``connect()`` to the session open (resolve, signaling through the DHT, ICE, DTLS,
    SCTP, channel binding); the interpreter start is not counted.
``aiortc``
    The baseline: plain aiortc, one agent process in each namespace, the SDP handed
    over through the agents' pipes (no signaling cost at all), with the lab's STUN
    server (a DHT node, which answers STUN; coturn would answer the same) and, for
    the symmetric pairs, the same TURN server and credentials. The figure is from the
    caller's ``createOffer()`` to its data channel open.

Targets (issue 11): cone/cone p50 at most 1.2x plain aiortc; symmetric via TURN p50 at
most 700 ms. ``--trials`` (20) per pair.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECRET = "natlab-bench-secret"


async def _agent(role: str, servers: list[dict[str, Any]]) -> None:
    """The plain aiortc side: reads SDP lines on stdin, writes SDP/results on stdout."""
    from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

    config = RTCConfiguration(iceServers=[RTCIceServer(**s) for s in servers])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        msg = json.loads(line)
        pc = RTCPeerConnection(config)
        opened = asyncio.Event()
        if role == "offer":
            began = time.perf_counter()
            channel = pc.createDataChannel("data")
            channel.on("open", opened.set)
            await pc.setLocalDescription(await pc.createOffer())
            print(json.dumps({"sdp": pc.localDescription.sdp}), flush=True)
            answer = json.loads((await reader.readline()).decode())
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            try:
                await asyncio.wait_for(opened.wait(), 20)
                result = {"ms": (time.perf_counter() - began) * 1000}
            except TimeoutError:
                result = {"ms": None}
            print(json.dumps(result), flush=True)
        else:
            pc.on("datachannel", lambda ch, opened=opened: opened.set())
            await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            print(json.dumps({"sdp": pc.localDescription.sdp}), flush=True)
            await asyncio.wait_for(opened.wait(), 20)
        await asyncio.sleep(0.2)  # let the last DTLS/SCTP packets through before closing
        await pc.close()


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("agent exited")
    out: dict[str, Any] = json.loads(line)
    return out


def _send(proc: subprocess.Popen[str], obj: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(obj) + "\n")
    proc.stdin.flush()


def run_pair(nat_a: str, nat_b: str, turn: bool, trials: int, workdir: Path) -> dict[str, Any]:
    from dhtsignal.testing.natlab import PUBLIC, Lab

    with Lab(workdir, nat_a, nat_b, turn_secret=SECRET if turn else None) as lab:
        boot = [a for b in lab.bootstrap[:2] for a in ("--bootstrap", b)]
        extra = ["--ice-server", lab.turn_url, "--ice-secret", SECRET] if turn else []
        lab.start(
            "b", "bob", "peer", "--node-id", "bob", "--client-mode",
            "--data-dir", str(workdir / "bob"), *boot, *extra,
        ).ready()  # fmt: skip
        servers: list[dict[str, Any]] = [{"urls": f"stun:{PUBLIC[1]}:4000"}]
        if turn:
            from dhtsignal.ice import rest_credential

            user, password = rest_credential(SECRET, "bench", time.time())
            servers.append({"urls": lab.turn_url, "username": user, "credential": password})
        agents = {}
        for side, role in (("a", "offer"), ("b", "answer")):
            argv = [
                "ip", "netns", "exec", lab.ns(side), sys.executable, __file__,
                "--agent", role, "--servers", json.dumps(servers),
            ]  # fmt: skip
            agents[role] = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=lab.env
            )
        ours: list[float] = []
        plain: list[float] = []
        paths: dict[str, int] = {}
        failures = {"dhtsignal": 0, "aiortc": 0}
        try:
            for _ in range(trials):
                done = lab.run(
                    "a", "ping", "bob", "--json", "--count", "1", "--known-peers", "none",
                    *boot, *extra,
                )  # fmt: skip
                if done.returncode == 0:
                    out = json.loads(done.stdout)
                    ours.append(out["setup_ms"])
                    key = f"{out['path']['local']}->{out['path']['remote']}"
                    paths[key] = paths.get(key, 0) + 1
                else:
                    failures["dhtsignal"] += 1
                    print("dhtsignal failed:", done.stderr.strip()[-300:], file=sys.stderr)
                _send(agents["offer"], {"go": 1})
                offer = _line(agents["offer"])
                _send(agents["answer"], offer)
                _send(agents["offer"], _line(agents["answer"]))
                result = _line(agents["offer"])
                if result["ms"] is None:
                    failures["aiortc"] += 1
                else:
                    plain.append(result["ms"])
        finally:
            for proc in agents.values():
                if proc.poll() is None:
                    os.kill(proc.pid, 9)
                proc.wait(10)
        return {
            "pair": f"{nat_a}/{nat_b}" + (" +TURN" if turn else ""),
            "dhtsignal_p50_ms": round(statistics.median(ours), 1) if ours else None,
            "aiortc_p50_ms": round(statistics.median(plain), 1) if plain else None,
            "ratio": round(statistics.median(ours) / statistics.median(plain), 2)
            if ours and plain
            else None,
            "opened": f"{len(ours)}/{trials}",
            "aiortc_opened": f"{len(plain)}/{trials}",
            "paths": paths,
            "failures": failures,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="5 trials per pair")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH")
    parser.add_argument("--agent", choices=["offer", "answer"], help=argparse.SUPPRESS)
    parser.add_argument("--servers", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        asyncio.run(_agent(args.agent, json.loads(args.servers)))
        return
    from dhtsignal.testing.natlab import LabUnavailable, check_available

    try:
        check_available()
    except LabUnavailable as exc:
        print(f"bench/natlab.py: skipped: {exc}")
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": str(exc)}))
        return
    trials = 5 if args.quick else args.trials
    rows = []
    for nat_a, nat_b, turn in (
        ("cone", "cone", False),
        ("cone", "cone", True),
        ("symmetric", "symmetric", True),
        ("cone", "symmetric", True),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            row = run_pair(nat_a, nat_b, turn, trials, Path(tmp))
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"trials": trials, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
