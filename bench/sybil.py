#!/usr/bin/env python3
"""Sybil attacks on names in the simulator (issue 10): attacker size in /24 prefixes
against the fraction of trials in which an unpinned reader resolves a claimed label to
the attacker's key or the owner's first claim is blocked.

Runs the defended configuration (one place per prefix among a lookup's closest, 33
storing nodes per name) side by side with today's lookups (no diversity limit, 8
storing nodes per name) on a network of honest nodes, each in its own /24. See
:mod:`dhtsignal.testing.sybil` for the attacker model. Target: the smallest attacker
that wins half of the trials holds more than 16 prefixes.

Usage::

    PYTHONPATH=. python bench/sybil.py                  # 10,000 honest nodes, 100 trials
    PYTHONPATH=. python bench/sybil.py --quick          # 2,000 nodes, 20 trials
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from dhtsignal.testing import sybil


def curve(
    name: str,
    cfg: Any,
    honest: int,
    trials: int,
    sizes: list[int],
    seed: int,
    per_prefix: int,
) -> dict[str, Any]:
    started = time.monotonic()
    net = sybil.network(honest, cfg, seed=seed)
    built = time.monotonic() - started
    rows = []
    for p in sizes:
        outcomes = [net.trial(p, per_prefix) for _ in range(trials)]
        row = {
            "prefixes": p,
            "won": sum(o.attacker_won for o in outcomes) / trials,
            "blocked": sum(o.blocked for o in outcomes) / trials,
            "taken": sum(o.taken for o in outcomes) / trials,
            "unresolved": sum(o.unresolved for o in outcomes) / trials,
        }
        rows.append(row)
        print(
            f"{name:9} prefixes={p:3}  attacker won {row['won']:.2f} (blocked "
            f"{row['blocked']:.2f}, taken {row['taken']:.2f})",
            flush=True,
        )
    smallest = next((r["prefixes"] for r in rows if r["won"] >= 0.5), None)
    return {
        "config": name,
        "honest": honest,
        "trials": trials,
        "nodes_per_prefix": per_prefix,
        "build_seconds": round(built, 1),
        "rows": rows,
        "smallest_winning_half": smallest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--honest", type=int, default=10_000)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-prefix", type=int, default=2, help="attacker nodes per /24")
    ap.add_argument("--sizes", default="1,4,8,12,14,16,17,18,20,24", help="attacker /24s")
    ap.add_argument("--defended-only", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # each blocked-or-kept put logs a warning
    honest, trials = (2_000, 20) if args.quick else (args.honest, args.trials)
    sizes = [int(x) for x in args.sizes.split(",")]
    out = []
    if not args.defended_only:
        # Without diversity limits more nodes per prefix pay: the attacker uses 8.
        out.append(curve("baseline", sybil.BASELINE, honest, trials, [1, 2, 4], args.seed, 8))
    out.append(curve("defended", sybil.DEFENDED, honest, trials, sizes, args.seed, args.per_prefix))
    for c in out:
        print(
            f"{c['config']}: smallest attacker winning half the trials: "
            f"{c['smallest_winning_half']} prefixes"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
