"""The daemons' local API, metrics and room events, as separate OS processes on 127.0.0.1.

One module-scoped network: a bootstrap node (with ``--metrics``) and two peer daemons,
alice and bob in room ``lab`` (bob with ``--metrics``). Client commands talk to the
daemons through ``--daemon DATA_DIR``. Processes are started and killed by PID through
:class:`test_cli.Launcher`; tests wait for lines with timeouts, never for a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import LOOPBACK_RTC, Launcher, Proc

from dhtsignal.api import MAX_LINE, SOCKET_FILE
from dhtsignal.identity import self_certifying_id

WATCH_LEAVE_LIMIT = 2.0


@dataclass
class Net:
    lau: Launcher
    entry: str
    dirs: dict[str, Path]
    procs: dict[str, Proc]
    metrics: dict[str, str]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    lau = Launcher(tmp_path_factory.mktemp("api"))
    try:
        dirs = {n: lau.workdir / n for n in ("b0", "alice", "bob")}
        b0 = lau.start(
            "b0",
            *("bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(dirs["b0"])),
            *("--metrics", "127.0.0.1:0"),
        )
        ready = b0.ready()
        entry = ready["addr"]
        metrics = {"b0": ready["metrics"]}
        procs = {"b0": b0}
        for name in ("alice", "bob"):
            extra = ("--metrics", "127.0.0.1:0") if name == "bob" else ()
            procs[name] = lau.start(
                name,
                *("peer", "--node-id", name, "--bootstrap", entry, "--room", "lab"),
                *("--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1"),
                *("--data-dir", str(dirs[name]), *extra),
            )
        for name in ("alice", "bob"):
            r = procs[name].ready()
            if name == "bob":
                metrics["bob"] = r["metrics"]
        yield Net(lau, entry, dirs, procs, metrics)
    finally:
        lau.close()


def _status(net: Net, name: str) -> dict[str, Any]:
    res = net.lau.run("status", "--daemon", str(net.dirs[name]), "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert isinstance(st, dict)
    return st


def _wait_subscribers(net: Net, name: str, n: int, timeout: float = 10.0) -> None:
    """Until ``name``'s daemon counts ``n`` event subscribers (bounded in count and time)."""
    deadline = time.monotonic() + timeout
    for _ in range(100):
        api = _status(net, name)["api"]
        assert isinstance(api, dict)
        if api["subscribers"] >= n:
            return
        if time.monotonic() > deadline:
            break
    pytest.fail(f"{name}: fewer than {n} subscribers after {timeout} s")


def _message_from(sender: str, text: str) -> Callable[[str], bool]:
    return lambda line: line == f"message from {sender}: {text}"


def test_send_and_answer_through_two_daemons(net: Net) -> None:
    alice, bob = str(net.dirs["alice"]), str(net.dirs["bob"])
    bob_recv = net.lau.start("bob-recv", "recv", "--daemon", bob, "--json")
    alice_recv = net.lau.start("alice-recv", "recv", "--daemon", alice)
    _wait_subscribers(net, "bob", 1)
    _wait_subscribers(net, "alice", 1)

    res = net.lau.run("send", "bob", "hello bob", "--daemon", alice)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "delivered to bob"
    # bob's daemon prints it under alice's node ID (not a throwaway key) ...
    net.procs["bob"].line_matching(_message_from("alice", "hello bob"), 5.0)
    # ... and streams it to the local program reading it.
    ev = json.loads(bob_recv.line_matching(lambda ln: "hello bob" in ln, 5.0))
    assert ev["event"] == "message" and ev["from"] == "alice" and ev["text"] == "hello bob"

    # bob answers through his daemon, on the session alice opened.
    res = net.lau.run("send", "alice", "hello alice", "--daemon", bob)
    assert res.returncode == 0, res.stderr
    line = alice_recv.line_matching(lambda ln: "hello alice" in ln, 5.0)
    assert line == "message from bob: hello alice"
    net.procs["alice"].line_matching(_message_from("bob", "hello alice"), 5.0)
    sessions = _status(net, "bob")["sessions"]
    assert isinstance(sessions, dict) and sessions["open"] == 1  # reused, not a second dial


