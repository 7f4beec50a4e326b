"""``dhtsignal ping`` of a peer killed with SIGKILL, process start to exit, this tree beside
another, interleaved in one run; and what importing the ``ping`` command's modules costs.

Usage::

    .venv/bin/python bench/killed_ping.py [--base main] [--runs 10 | --quick] [--json PATH]

``--base`` is a commit (checked out into a temporary git worktree, removed afterwards) or
the path of a tree. One bootstrap node and one peer ``bob`` run from this tree on
127.0.0.1; bob is killed with SIGKILL (its presence stays in the DHT). Then each round
runs ``python -m dhtsignal ping bob`` once with each tree's ``dhtsignal`` (``PYTHONPATH``),
alternating which goes first, and times it from the process's creation to its exit; every
run must fail with exit status 1 saying "not responding". The import figures are
``python -X importtime -c 'import M'`` (the cumulative microseconds of the top-level
imports, less those of a bare ``python -c pass``), for ``dhtsignal`` and for the modules
``ping`` loads (``dhtsignal.cli``, ``config``, ``daemon``, ``dialing``), medians of
``--runs`` runs each. Figures are medians; ratios are this tree over the base.

``--bytecode cached`` (the default) lets every process keep its compiled modules in a
temporary cache, as an installed package has them; ``compiled`` writes none, so every
process compiles the trees' modules again (what ``PYTHONDONTWRITEBYTECODE=1`` in the
environment does to a source checkout).
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
import time
from pathlib import Path

from dhtsignal.testing.daemons import DaemonProcess

ROOT = Path(__file__).resolve().parent.parent
#: What the ``ping`` command imports before it dials.
PING_MODULES = "dhtsignal.cli, dhtsignal.config, dhtsignal.daemon, dhtsignal.dialing"
READY_TIMEOUT = 30.0


#: ``--bytecode cached``: where every process keeps its compiled modules (set in main()).
PYCACHE: Path | None = None


def _env(tree: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
    env.update(PYTHONPATH=str(tree), XDG_DATA_HOME=str(home), PYTHONUNBUFFERED="1")
    if PYCACHE is not None:  # as installed: bytecode compiled once, then read
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    else:  # every process compiles the tree's modules again (no __pycache__ written)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _ping(tree: Path, home: Path, entry: str) -> float:
    """Seconds from the creation of one ``ping bob`` process to its exit."""
    cmd = [sys.executable, "-m", "dhtsignal", "ping", "bob", "--bootstrap", entry]
    cmd += ["--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1", "--known-peers", "none"]
    began = time.perf_counter()
    res = subprocess.run(
        cmd, env=_env(tree, home), capture_output=True, text=True, timeout=30, cwd=tree
    )
    elapsed = time.perf_counter() - began
    if res.returncode != 1 or "not responding" not in res.stderr:
        raise SystemExit(f"{tree}: ping ended {res.returncode}: {res.stderr or res.stdout}")
    return elapsed


def _import_us(tree: Path, home: Path, statement: str) -> float:
    """Microseconds of the top-level imports ``statement`` adds to a bare interpreter."""

    def top(code: str) -> dict[str, int]:
        res = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            env=_env(tree, home),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tree,
            check=True,
        )
        out: dict[str, int] = {}
        for line in res.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            _, cumulative, name = line.split("|")
            if not name.startswith("  "):  # depth 0: " name"
                out[name.strip()] = int(cumulative)
        return out

    bare = top("pass")
    return float(sum(us for name, us in top(statement).items() if name not in bare))


def _worktree(rev: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="dhtsignal-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(where), rev], cwd=ROOT, check=True
    )
    return where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="main", help="a commit, or the path of a tree (main)")
    p.add_argument("--runs", type=int, default=10, help="pings (and imports) per tree, 1-50")
    p.add_argument("--quick", action="store_true", help="3 runs")
    p.add_argument(
        "--bytecode",
        choices=("cached", "compiled"),
        default="cached",
        help="cached: modules compiled once into a temporary cache, as an installed package "
        "has them (the default); compiled: no bytecode written, each process compiles the "
        "tree's modules again (PYTHONDONTWRITEBYTECODE)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 50:
        p.error("--runs 1 to 50")
    if args.quick:
        args.runs = 3
    global PYCACHE
    made = None
    base = Path(args.base)
    if not base.is_dir():
        base = made = _worktree(args.base)
    trees = {"base": base.resolve(), "this": ROOT}
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in trees}
    daemons: list[DaemonProcess] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.bytecode == "cached":
            PYCACHE = work / "pycache"
            for tree in trees.values():  # compile once, untimed
                _import_us(tree, work / "xdg", f"import {PING_MODULES}")
        env = _env(ROOT, work / "xdg")
        try:
            boot = DaemonProcess(
                ["bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(work / "b0")],
                work / "b0.err",
                env,
            )
            daemons.append(boot)
            entry = boot.ready(READY_TIMEOUT)["addr"]
            bob = DaemonProcess(
                [
                    *("peer", "--node-id", "bob", "--bootstrap", entry),
                    *("--listen", "127.0.0.1:0", "--data-dir", str(work / "bob")),
                    *("--ice-host", "127.0.0.1", "--presence-ttl", "600"),
                ],
                work / "bob.err",
                env,
            )
            daemons.append(bob)
            bob.ready(READY_TIMEOUT)
            bob.kill()  # SIGKILL: no sign-off, the presence stays
            for rnd in range(args.runs):
                order = ["base", "this"] if rnd % 2 == 0 else ["this", "base"]
                for side in order:
                    home = work / f"xdg-{side}"
                    figs = {
                        "killed ping s": _ping(trees[side], home, entry),
                        "import dhtsignal ms": _import_us(trees[side], home, "import dhtsignal")
                        / 1000,
                        "import ping's modules ms": _import_us(
                            trees[side], home, f"import {PING_MODULES}"
                        )
                        / 1000,
                    }
                    for k, v in figs.items():
                        samples[side].setdefault(k, []).append(v)
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in figs.items())
                    print(f"run {rnd + 1:>2} {side}: {shown}", flush=True)
        finally:
            for d in daemons:
                d.kill()
            if made is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(made)], cwd=ROOT)
                shutil.rmtree(made, ignore_errors=True)
    print(
        f"\nmedians of {args.runs} interleaved run(s); base = {args.base}; bytecode {args.bytecode}"
    )
    print(f"  {'figure':<26} {'base':>9} {'this':>9}  ratio")
    table: dict[str, dict[str, float]] = {}
    for k in samples["this"]:
        b, t = statistics.median(samples["base"][k]), statistics.median(samples["this"][k])
        table[k] = {"base": b, "this": t, "ratio": t / b}
        print(f"  {k:<26} {b:>9.4g} {t:>9.4g}  {t / b:.3f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"base": args.base, "bytecode": args.bytecode, "figures": table}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
