"""The ``dhtsignal`` commands as separate OS processes on 127.0.0.1.

Daemons bind port 0 and announce their real address on their ready line; tests
wait for that line (read by a thread, with a timeout), never for a fixed time.
Every process is killed by PID in a fixture finalizer, also when a test fails.

The module-scoped network is one bootstrap node, ten more bootstrap nodes that
join it, and four peers: alice and bob in room ``lab``, carol (presence TTL
3 s) in room ``ttl``, and dave, who accepts sessions from alice only. Tests that
stop a peer come after the tests that need it. Tests that kill or restart
daemons, or signal them during start-up, start their own. Every WebRTC session (``ping``,
``send``, ``chat``) gathers ICE candidates on 127.0.0.1 only (``--ice-host``).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dhtsignal import __version__
from dhtsignal.datadir import KnownPeers
from dhtsignal.errors import PinnedKeyChanged
from dhtsignal.identity import self_certifying_id
from dhtsignal.testing.daemons import DaemonProcess

READY_TIMEOUT = 20.0
RUN_TIMEOUT = 20.0
COMMANDS = (
    "bootstrap",
    "peer",
    "peers",
    "lookup",
    "status",
    "ping",
    "send",
    "chat",
    "recv",
    "pins",
    "demo",
)
#: Options of every command that opens a session: stay on loopback, pin nothing on disk.
LOOPBACK_RTC = ("--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1", "--known-peers", "none")
#: carol's presence TTL, seconds (short, so that expiry and refresh fit in a test).
CAROL_TTL = 3.0


#: Where the processes tests start keep their compiled bytecode (outside every tree).
PYCACHE = Path(tempfile.gettempdir()) / f"dhtsignal-tests-pycache-{os.getuid()}"


def _env(home: Path) -> dict[str, str]:
    """The environment of the processes a test starts: no ``DHTSIGNAL_*`` settings, data
    under ``home``, and compiled bytecode kept in :data:`PYCACHE` even where the caller's
    environment says not to write any (``PYTHONDONTWRITEBYTECODE``): an installed
    ``dhtsignal`` has its bytecode compiled at install time, and compiling some fifty
    modules again in every process added 0.2-0.5 s to each command measured here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DHTSIGNAL_")}
    env["XDG_DATA_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    return env


class Proc(DaemonProcess):
    """A ``dhtsignal`` daemon process whose stdout lines are read by a thread
    (:class:`~dhtsignal.testing.daemons.DaemonProcess`), failing the test with its stderr
    when it does not start.

    :param args: arguments after ``python -m dhtsignal``.
    :param workdir: where its stderr file goes.
    :param env: its environment.
    """

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str], name: str) -> None:
        self.name = name
        super().__init__(args, workdir / f"{name}.{time.monotonic_ns()}.stderr", env)

    def ready(self, timeout: float = READY_TIMEOUT) -> dict[str, str]:
        """Wait for the ready line; returns its ``key=value`` fields (and ``kind``)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.name}: no ready line in {timeout} s; stderr:\n{self.stderr()}")
        if line is None:
            self.popen.wait(5)
            pytest.fail(
                f"{self.name} exited with {self.popen.returncode} before it was ready; "
                f"stderr:\n{self.stderr()}"
            )
        words = line.split()
        assert words[0] == "ready", line
        fields = dict(w.split("=", 1) for w in words[2:])
        fields["kind"] = words[1]
        return fields

    def _lines_within(self, timeout: float) -> Iterator[str | None]:
        """Stdout lines as they come (None: the output ended) for up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                yield self._lines.get(timeout=left)
            except queue.Empty:
                return

    def line_matching(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """Wait for the next stdout line that ``predicate`` accepts (earlier ones are skipped)."""
        for line in self._lines_within(timeout):
            if line is None:
                pytest.fail(f"{self.name} exited; stderr:\n{self.stderr()}")
            if predicate(line):
                return line
        pytest.fail(f"{self.name}: no matching line in {timeout} s; stderr:\n{self.stderr()}")

    def rest(self, timeout: float = 10.0) -> list[str]:
        """The stdout lines not read yet, up to the end of the output (once it exits)."""
        lines: list[str] = []
        for line in self._lines_within(timeout):
            if line is None:
                return lines
            lines.append(line)
        pytest.fail(f"{self.name}: stdout still open after {timeout} s")

    def signal_and_wait(self, sig: int, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``sig``; returns the exit status and the seconds it took to exit."""
        began = time.monotonic()
        self.popen.send_signal(sig)
        rc = self.popen.wait(timeout)
        return rc, time.monotonic() - began


class Launcher:
    """Starts daemons and one-shot commands; kills every daemon it started on cleanup."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = _env(workdir / "xdg")
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(list(args), self.workdir, self.env, name)
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float = RUN_TIMEOUT, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion; stdin is ``input``, or empty."""
        stdin: dict[str, Any] = (
            {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        )
        return subprocess.run(
            [sys.executable, "-m", "dhtsignal", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            **stdin,
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    lau = Launcher(tmp_path_factory.mktemp("cli"))
    try:
        yield lau
    finally:
        lau.close()


@pytest.fixture()
def own_launcher(tmp_path: Path) -> Iterator[Launcher]:
    lau = Launcher(tmp_path)
    try:
        yield lau
    finally:
        lau.close()


@dataclass
class Network:
    entry: str
    bootstraps: list[Proc]
    peers: dict[str, Proc]
    ready: dict[str, dict[str, str]]
    lau: Launcher


def _bootstrap(lau: Launcher, name: str, *extra: str) -> Proc:
    data = lau.workdir / name
    return lau.start(name, "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(data), *extra)


def _peer(lau: Launcher, name: str, entry: str, *extra: str) -> Proc:
    data = lau.workdir / f"peer-{name}"
    return lau.start(
        name,
        "peer",
        *("--node-id", name, "--bootstrap", entry, "--listen", "127.0.0.1:0"),
        *("--data-dir", str(data), "--ice-host", "127.0.0.1", *extra),
    )


@pytest.fixture(scope="module")
def net(launcher: Launcher) -> Network:
    first = _bootstrap(launcher, "b0")
    entry = first.ready()["addr"]
    others = [_bootstrap(launcher, f"b{i}", "--join", entry) for i in range(1, 11)]
    ready = {"b0": {"addr": entry}}
    for i, proc in enumerate(others, 1):
        ready[f"b{i}"] = proc.ready()
    second = ready["b5"]["addr"]
    peers = {
        "alice": _peer(launcher, "alice", entry, "--room", "lab", "--bootstrap", second),
        "bob": _peer(launcher, "bob", entry, "--room", "lab"),
        "carol": _peer(
            launcher, "carol", second, "--room", "ttl", "--presence-ttl", f"{CAROL_TTL:g}"
        ),
        "dave": _peer(launcher, "dave", second, "--room", "private", "--accept", "alice"),
    }
    for name, proc in peers.items():
        ready[name] = proc.ready()
    return Network(entry, [first, *others], peers, ready, launcher)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _self_id(ready: dict[str, str]) -> str:
    """The self-certifying ID of a peer, from the key on its ready line."""
    return self_certifying_id(bytes.fromhex(ready["key"]))


# -- tests against the shared network ------------------------------------------------------


def test_every_daemon_announces_itself(net: Network) -> None:
    ids = {net.ready[f"b{i}"]["id"] for i in range(1, 11)}
    assert len(ids) == 10 and all(len(i) == 40 for i in ids)
    alice = net.ready["alice"]
    assert alice["kind"] == "peer" and alice["node_id"] == "alice" and len(alice["key"]) == 64
    assert alice["addr"].startswith("127.0.0.1:")


def test_peers_lists_the_room(net: Network) -> None:
    res = net.lau.run("peers", "--bootstrap", net.entry, "--room", "lab", "--json")
    assert res.returncode == 0, res.stderr
    listed = {p["node_id"]: p for p in json.loads(res.stdout)}
    assert set(listed) == {"alice", "bob"}
    for name in ("alice", "bob"):
        info = listed[name]
        assert info["key"] == net.ready[name]["key"]
        assert info["rooms"] == ["lab"]
        host, port = net.ready[name]["addr"].split(":")
        assert [host, int(port)] in info["addresses"]
        assert 0 < info["expires_in"] <= 60  # the default presence TTL
        assert 0 <= info["refreshed_ago"] <= 20 + 5  # refreshed every third of it

    table = net.lau.run("peers", "--bootstrap", net.entry, "--room", "lab")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NODE_ID", "KEY", "ROOMS", "ADDRESSES", "EXPIRES_IN", "REFRESHED"]
    assert sorted(r.split()[0] for r in rows) == ["alice", "bob"]
    assert len({r.index(r.split()[1]) for r in rows}) == 1  # aligned key column


def test_lookup_finds_alice(net: Network) -> None:
    res = net.lau.run("lookup", "alice", "--bootstrap", net.entry, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["node_id"] == "alice"
    assert info["key"] == net.ready["alice"]["key"]
    assert info["rooms"] == ["lab"]
    plain = net.lau.run("lookup", "alice", "--bootstrap", net.entry)
    assert plain.returncode == 0 and net.ready["alice"]["key"] in plain.stdout


def test_lookup_by_self_certifying_id(net: Network) -> None:
    alice = _self_id(net.ready["alice"])
    res = net.lau.run("lookup", alice, "--bootstrap", net.entry, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["key"] == net.ready["alice"]["key"]
    assert info["node_id"] == alice and info["self_id"] == alice
    assert info["rooms"] == ["lab"]


def test_peer_without_node_id_is_found_by_its_self_certifying_id(net: Network) -> None:
    data = net.lau.workdir / "peer-anonymous"
    anon = net.lau.start(
        "anonymous",
        *("peer", "--bootstrap", net.entry, "--listen", "127.0.0.1:0", "--room", "anon"),
        *("--data-dir", str(data), "--ice-host", "127.0.0.1"),
    )
    try:
        ready = anon.ready()
        assert ready["node_id"] == _self_id(ready)  # it claims its self-certifying ID
        res = net.lau.run("lookup", ready["node_id"], "--bootstrap", net.entry, "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["key"] == ready["key"]
    finally:
        anon.kill()


def test_lookup_of_unknown_id_exits_1(net: Network) -> None:
    res = net.lau.run("lookup", "nobody-here", "--bootstrap", net.entry)
    assert res.returncode == 1
    assert "unknown" in _one_line(res.stderr)


def test_second_key_cannot_claim_a_live_id(net: Network) -> None:
    taker = _peer(net.lau, "alice", net.entry, "--data-dir", str(net.lau.workdir / "mallory"))
    rc = taker.popen.wait(RUN_TIMEOUT)
    assert rc == 1, taker.stderr()
    assert "taken" in _one_line(taker.stderr())
    res = net.lau.run("lookup", "alice", "--bootstrap", net.entry, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["key"] == net.ready["alice"]["key"]


def test_changed_pinned_key_fails_loudly(net: Network) -> None:
    pins = net.lau.workdir / "pins"
    pins.write_text(f"alice {'ab' * 32}\n")
    for cmd in (("lookup", "alice"), ("peers", "--room", "lab")):
        res = net.lau.run(*cmd, "--bootstrap", net.entry, "--known-peers", str(pins))
        assert res.returncode == 1, res.stdout
        assert "pinned" in _one_line(res.stderr)


# -- the known-peers file ---------------------------------------------------------------------


def test_first_sight_writes_the_pin_file(net: Network) -> None:
    pins = net.lau.workdir / "fresh" / "known_peers"  # neither the file nor its directory
    res = net.lau.run("lookup", "alice", "--bootstrap", net.entry, "--known-peers", str(pins))
    assert res.returncode == 0, res.stderr
    assert pins.read_text() == f"alice {net.ready['alice']['key']}\n"
    assert pins.stat().st_mode & 0o777 == 0o600

    listed = net.lau.run(
        "peers", "--room", "lab", "--bootstrap", net.entry, "--known-peers", str(pins)
    )
    assert listed.returncode == 0, listed.stderr
    assert "bob" in listed.stdout
    # A room listing honours pins but writes none (issue 13): only the lookup pinned.
    assert pins.read_text() == f"alice {net.ready['alice']['key']}\n"


def _key(node_id: str) -> str:
    return hashlib.sha256(node_id.encode()).hexdigest()


def test_two_pin_file_readers_keep_both_pins(tmp_path: Path) -> None:
    pins = tmp_path / "known_peers"
    pins.write_text("# pinned by hand\n")
    first, second = KnownPeers(pins), KnownPeers(pins)  # both read the file before any pin
    first.pin("x", _key("x"))
    second.pin("y", _key("y"))
    again = KnownPeers(pins)
    assert (again.get("x"), again.get("y")) == (_key("x"), _key("y"))
    assert pins.read_text().startswith("# pinned by hand\n")
    # What the other object pinned meanwhile counts: a different key for x is refused.
    with pytest.raises(PinnedKeyChanged):
        second.pin("x", _key("not x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known_peers", "known_peers.lock"]


#: Pins COUNT node IDs into a file, each process its own, once told to go on stdin.
_PINNER = """
import hashlib, sys
from pathlib import Path
from dhtsignal.datadir import KnownPeers
path, who, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
known = KnownPeers(path)
print("ready", flush=True)
sys.stdin.readline()
for j in range(count):
    node_id = f"{who}-{j}"
    known.pin(node_id, hashlib.sha256(node_id.encode()).hexdigest())
"""


def test_concurrent_processes_keep_every_pin(own_launcher: Launcher) -> None:
    pins = own_launcher.workdir / "pins" / "known_peers"
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(8):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _PINNER, str(pins), f"p{i}", "20"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    env=own_launcher.env,
                    text=True,
                )
            )
        deadline = time.monotonic() + READY_TIMEOUT
        for p in procs:  # each has read the (missing) file before any of them pins
            assert p.stdout is not None and p.stdin is not None
            left = max(0.0, deadline - time.monotonic())
            assert select.select([p.stdout], [], [], left)[0], f"pid {p.pid}: not ready"
            assert p.stdout.readline() == "ready\n", f"pid {p.pid} exited with {p.poll()}"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        statuses = [p.wait(RUN_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
    assert statuses == [0] * 8  # none failed (e.g. a temporary file renamed by another)
    expected = {f"p{i}-{j}": _key(f"p{i}-{j}") for i in range(8) for j in range(20)}
    lines = pins.read_text().splitlines()
    assert dict(line.split() for line in lines) == expected and len(lines) == len(expected)
    assert sorted(p.name for p in pins.parent.iterdir()) == ["known_peers", "known_peers.lock"]


def test_status_pings_a_node(net: Network) -> None:
    res = net.lau.run("status", "--target", net.ready["b3"]["addr"], "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["id"] == net.ready["b3"]["id"] and out["rtt_ms"] > 0


# -- WebRTC sessions through the commands ---------------------------------------------------


def _message_from(text: str) -> Callable[[str], bool]:
    return lambda line: line.startswith("message from ") and line.endswith(f": {text}")


def test_ping_opens_a_session_and_measures(net: Network) -> None:
    res = net.lau.run("ping", "bob", "--bootstrap", net.entry, "--json", *LOOPBACK_RTC)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["setup_ms"] > 0 and len(out["rtt_ms"]) == 3
    assert all(0 < r < 1000 for r in out["rtt_ms"])
    assert out["path"] == {"local": "host", "remote": "host"}
    assert out["nat"] == "open"
    phases = out["phases_ms"]
    assert set(phases) == {"resolve", "signaling", "ice", "dtls_sctp"}
    assert sum(phases.values()) <= out["setup_ms"] + 5  # the split adds up to the whole

    text = net.lau.run("ping", "bob", "--bootstrap", net.entry, "--count", "1", *LOOPBACK_RTC)
    assert text.returncode == 0, text.stderr
    first, path, rtt, *_ = text.stdout.splitlines()
    assert first.startswith("connected to bob in ") and "DTLS/SCTP" in first
    assert path == "path: host -> host (NAT here: open)" and rtt.startswith("rtt 1: ")


def test_send_is_acknowledged_and_printed_by_the_daemon(net: Network) -> None:
    res = net.lau.run(
        "send", "bob", "hello bob\nsecond line", "--bootstrap", net.entry, *LOOPBACK_RTC
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "delivered to bob"
    # Acknowledged means bob's daemon has it: the line follows at once.
    line = net.peers["bob"].line_matching(_message_from("hello bob\\nsecond line"), 5.0)
    sender = line.split()[2].rstrip(":")
    assert len(sender) == 40  # a throwaway key: its self-certifying ID


def test_send_to_a_self_certifying_id(net: Network) -> None:
    bob = _self_id(net.ready["bob"])
    res = net.lau.run("send", bob, "hello by key", "--bootstrap", net.entry, *LOOPBACK_RTC)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("delivered to ")
    net.peers["bob"].line_matching(_message_from("hello by key"), 5.0)


def test_five_concurrent_sessions(net: Network) -> None:
    texts = [f"concurrent {i}" for i in range(5)]
    with ThreadPoolExecutor(5) as pool:
        runs = [
            pool.submit(net.lau.run, "send", "alice", t, "--bootstrap", net.entry, *LOOPBACK_RTC)
            for t in texts
        ]
        results = [r.result() for r in runs]
    assert [r.returncode for r in results] == [0] * 5, [r.stderr for r in results]
    seen = {net.peers["alice"].line_matching(lambda ln: "concurrent" in ln, 5.0) for _ in texts}
    assert {ln.rsplit(": ", 1)[1] for ln in seen} == set(texts)


def test_chat_sends_typed_lines(net: Network) -> None:
    res = net.lau.run(
        "chat", "bob", "--bootstrap", net.entry, *LOOPBACK_RTC, input="typed one\ntyped two\n"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("connected to bob over host -> host")
    bob = net.peers["bob"]
    bob.line_matching(_message_from("typed one"), 5.0)
    bob.line_matching(_message_from("typed two"), 5.0)


def test_accept_policy_refuses_others_with_a_reason(net: Network) -> None:
    began = time.monotonic()
    res = net.lau.run("ping", "dave", "--bootstrap", net.entry, *LOOPBACK_RTC)
    elapsed = time.monotonic() - began
    assert res.returncode == 1
    assert "not accepted" in _one_line(res.stderr) and elapsed < 5.0


def test_ping_of_unknown_node_fails_within_3_s(net: Network) -> None:
    began = time.monotonic()
    res = net.lau.run("ping", "nobody-here", "--bootstrap", net.entry, *LOOPBACK_RTC)
    elapsed = time.monotonic() - began
    assert res.returncode == 1 and elapsed < 3.0, (res.returncode, elapsed)
    assert "unknown" in _one_line(res.stderr)


def test_sigterm_signs_a_peer_off_at_once(net: Network) -> None:
    rc, seconds = net.peers["bob"].signal_and_wait(signal.SIGTERM)
    assert rc == 0 and seconds < 2.0, (rc, seconds)
    res = net.lau.run("lookup", "bob", "--bootstrap", net.entry)
    assert res.returncode == 1
    assert "offline" in _one_line(res.stderr)


def test_ping_of_offline_node_fails_within_3_s(net: Network) -> None:
    began = time.monotonic()
    res = net.lau.run("ping", "bob", "--bootstrap", net.entry, "--json", *LOOPBACK_RTC)
    elapsed = time.monotonic() - began
    assert res.returncode == 1 and elapsed < 3.0, (res.returncode, elapsed)
    assert res.stdout == ""
    assert "offline" in _one_line(res.stderr)


def test_short_ttl_peer_stays_online_by_refreshing(net: Network) -> None:
    """carol's records live CAROL_TTL seconds: found throughout more than two of them."""
    key = net.ready["carol"]["key"]
    expiries: list[float] = []
    first_seen: float | None = None
    began = time.monotonic()
    for _ in range(200):  # a lookup takes far longer than 2 * CAROL_TTL / 200
        asked = time.monotonic()
        if first_seen is not None and asked - first_seen > 2 * CAROL_TTL:
            break
        res = net.lau.run("lookup", "carol", "--bootstrap", net.entry, "--json")
        assert res.returncode == 0, (asked - began, res.stderr)
        info = json.loads(res.stdout)
        assert info["key"] == key and 0 < info["expires_in"] <= CAROL_TTL, info
        answered = time.monotonic()
        first_seen = answered if first_seen is None else first_seen
        expiries.append(answered + info["expires_in"])
    # Every lookup from first_seen to the last one (asked > 2 TTLs later) found carol.
    assert first_seen is not None and asked - first_seen > 2 * CAROL_TTL, asked - began
    assert max(expiries) - min(expiries) > CAROL_TTL  # her records were replaced by newer


def test_killed_peer_expires_after_its_ttl(net: Network) -> None:
    net.peers["carol"].kill()
    killed = time.monotonic()
    gone = False
    for _ in range(10):
        res = net.lau.run("lookup", "carol", "--bootstrap", net.entry, "--json")
        if res.returncode == 1:
            gone = True
            break
        assert res.returncode == 0, res.stderr
        # Still listed: its record says when it expires; wait for that moment, then ask again.
        remaining = json.loads(res.stdout)["expires_in"]
        time.sleep(min(remaining + 0.2, 3.5))
    assert gone, "carol is still online after her TTL"
    assert "offline" in _one_line(res.stderr)
    assert time.monotonic() - killed < 8.0


# -- tests with their own processes ---------------------------------------------------------


def test_restarted_bootstrap_serves_restored_records(own_launcher: Launcher) -> None:
    lau = own_launcher
    boot = _bootstrap(lau, "boot")
    before = boot.ready()
    dave = _peer(lau, "dave", before["addr"])
    dave_key = dave.ready()["key"]
    dave.kill()  # no tombstone: only the bootstrap node still holds dave's records
    rc, seconds = boot.signal_and_wait(signal.SIGTERM)  # from the signal to the exit
    assert rc == 0 and seconds < 2.0, (rc, seconds)

    again = lau.start(
        "boot2", "bootstrap", "--listen", before["addr"], "--data-dir", str(lau.workdir / "boot")
    )
    after = again.ready()
    assert after == before  # same routing ID (identity kept) and address
    res = lau.run("lookup", "dave", "--bootstrap", after["addr"], "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["key"] == dave_key
    rc, seconds = again.signal_and_wait(signal.SIGINT)
    assert rc == 0 and seconds < 2.0, (rc, seconds)


def _writer_once_read(fifo: Path, proc: Proc, timeout: float = READY_TIMEOUT) -> int:
    """Open ``fifo`` for writing once ``proc`` opened it for reading; returns the descriptor.

    The blocking open runs in a thread so that the wait is bounded; if it times out,
    opening the read end here releases the thread.
    """
    opened: list[int] = []
    waiter = threading.Thread(target=lambda: opened.append(os.open(fifo, os.O_WRONLY)))
    waiter.start()
    waiter.join(timeout)
    if opened:
        return opened[0]
    release = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    waiter.join(5.0)
    for fd in [release, *opened]:
        os.close(fd)
    pytest.fail(f"{proc.name} did not open {fifo} in {timeout} s; stderr:\n{proc.stderr()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_during_start_up_exits_0_quietly(own_launcher: Launcher, sig: int) -> None:
    """A daemon stopped while it still reads its settings, before it installs its own
    signal handlers, exits 0 at once: no traceback, no ready line.

    Its config file is a FIFO that we open but never write to, so the signal finds it
    blocked in that read, at a known point of its start-up. (Sent right after the
    process is created, a signal would reach the interpreter before any of our code
    runs, and kill it whatever the CLI does.)
    """
    fifo = own_launcher.workdir / "settings.fifo"
    os.mkfifo(fifo)
    boot = _bootstrap(own_launcher, "early", "--config", str(fifo))
    writer = _writer_once_read(fifo, boot)
    try:
        rc, seconds = boot.signal_and_wait(sig)
    finally:
        os.close(writer)
    assert (rc, boot.stderr()) == (0, ""), boot.stderr()
    assert seconds < 2.0
    assert boot.rest() == []  # no ready line


def test_unreachable_bootstrap_fails_fast(own_launcher: Launcher) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        silent = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never answers
        began = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            lookup = pool.submit(own_launcher.run, "lookup", "alice", "--bootstrap", silent)
            status = pool.submit(own_launcher.run, "status", "--target", silent)
            res, ping = lookup.result(), status.result()
        elapsed = time.monotonic() - began
    assert res.returncode == 1 and elapsed < 6.0
    assert "no bootstrap node answered" in _one_line(res.stderr)
    assert ping.returncode == 1 and "no answer" in _one_line(ping.stderr)


def test_a_bootstrap_node_of_another_network_is_named_as_such(own_launcher: Launcher) -> None:
    """Joining with another --network than the bootstrap node's: the node answers the
    ping saying which network it serves, and every command says so at once instead of
    "no bootstrap node answered" (a peer daemon while it keeps retrying)."""
    b0 = _bootstrap(own_launcher, "b0")
    entry = b0.ready()["addr"]
    want = f"{entry} serves network 'dhtsignal/1', not 'lab-2' (give both the same --network)"
    began = time.monotonic()
    for cmd in (("lookup", "bob"), ("peers",), ("ping", "bob")):
        res = own_launcher.run(*cmd, "--bootstrap", entry, "--network", "lab-2")
        assert res.returncode == 1, res.stderr
        assert _one_line(res.stderr).endswith(want), res.stderr
    assert time.monotonic() - began < 10.0  # three interpreters; no 2.4 s of retries each
    bob = _peer(own_launcher, "bob", entry, "--network", "lab-2", "--rejoin-interval", "0.5")
    deadline = time.monotonic() + READY_TIMEOUT
    while want not in bob.stderr() and bob.popen.poll() is None:
        assert time.monotonic() < deadline, bob.stderr()
        time.sleep(0.05)  # its stderr is a file: re-read it
    assert want in bob.stderr() and "Traceback" not in bob.stderr()
    assert b0.popen.poll() is None and "Traceback" not in b0.stderr()


def test_demo_command_runs_the_embedded_network(own_launcher: Launcher) -> None:
    began = time.monotonic()
    res = own_launcher.run("demo")
    elapsed = time.monotonic() - began
    assert res.returncode == 0, res.stderr
    assert elapsed < 10.0
    out = res.stdout
    assert "data channel open on both sides: setup " in out and "path host -> host" in out
    assert "alice received: 'echo: hello bob'" in out


def test_version_and_help_of_every_command(own_launcher: Launcher) -> None:
    cases = [[], *([c] for c in COMMANDS)]
    runs = [
        (
            flag,
            subprocess.Popen(
                [sys.executable, "-m", "dhtsignal", *c, flag],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=own_launcher.env,
            ),
        )
        for c in cases
        for flag in ("--version", "--help")
    ]
    for flag, p in runs:
        out, err = p.communicate(timeout=RUN_TIMEOUT)
        assert p.returncode == 0, err
        if flag == "--version":
            assert out.strip() == f"dhtsignal {__version__}"
        else:
            assert out.startswith("usage: dhtsignal") and "--version" in out


def test_pings_between_wildcard_listeners_drop_nothing(net: Network) -> None:
    """Two daemons and a pinger listening on 0.0.0.0: an offer never names the wildcard
    address, and the callee pushes its answer only to the node that pushed the offer,
    so no reply comes back from an address other than the one asked (before issue 10
    the callee counted ``drop:response-from-wrong-address`` on every such ping)."""
    x = _peer(net.lau, "wild-a", net.entry, "--listen", "0.0.0.0:0")
    y = _peer(net.lau, "wild-b", net.entry, "--listen", "0.0.0.0:0")
    x.ready()
    y.ready()
    daemon = str(net.lau.workdir / "peer-wild-a")
    res = net.lau.run("ping", "wild-b", "--daemon", daemon, "--count", "1")
    assert res.returncode == 0, res.stderr
    res = net.lau.run(
        "ping",
        "wild-b",
        "--bootstrap",
        net.entry,
        "--count",
        "1",
        "--listen",
        "0.0.0.0:0",
        *LOOPBACK_RTC,
    )
    assert res.returncode == 0, res.stderr
    for who in ("wild-a", "wild-b"):
        st = net.lau.run("status", "--daemon", str(net.lau.workdir / f"peer-{who}"), "--json")
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["address"].startswith("0.0.0.0:")
        assert "response-from-wrong-address" not in status["dropped"], (who, status["dropped"])
