"""Side by side: the same benchmarks on this tree and on another commit, interleaved in one run.

Usage::

    .venv/bin/python bench/compare.py --base HEAD~3 [--rounds 3] [--benches findnode,putget]

``--base`` is a commit (checked out into a temporary git worktree, removed afterwards) or
the path of a tree. Each round runs every benchmark once in each tree, alternating which
goes first, each in a process of its own whose ``dhtsignal`` is that tree's
(``PYTHONPATH``); the figures are the medians over rounds, and each row's ratio is this
tree over the base (below 1.00x is better for times and memory, above for rates).

The benchmarks and the figures read from their ``--json`` output:

* ``findnode``: ``bench/findnode_rps.py`` FIND_NODE replies/s (ds_find_node), asyncio
  and uvloop;
* ``putget``: ``bench/putget.py`` put and get p50 at 100 nodes, both loops;
* ``sim``: ``bench/sim_scale.py`` memory per idle node (10,000 nodes by default);
* ``rendezvous``: ``bench/rendezvous.py`` connect() to both channels open, p50; each
  side's ``dtls_sctp`` phase p50 (which includes the channel-binding check since it was
  added) and, in trees that measure it, one control-channel round trip p50.
* ``simchurn``: ``bench/sim_churn.py`` (this tree's script on both sides) lookup success,
  p50/p99 virtual lookup time and hops under churn, ``--sim-nodes`` nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Bench:
    """One benchmark script and the figures read from its JSON."""

    script: str
    args: Callable[[argparse.Namespace], list[str]]
    figures: Callable[[dict[str, Any]], dict[str, float]]
    timeout: float
    ours: bool = False
    """Run this tree's script on both sides (the base has no such script; the script
    then only uses what the base offers)."""


def _dig(doc: Any, *path: str) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def _findnode(doc: dict[str, Any]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for case in doc["cases"]:
        if case["impl"] == "dhtsignal" and case["rpc"] == "ds_find_node":
            out.setdefault(f"FIND_NODE replies/s {case['loop']}", []).append(case["rps"])
    return {k: statistics.median(v) for k, v in out.items()}


def _putget(doc: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for system, res in doc["systems"].items():
        loop = system.removeprefix("dhtsignal-")
        out[f"put p50 ms {loop}"] = res["put_ms_p50"]
        out[f"get p50 ms {loop}"] = res["get_ms_p50"]
    return out


def _sim(doc: dict[str, Any]) -> dict[str, float]:
    return {"KiB per idle node (sim)": _dig(doc, "memory", "ours_bytes") / 1024}


def _simchurn(doc: dict[str, Any]) -> dict[str, float]:
    return {
        "churn lookup success (sim)": doc["success"],
        "churn lookup p50 ms (sim)": doc["lookup_ms_p50"],
        "churn lookup p99 ms (sim)": doc["lookup_ms_p99"],
        "churn hops p50 (sim)": doc["hops_p50"],
        "churn hops p99 (sim)": doc["hops_p99"],
    }


def _rendezvous(doc: dict[str, Any]) -> dict[str, float]:
    ways = doc["ways"]
    out = {"rendezvous p50 ms": ways["dhtsignal"]["total_ms"]["p50"]}
    phases = ways["dhtsignal"].get("phases_ms", {})
    for side in ("caller", "callee"):
        if "dtls_sctp" in phases.get(side, {}):
            out[f"dtls_sctp(+bind) p50 ms {side}"] = phases[side]["dtls_sctp"]["p50"]
    if "ctl_rtt_ms" in ways["dhtsignal"]:  # a tree that measures it (not before the binding)
        out["ctl round trip p50 ms"] = ways["dhtsignal"]["ctl_rtt_ms"]["p50"]
    if "relay" in ways:
        out["rendezvous p50 / relay p50"] = (
            out["rendezvous p50 ms"] / ways["relay"]["total_ms"]["p50"]
        )
    return out


BENCHES: dict[str, Bench] = {
    "findnode": Bench(
        "findnode_rps.py",
        lambda a: ["--rounds", "1", *(["--quick"] if a.quick else [])],
        _findnode,
        600,
    ),
    "putget": Bench(
        "putget.py",
        lambda a: [
            "--systems",
            "dhtsignal-asyncio,dhtsignal-uvloop",
            "--rounds",
            "1",
            "--ops",
            "100" if a.quick else "300",
        ],
        _putget,
        600,
    ),
    "sim": Bench(
        "sim_scale.py",
        lambda a: ["--nodes", str(a.sim_nodes), "--seed", "1", "--stock", "10"],
        _sim,
        1800,
    ),
    "simchurn": Bench(
        "sim_churn.py",
        lambda a: (
            ["--nodes", str(a.sim_nodes), "--seed", "1"]
            + (["--duration", "900", "--lookups", "300"] if a.quick else [])
        ),
        _simchurn,
        7200,
        ours=True,
    ),
    "rendezvous": Bench(
        "rendezvous.py",
        lambda a: ["--ways", "relay,dhtsignal", "--iterations", "10" if a.quick else "30"],
        _rendezvous,
        900,
    ),
}
#: Figures where a larger number is better (the others are times and sizes).
_HIGHER_IS_BETTER = ("replies/s", "success")


def _run_one(tree: Path, bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        script = (ROOT if bench.ours else tree) / "bench" / bench.script
        cmd = [sys.executable, str(script), *bench.args(args)]
        cmd += ["--json", str(out)]
        env = dict(os.environ, PYTHONPATH=str(tree))
        proc = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=bench.timeout
        )
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise SystemExit(f"{' '.join(cmd)} in {tree} failed ({proc.returncode}):\n{tail}")
        return bench.figures(json.loads(out.read_text()))


def _worktree(rev: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="dhtsignal-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(where), rev], cwd=ROOT, check=True
    )
    return where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="a commit, or the path of a tree")
    p.add_argument("--rounds", type=int, default=3, help="rounds (1 to 20)")
    p.add_argument("--benches", default="findnode,putget,sim,rendezvous")
    p.add_argument("--sim-nodes", type=int, default=10_000)
    p.add_argument("--quick", action="store_true", help="shorter runs of each benchmark")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    names = [b for b in args.benches.split(",") if b]
    unknown = [b for b in names if b not in BENCHES]
    if unknown or not 1 <= args.rounds <= 20:
        p.error(f"--benches from {', '.join(BENCHES)}; --rounds 1 to 20 (unknown: {unknown})")
    made = None
    base = Path(args.base)
    if not base.is_dir():
        base = made = _worktree(args.base)
    trees = {"base": base.resolve(), "this": ROOT}
    samples: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    try:
        for rnd in range(args.rounds):
            order = ["base", "this"] if rnd % 2 == 0 else ["this", "base"]
            for name in names:
                for side in order:
                    figs = _run_one(trees[side], BENCHES[name], args)
                    for k, v in figs.items():
                        samples[side].setdefault(k, []).append(v)
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in figs.items())
                    print(f"round {rnd + 1} {name:<10} {side}: {shown}", flush=True)
    finally:
        if made is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(made)], cwd=ROOT)
            shutil.rmtree(made, ignore_errors=True)
    print(f"\nmedians of {args.rounds} interleaved round(s); base = {args.base}")
    print(f"  {'figure':<32} {'base':>10} {'this':>10}  ratio")
    table: dict[str, dict[str, float]] = {}
    for k in samples["this"]:
        if k not in samples["base"]:  # measured by this tree only
            t = statistics.median(samples["this"][k])
            print(f"  {k:<32} {'-':>10} {t:>10.4g}  (this tree only)")
            continue
        b, t = statistics.median(samples["base"][k]), statistics.median(samples["this"][k])
        ratio = t / b
        better = ratio >= 1 if any(h in k for h in _HIGHER_IS_BETTER) else ratio <= 1
        within = abs(ratio - 1) <= 0.05
        verdict = "better" if better else ("within 5%" if within else "WORSE by more than 5%")
        table[k] = {"base": b, "this": t, "ratio": ratio}
        print(f"  {k:<32} {b:>10.4g} {t:>10.4g}  {ratio:.3f}x  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base": args.base, "figures": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
