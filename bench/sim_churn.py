"""Churn in the simulator: lookup success, time and hops while nodes come and go.

Builds ``--nodes`` sans-I/O nodes on a virtual clock (:mod:`dhtsignal.testing.simnet`)
and runs the churn model of :mod:`dhtsignal.testing.churn` for ``--duration`` virtual
seconds: exponential session lifetimes with half the nodes replaced per simulated hour,
half of the departures crashes and half clean leaves, ``--lookups`` value lookups spread
over the run. Reports success and p50/p99 lookup time (virtual ms) and hops.

The churn model is loaded from this script's own tree, so that with ``PYTHONPATH``
pointing at an older tree (``bench/compare.py --base ea590bd --benches simchurn``) the
same model runs against that tree's node; there, a clean leave is a silent stop (the
older node has no ``ds_leave``).

Usage::

    .venv/bin/python bench/sim_churn.py --nodes 10000 --duration 3600 --json out.json

Progress goes to stderr, the report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

from dhtsignal.testing import simnet

HERE = Path(__file__).resolve().parent.parent


def _churn_module() -> ModuleType:
    path = HERE / "dhtsignal" / "testing" / "churn.py"
    spec = importlib.util.spec_from_file_location("_bench_churn_model", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--duration", type=float, default=3600.0, help="virtual seconds")
    p.add_argument("--lookups", type=int, default=1000)
    p.add_argument("--values", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    churn = _churn_module()
    gc.set_threshold(*simnet.SIM_GC_THRESHOLD)
    began = time.monotonic()
    net = simnet.SimNetwork.build(
        args.nodes,
        simnet.SimConfig(seed=args.seed),
        progress=lambda d, n: (
            print(f"joined {d}/{n}", file=sys.stderr, flush=True)
            if d % 1000 < 50 or d == n
            else None
        ),
    )
    built = time.monotonic() - began
    print(f"built {args.nodes} nodes in {built:.0f} s", file=sys.stderr, flush=True)
    cfg = churn.ChurnConfig(
        duration=args.duration, lookups=args.lookups, values=args.values, seed=args.seed
    )
    report = churn.run_churn(net, cfg)
    out = {
        "nodes": args.nodes,
        "duration": args.duration,
        "has_leave": hasattr(net, "leave"),
        "wall_seconds": round(time.monotonic() - began, 1),
        **report.summary(),
    }
    net.close()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
