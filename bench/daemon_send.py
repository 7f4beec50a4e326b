#!/usr/bin/env python3
"""``send`` through a running daemon's open session against today's one-shot ``send``.

Both are whole ``dhtsignal send bob TEXT`` processes, process start included, on
127.0.0.1: a bootstrap node and two peer daemons, alice and bob, run for the whole bench.

- *daemon*: ``send bob TEXT --daemon ALICE_DIR``: alice's daemon already holds a session
  with bob (opened by one warm-up send), so the command connects to the local socket,
  sends, and waits for bob's acknowledgement.
- *one-shot* (the baseline): ``send bob TEXT --bootstrap ENTRY``: a fresh node with a
  throwaway key joins the DHT, resolves bob, signals, runs ICE and DTLS, sends, waits for
  the acknowledgement, and leaves.

For scale, ``dhtsignal --version`` (interpreter start, imports, argument parser) is
timed too: the floor every command pays.

The kinds alternate run by run in one process so that they share the machine's
noise. Prints p50/p90 of each and the ratio of the p50s; ``--json PATH`` writes them.

Usage::

    python bench/daemon_send.py            # 30 runs of each
    python bench/daemon_send.py --runs 10  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dhtsignal.testing.daemons import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
RUN_TIMEOUT = 30.0


def _timed(args: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "dhtsignal", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - began
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed: {res.stderr.strip()}")
    return elapsed


def _summary(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=10)
    return {
        "p50_ms": round(statistics.median(xs) * 1000, 1),
        "p90_ms": round(q[8] * 1000, 1),
        "min_ms": round(min(xs) * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="runs of each kind (default 30)")
    ap.add_argument("--quick", action="store_true", help="10 runs of each")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    runs = 10 if a.quick else a.runs

    with tempfile.TemporaryDirectory(prefix="dhtsignal-bench-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
        env.update(XDG_DATA_HOME=str(work / "xdg"), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        daemons: list[DaemonProcess] = []
        try:
            b0 = DaemonProcess(
                ["bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(work / "b0")],
                work / "b0.err",
                env,
            )
            daemons.append(b0)
            entry = b0.ready(READY_TIMEOUT)["addr"]
            for name in ("alice", "bob"):
                d = DaemonProcess(
                    [
                        *("peer", "--node-id", name, "--bootstrap", entry),
                        *("--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1"),
                        *("--data-dir", str(work / name)),
                    ],
                    work / f"{name}.err",
                    env,
                )
                daemons.append(d)
            for d in daemons[1:]:
                d.ready(READY_TIMEOUT)
            through = ["send", "bob", "hello", "--daemon", str(work / "alice")]
            oneshot = [
                *("send", "bob", "hello", "--bootstrap", entry, "--listen", "127.0.0.1:0"),
                *("--ice-host", "127.0.0.1", "--known-peers", "none"),
            ]
            floor = ["--version"]
            _timed(through, env)  # warm-up: opens alice's session with bob
            _timed(oneshot, env)
            times: dict[str, list[float]] = {"daemon": [], "oneshot": [], "floor": []}
            for _ in range(runs):
                times["daemon"].append(_timed(through, env))
                times["oneshot"].append(_timed(oneshot, env))
                times["floor"].append(_timed(floor, env))
        finally:
            for d in reversed(daemons):
                d.stop()

    result: dict[str, Any] = {
        "bench": "daemon_send",
        "runs": runs,
        "daemon": _summary(times["daemon"]),
        "oneshot": _summary(times["oneshot"]),
        "process_floor": _summary(times["floor"]),
    }
    result["p50_ratio_oneshot_over_daemon"] = round(
        result["oneshot"]["p50_ms"] / result["daemon"]["p50_ms"], 2
    )
    print(f"send through the daemon's open session: {result['daemon']}")
    print(f"one-shot send (fresh node, join, dial):  {result['oneshot']}")
    print(f"process floor (dhtsignal --version):    {result['process_floor']}")
    print(f"p50 one-shot / p50 daemon = {result['p50_ratio_oneshot_over_daemon']}x ({runs} runs)")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
