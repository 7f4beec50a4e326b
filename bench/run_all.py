#!/usr/bin/env python3
"""Run every benchmark in bench/, write bench/results/latest.json, print a summary table.

Each bench is a script ``bench/<name>.py`` that accepts ``--json PATH``. Known
benches get their own arguments (full and ``--quick``); any other script in
bench/ that accepts ``--json`` is run too, with ``--quick`` if its ``--help``
lists it. Every bench runs in its own process group with a time limit; on
timeout or interrupt that group (and only it) is killed.

Usage::

    python bench/run_all.py            # full runs (several minutes)
    python bench/run_all.py --quick    # shorter runs
    python bench/run_all.py --only putget,findnode_rps
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SKIP = {"run_all", "__init__", "conftest"}

#: name -> (full args, quick args, time limit full s, time limit quick s)
KNOWN: dict[str, tuple[list[str], list[str], float, float]] = {
    "findnode_rps": ([], ["--quick"], 600, 300),
    "putget": ([], ["--quick"], 900, 400),
    "sim_scale": (
        ["--nodes", "2000"],
        ["--nodes", "2000", "--gets", "200", "--stock", "200"],
        1800,
        900,
    ),
    "rendezvous": ([], ["--iterations", "5", "--warmup", "1", "--memory-sessions", "0"], 1200, 600),
}
ORDER = ["findnode_rps", "putget", "sim_scale", "rendezvous"]
DEFAULT_LIMIT = (1200.0, 600.0)


def _help(script: Path) -> str:
    try:
        r = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return ""
    return r.stdout + r.stderr


def _supported(args: list[str], help_text: str) -> list[str]:
    """Drop flags (and their values) that the script's --help does not mention."""
    out: list[str] = []
    i = 0
    while i < len(args):
        flag = args[i]
        has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if flag in help_text:
            out.append(flag)
            if has_value:
                out.append(args[i + 1])
        i += 2 if has_value else 1
    return out


def discover(only: set[str]) -> list[str]:
    names = [p.stem for p in HERE.glob("*.py") if p.stem not in SKIP]
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [n for n in names if not only or n in only]


