"""Presence lookups of 10 peers while 15 of 50 DHT nodes are killed (issue 9's proof).

50 ``dhtsignal bootstrap`` processes (one node each, own data directory) and 10
``dhtsignal peer`` processes on 127.0.0.1, all with a shortened ``--refresh-interval``.
This process looks up the presence of every peer, round after round, as ``dhtsignal
lookup`` does (a client node and ``presence.resolve``): a *warm* client that stays
joined, and a *fresh* client per round. Quiet figures first; then 15 DHT nodes (never
a peer, and unless ``--kill-any`` never the first node, which clients join through) get
SIGKILL; lookups right
after, and after one refresh interval. Reports success and p50/p99 per phase, and the
p50 after one refresh interval over the quiet p50 (the issue's target: 100 % success,
ratio at most 2). See :mod:`dhtsignal.testing.presence_churn`.

Usage::

    .venv/bin/python bench/presence_churn.py [--refresh 5] [--kill-any] [--json out.json]

Every process is killed by PID at the end, also on failure; data directories go to a
temporary directory. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from dhtsignal.testing.presence_churn import PresenceChurnConfig, run_presence_churn


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    d = PresenceChurnConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=d.nodes, help="DHT node processes")
    p.add_argument("--peers", type=int, default=d.peers, help="peer processes")
    p.add_argument("--kill", type=int, default=d.kill, help="DHT nodes killed with SIGKILL")
    p.add_argument("--refresh", type=float, default=d.refresh, help="refresh interval, s")
    p.add_argument("--rounds", type=int, default=d.rounds, help="warm rounds per phase")
    p.add_argument("--fresh-rounds", type=int, default=d.fresh_rounds)
    p.add_argument("--seed", type=int, default=d.seed, help="choice of the nodes killed")
    p.add_argument(
        "--kill-any",
        action="store_true",
        help="draw the nodes killed from all of them, the first included "
        "(clients then join through 3 random nodes, peers through 2)",
    )
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    if not 0 <= a.kill < a.nodes:
        p.error("--kill must be below --nodes")
    cfg = PresenceChurnConfig(
        nodes=a.nodes,
        peers=a.peers,
        kill=a.kill,
        refresh=a.refresh,
        rounds=a.rounds,
        fresh_rounds=a.fresh_rounds,
        seed=a.seed,
        spare_entry=not a.kill_any,
    )
    with tempfile.TemporaryDirectory(prefix="presence-churn-") as tmp:
        report = run_presence_churn(cfg, Path(tmp), progress)
    out = {"bench": "presence_churn", **report.summary()}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
