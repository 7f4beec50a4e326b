#!/usr/bin/env python3
"""200,000 mutated datagrams against a real node while a probe looks things up.

Prints (and with ``--json PATH`` writes) the datagrams sent, tracebacks (target's
``drop:internal`` plus event-loop exception handler calls; the target is 0),
probe lookups and failures (target 0), barriers lost and the target process's RSS
growth. See :mod:`dhtsignal.testing.fuzz`.

Usage::

    PYTHONPATH=. python bench/fuzz.py            # 200,000 datagrams
    PYTHONPATH=. python bench/fuzz.py --quick    # 20,000
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict

from dhtsignal.testing import fuzz


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20,000 datagrams")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    count = 20_000 if args.quick else args.count
    result = asyncio.run(fuzz.run(count, seed=args.seed))
    out = asdict(result)
    top = sorted(result.drops.items(), key=lambda kv: -kv[1])[:12]
    print(
        f"fuzz: {result.sent} datagrams in {result.seconds:.1f} s; tracebacks "
        f"{result.tracebacks}; probe lookups {result.lookups}, failed "
        f"{result.failed_lookups}; barriers lost {result.barriers_lost}; RSS growth "
        f"{result.rss_growth / 2**20:.1f} MiB"
    )
    print("top drops:", ", ".join(f"{k}={v}" for k, v in top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if result.tracebacks or result.failed_lookups:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