def run_bench(name: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    script = HERE / f"{name}.py"
    help_text = _help(script)
    if "--json" not in help_text:
        return {"skipped": "does not accept --json"}
    full, quick_args, lim_full, lim_quick = KNOWN.get(name, ([], ["--quick"], *DEFAULT_LIMIT))
    args = _supported(quick_args if quick else full, help_text)
    limit = lim_quick if quick else lim_full
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    with contextlib.suppress(FileNotFoundError):
        out_json.unlink()
    cmd = [sys.executable, str(script), *args, *extra, "--json", str(out_json)]
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    timed_out = False
    try:
        while True:
            left = t0 + limit - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not r:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            buf = (buf + chunk)[-20000:]
        if not timed_out:
            proc.wait(timeout=max(1.0, t0 + limit - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the bench's own process group
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
        proc.stdout.close()
    tail = buf.decode(errors="replace").splitlines()[-40:]
    entry: dict[str, Any] = {
        "cmd": cmd[1:],
        "rc": proc.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "timed_out": timed_out,
    }
    if out_json.exists():
        try:
            entry["result"] = json.loads(out_json.read_text())
        except ValueError as exc:
            entry["error"] = f"unreadable JSON: {exc}"
    else:
        entry["error"] = "no JSON written"
        entry["output_tail"] = tail
    return entry


# -- summary -----------------------------------------------------------------------------


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k/s"


def summarize(name: str, entry: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(bench, metric, value) rows for the table."""
    res = entry.get("result")
    if res is None:
        why = entry.get("skipped") or entry.get("error") or f"rc {entry.get('rc')}"
        return [(name, "status", f"FAILED: {why}" if "skipped" not in entry else why)]
    rows: list[tuple[str, str, str]] = []
    if name == "findnode_rps":
        p = res["params"]
        rows.append((name, "load", f"{p['sockets']} source sockets x window {p['window']}"))
        for loop, s in res["summary"].items():
            r = s["rps"]
            rows.append(
                (
                    name,
                    f"{loop}: stock / ds_find_node / ds<-find_node",
                    f"{_k(r['stock/find_node'])} / {_k(r['dhtsignal/ds_find_node'])} "
                    f"({s['ratio_ds_find_node_vs_stock']:.2f}x) / "
                    f"{_k(r['dhtsignal/find_node'])} "
                    f"({s['ratio_ds_answering_find_node_vs_stock']:.2f}x)",
                )
            )
            c = s.get("server_us_per_reply")
            if c:
                rows.append(
                    (
                        name,
                        f"{loop}: server CPU us/reply stock / ds / ds<-find_node",
                        f"{c['stock/find_node']:.0f} / {c['dhtsignal/ds_find_node']:.0f} "
                        f"({s['cpu_ratio_ds_find_node_vs_stock']:.2f}x) / "
                        f"{c['dhtsignal/find_node']:.0f} "
                        f"({s['cpu_ratio_ds_answering_find_node_vs_stock']:.2f}x)",
                    )
                )
        echo = res.get("echo_ceiling", {})
        if echo:
            rows.append((name, "generator echo ceiling", _k(echo["rps"])))
    elif name == "putget":
        for sys_name, r in res["systems"].items():
            rows.append(
                (
                    name,
                    f"{sys_name} put / get p50 (p90) ms",
                    f"{r['put_ms_p50']:.2f} ({r['put_ms_p90']:.2f}) / "
                    f"{r['get_ms_p50']:.2f} ({r['get_ms_p90']:.2f})  found {r['gets_found']}/"
                    f"{r['ops']}",
                )
            )
        for sys_name, rr in res.get("ratios_vs_opendht", {}).items():
            rows.append(
                (
                    name,
                    f"{sys_name} / OpenDHT p50",
                    f"put {rr['put_p50']:.2f}x  get {rr['get_p50']:.2f}x",
                )
            )
    elif name == "sim_scale":
        lk, b, m = res.get("lookups", {}), res.get("build", {}), res.get("memory", {})
        rows.append((name, "nodes", str(res.get("nodes"))))
        if lk:
            rows.append(
                (
                    name,
                    "lookups found / hops median / latency p50",
                    f"{lk.get('success_rate', 0):.1%} / {lk.get('hops_median')} / "
                    f"{lk.get('latency_ms_p50', 0):.0f} ms (virtual)",
                )
            )
        if b:
            rows.append((name, "contacts mean", f"{b.get('contacts_mean', 0):.1f}"))
        if m:
            rows.append(
                (name, "memory per node ours / stock ratio", f"{m.get('ratio_full', 0):.2f}")
            )
    elif name == "rendezvous" and isinstance(res.get("ways"), dict):
        for way, w in res["ways"].items():
            t = w.get("total_ms") if isinstance(w, dict) else None
            if isinstance(t, dict) and "p50" in t:
                fails = len(w.get("failures", []))
                rows.append(
                    (
                        name,
                        f"{way} total p50 (p90) ms",
                        f"{t['p50']:.1f} ({t.get('p90', float('nan')):.1f})  n={t.get('n')} "
                        f"failures={fails}",
                    )
                )
        for pair, r in (res.get("ratios") or {}).items():
            if isinstance(r, dict) and "p50" in r:
                target = f"  target {r['target']}" if "target" in r else ""
                rows.append((name, f"{pair} p50 ratio", f"{r['p50']:.2f}x{target}"))
    else:
        rows.extend(_generic(name, res))
    return rows


def _generic(name: str, res: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if not isinstance(res, dict) or depth > 2:
        return rows
    for k, v in res.items():
        if len(rows) >= 12:
            break
        if k in ("config", "params", "environment", "host"):
            continue
        if isinstance(v, bool) or not isinstance(v, int | float | dict):
            continue
        if isinstance(v, dict):
            rows.extend(_generic(name, v, f"{prefix}{k}.", depth + 1)[: 12 - len(rows)])
        else:
            rows.append((name, f"{prefix}{k}", f"{v:.4g}" if isinstance(v, float) else str(v)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs of every bench")
    p.add_argument("--only", default="", help="comma-separated bench names")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    a = p.parse_args(argv)
    only = {x for x in a.only.split(",") if x}
    names = discover(only)
    started = time.time()
    doc: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "quick": a.quick,
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
        },
        "benches": {},
    }
    for name in names:
        doc["benches"][name] = run_bench(name, a.quick, [])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))
    doc["host"]["loadavg_end"] = list(os.getloadavg())
    doc["seconds"] = round(time.time() - started, 1)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    rows = [row for name in names for row in summarize(name, doc["benches"][name])]
    w1 = max([len(r[0]) for r in rows] + [5])
    w2 = max([len(r[1]) for r in rows] + [6])
    print(f"\n{'=' * 20} summary ({'quick' if a.quick else 'full'}, {doc['seconds']} s) -> {a.out}")
    print(f"{'bench':{w1}s}  {'metric':{w2}s}  value")
    for b, m, v in rows:
        print(f"{b:{w1}s}  {m:{w2}s}  {v}")
    la = doc["host"]
    print(
        f"host: {la['cpus']} CPUs, load average {la['loadavg_start'][0]:.1f} at start, "
        f"{la['loadavg_end'][0]:.1f} at end (other jobs make absolute figures noisy)"
    )
    failed = [n for n in names if "result" not in doc["benches"][n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