def test_chat_through_daemons_both_ways(net: Net) -> None:
    alice_recv = net.lau.start("alice-recv2", "recv", "--daemon", str(net.dirs["alice"]))
    _wait_subscribers(net, "alice", 1)
    res = net.lau.run("chat", "alice", "--daemon", str(net.dirs["bob"]), input="typed by bob\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("connected to alice")
    alice_recv.line_matching(_message_from("bob", "typed by bob"), 5.0)


def test_status_of_the_daemons(net: Net) -> None:
    st = _status(net, "alice")
    assert st["kind"] == "peer" and st["node_id"] == "alice"
    assert isinstance(st["routing_id"], str) and len(st["routing_id"]) == 40
    assert isinstance(st["routing_contacts"], int) and st["routing_contacts"] >= 1
    assert set(st) >= {"seen_as", "records", "record_bytes", "listeners", "sessions", "dropped"}
    assert set(st["sessions"]) == {"open", "dialing", "answering"}
    b0 = _status(net, "b0")
    assert b0["kind"] == "bootstrap" and b0["node_id"] is None
    assert isinstance(b0["records"], int) and b0["records"] >= 4  # claims, presence, rooms
    assert isinstance(b0["listeners"], int) and b0["listeners"] >= 2  # the peers' inboxes
    text = net.lau.run("status", "--daemon", str(net.dirs["b0"]))
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("kind        bootstrap") and "contacts" in text.stdout


def test_queries_through_a_daemon_need_no_bootstrap(net: Net) -> None:
    b0 = str(net.dirs["b0"])
    peers = net.lau.run("peers", "--room", "lab", "--json", "--daemon", b0)
    assert peers.returncode == 0, peers.stderr
    assert sorted(p["node_id"] for p in json.loads(peers.stdout)) == ["alice", "bob"]
    env_daemon = {**net.lau.env, "DHTSIGNAL_DAEMON": str(net.dirs["alice"])}
    lookup = subprocess.run(
        [sys.executable, "-m", "dhtsignal", "lookup", "bob", "--json"],
        capture_output=True,
        text=True,
        env=env_daemon,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert lookup.returncode == 0, lookup.stderr
    assert json.loads(lookup.stdout)["node_id"] == "bob"
    alice = str(net.dirs["alice"])
    assert net.lau.run("send", "bob", "opening", "--daemon", alice).returncode == 0
    bob_id = self_certifying_id(bytes.fromhex(_status(net, "bob")["key"]))
    ping = net.lau.run("ping", bob_id, "--json", "--count", "2", "--daemon", alice)
    assert ping.returncode == 0, ping.stderr
    out = json.loads(ping.stdout)
    assert len(out["rtt_ms"]) == 2 and out["path"] == {"local": "host", "remote": "host"}
    assert out["reused"] is True  # the session opened to "bob", matched by its key


def test_client_errors_are_one_line(net: Net) -> None:
    res = net.lau.run("ping", "bob", "--daemon", str(net.dirs["b0"]))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        "dhtsignal ping: a bootstrap daemon runs no sessions: use a peer daemon"
    )
    missing = net.lau.run("send", "bob", "x", "--daemon", str(net.lau.workdir / "nowhere"))
    assert missing.returncode == 2 and "'daemon'" in missing.stderr
    assert "Traceback" not in missing.stderr
    recv = net.lau.run("recv")
    assert recv.returncode == 2 and "'daemon'" in recv.stderr
    unknown = net.lau.run("lookup", "nobody-here", "--daemon", str(net.dirs["alice"]))
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1


def test_api_socket_is_private_and_survives_garbage(net: Net) -> None:
    path = net.dirs["alice"] / SOCKET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(str(path))
        s.sendall(b"not json\n[1,2]\n" + b'{"id": 1, "op": "nope"}\n{"id": 2, "op": "hello"}\n')
        reader = s.makefile("rb")
        replies = [json.loads(reader.readline()) for _ in range(4)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        s.connect(str(path))
        s.sendall(b"x" * (MAX_LINE + 10) + b"\n")
        too_long = json.loads(s.makefile("rb").readline())
    assert too_long["ok"] is False and "line over" in too_long["error"]["message"]
    errors = [r["error"]["type"] for r in replies if not r["ok"]]
    assert errors == ["UsageError"] * 3
    hello = next(r for r in replies if r["ok"])
    assert hello["id"] == 2 and hello["result"] == {
        "protocol": 1,
        "kind": "peer",
        "node_id": "alice",
    }


def _scrape(addr: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {labels: value}}`` of a real HTTP scrape, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def test_metrics_move_with_traffic(net: Net) -> None:
    b0_before, bob_before = _scrape(net.metrics["b0"]), _scrape(net.metrics["bob"])
    for name in ("dhtsignal_routing_contacts", "dhtsignal_records", "dhtsignal_listeners"):
        assert name in b0_before and name in bob_before
    assert set(bob_before["dhtsignal_sessions"]) == {
        (("state", s),) for s in ("open", "dialing", "answering")
    }
    # Traffic: a malformed datagram to b0, and a fresh session from a throwaway sender to bob.
    host, port = net.metrics["b0"].rsplit(":", 1)
    b0_udp = net.entry.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\xc1 not msgpack", (b0_udp[0], int(b0_udp[1])))
    res = net.lau.run("send", "bob", "metered", "--bootstrap", net.entry, *LOOPBACK_RTC)
    assert res.returncode == 0, res.stderr
    net.procs["bob"].line_matching(lambda ln: ln.endswith(": metered"), 5.0)
    b0_after, bob_after = _scrape(net.metrics["b0"]), _scrape(net.metrics["bob"])

    def total(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> float:
        return sum(m.get(name, {}).values())

    assert total(b0_after, "dhtsignal_rpc_requests_total") > total(
        b0_before, "dhtsignal_rpc_requests_total"
    )
    assert total(b0_after, "dhtsignal_datagrams_dropped_total") > total(
        b0_before, "dhtsignal_datagrams_dropped_total"
    )
    assert total(bob_after, "dhtsignal_session_setup_seconds_count") == (
        total(bob_before, "dhtsignal_session_setup_seconds_count") + 1
    )
    notfound = urllib.request.Request(f"http://{host}:{port}/other")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(notfound, timeout=5)
    err.value.close()
    assert err.value.code == 404


def test_watch_shows_join_and_clean_leave_within_2_s(net: Net) -> None:
    direct = net.lau.start(
        "watch", "peers", "--room", "watch", "--watch", "--json", "--bootstrap", net.entry
    )
    via = net.lau.start(
        "watch-daemon", "peers", "--room", "watch", "--watch", "--daemon", str(net.dirs["b0"])
    )
    _wait_subscribers(net, "b0", 1)
    carol = net.lau.start(
        "carol",
        *("peer", "--node-id", "carol", "--bootstrap", net.entry, "--room", "watch"),
        *("--listen", "127.0.0.1:0", "--data-dir", str(net.lau.workdir / "carol")),
    )
    carol.ready()
    joined = json.loads(direct.line_matching(lambda ln: "peer-joined" in ln, 10.0))
    assert joined["room"] == "watch" and joined["peer"]["node_id"] == "carol"
    via.line_matching(lambda ln: ln.startswith("joined watch carol key="), 10.0)
    began = time.monotonic()
    carol.popen.send_signal(signal.SIGTERM)
    left = json.loads(direct.line_matching(lambda ln: "peer-left" in ln, 5.0))
    elapsed = time.monotonic() - began
    assert left == {
        "event": "peer-left",
        "room": "watch",
        "node_id": "carol",
        "key": joined["peer"]["key"],
        "why": "signed-off",
    }
    assert elapsed < WATCH_LEAVE_LIMIT, f"leave shown after {elapsed:.2f} s"
    via.line_matching(lambda ln: ln == "left watch carol (signed-off)", 5.0)
    assert carol.popen.wait(5) == 0


def test_a_metrics_address_in_use_exits_2_naming_it(net: Net) -> None:
    res = net.lau.run(
        "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(net.lau.workdir / "taken"),
        "--metrics", net.metrics["b0"],
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "'metrics'" in res.stderr and "Traceback" not in res.stderr
