"""What a user sees under churn (issue 9's user-facing half, issue 13's pin policy).

Separate OS processes on 127.0.0.1 where the claim is about processes (a killed peer,
re-runs of the README's example, restarts, two networks, a peer started before its
bootstrap node); real sockets and aiortc in process for the pin policy and the
``not-responding`` verdict. Every process is killed by PID in a fixture finalizer.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_cli import READY_TIMEOUT, RUN_TIMEOUT, Launcher, Proc, _bootstrap, _one_line, _peer

from dhtsignal.datadir import DEFAULT_NETWORK, KnownPeers
from dhtsignal.dht.params import DEFAULT_NETWORK as DHT_DEFAULT_NETWORK
from dhtsignal.dht.params import NodeConfig
from dhtsignal.errors import DialFailed, PinnedKeyChanged, UsageError
from dhtsignal.identity import Identity
from dhtsignal.peer import Peer, PeerConfig, default_data_dir
from dhtsignal.presence import resolve, room_peers
from dhtsignal.signaling.session import SessionTimeouts

if TYPE_CHECKING:
    from conftest import StartDht, StartPeer

README = Path(__file__).resolve().parent.parent / "README.md"
LOOPBACK = ("--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1")


@pytest.fixture()
def lau(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(lau: Launcher, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a command; returns it and the seconds from process creation to its exit."""
    began = time.monotonic()
    res = lau.run(*args)
    return res, time.monotonic() - began


def _wait_stderr(proc: Proc, text: str, timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``proc`` wrote ``text`` to stderr (its stderr is a file: re-read it at
    short intervals, at most ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.stderr():
            return
        if proc.popen.poll() is not None:
            pytest.fail(f"{proc.name} exited with {proc.popen.returncode}: {proc.stderr()}")
        time.sleep(0.05)
    pytest.fail(f"{proc.name}: {text!r} not on stderr in {timeout} s: {proc.stderr()}")


# -- crashed peers ---------------------------------------------------------------------------


def test_killed_peer_is_not_responding_within_2_s(lau: Launcher) -> None:
    """A peer killed with SIGKILL leaves a live presence behind (``lookup`` still finds
    it, and shows how long ago it was refreshed); ``ping`` fails in under 2 s, interpreter
    start-up included, saying "not responding" (not "offline" or "unknown").

    Where the time goes (``bench/killed_ping.py``): about 0.1 s of interpreter start and
    exit, 0.4-0.6 s of imports (aiortc and PyAV the most), a few ms of join and resolve,
    then the verdict. Its host being up, bob's closed port answers the push's port probe
    with ICMP port unreachable within a round trip, instead of the 0.8 s
    ``push_ack_timeout`` (1.5-1.7 s in all before, 0.9 s since). The median of three runs
    must be under 2 s.
    """
    entry = _bootstrap(lau, "b0").ready()["addr"]
    bob = _peer(lau, "bob", entry)
    bob.ready()
    found = lau.run("lookup", "bob", "--bootstrap", entry, "--json")
    assert found.returncode == 0, found.stderr
    info = json.loads(found.stdout)
    assert 0.0 <= info["refreshed_ago"] < 20.0 and 0 < info["expires_in"] <= 60.0, info

    bob.kill()
    still = lau.run("lookup", "bob", "--bootstrap", entry, "--json")
    assert still.returncode == 0, still.stderr  # its presence has not expired yet
    assert json.loads(still.stdout)["refreshed_ago"] >= info["refreshed_ago"]

    times: list[float] = []
    for _ in range(3):  # later runs dial with bob's key pinned by the first
        res, elapsed = _timed(lau, "ping", "bob", "--bootstrap", entry, *LOOPBACK)
        assert res.returncode == 1, res.stdout
        line = _one_line(res.stderr)
        assert "bob: not responding" in line and "offline" not in line, line
        times.append(elapsed)
    assert "nothing listens" in line, line  # the port probe's verdict
    assert statistics.median(times) < 2.0, times


async def test_crashed_callee_is_reported_as_not_responding(
    peers: StartPeer, dht: StartDht
) -> None:
    """In process: bob's DHT node stops without signing off. While something still holds
    its port and stays silent (a frozen process; a host that is down sends no ICMP either),
    alice's dial fails with reason ``not-responding`` about ``push_ack_timeout`` after the
    offer, long before the answer deadline. Once the port is closed, the dial fails the
    same way within a round trip (port unreachable), unless the probe is turned off. A
    live callee is dialed as before."""
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [f"{nodes[0].address[0]}:{nodes[0].address[1]}"]
    alice = await peers("alice", boot, config=PeerConfig(push_ack_timeout=0.6))
    carol = await peers("carol", boot)
    session = await asyncio.wait_for(alice.connect("carol"), 10.0)
    await session.close()

    bob = await peers("bob", boot)
    bob_addr = bob.node.address
    assert bob_addr is not None
    await bob.node.close()  # a crash: no tombstone, the presence stays
    loop = asyncio.get_running_loop()

    async def dial_bob(who: Peer) -> tuple[DialFailed, float]:
        began = loop.time()
        with pytest.raises(DialFailed) as failed:
            await asyncio.wait_for(who.connect("bob"), 10.0)
        assert failed.value.reason == "not-responding", failed.value
        assert "not responding" in str(failed.value)
        return failed.value, loop.time() - began

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(bob_addr)  # holds the port, reads nothing, answers nothing
        error, elapsed = await dial_bob(alice)
    assert "0.6 s" in str(error), error
    assert 0.55 <= elapsed < 2.0, elapsed
    assert alice.stats["dial-failed:not-responding"] == 1
    assert alice.stats["not-responding:port-closed"] == 0

    error, elapsed = await dial_bob(alice)  # the port is closed now
    assert "nothing listens" in str(error) and "0.6 s" not in str(error), error
    assert elapsed < 0.3, elapsed  # a round trip, not push_ack_timeout
    assert alice.stats["not-responding:port-closed"] == 1

    patient = await peers(
        "patient", boot, config=PeerConfig(push_ack_timeout=0.6, probe_closed_ports=False)
    )
    error, elapsed = await dial_bob(patient)
    assert "0.6 s" in str(error) and 0.55 <= elapsed < 2.0, (error, elapsed)
    assert patient.stats["not-responding:port-closed"] == 0
    assert carol.stats["incoming-failed"] == 0

    # carol's presence is in alice's resolve cache: read again, then judged the same way.
    await carol.node.close()
    began = loop.time()
    with pytest.raises(DialFailed) as failed:
        await asyncio.wait_for(alice.connect("carol"), 10.0)
    assert failed.value.reason == "not-responding", failed.value
    assert loop.time() - began < 2.0
    assert alice.stats["dial-failed:not-responding"] == 3


async def test_a_client_mode_callee_is_not_judged_by_its_silence(
    peers: StartPeer, dht: StartDht
) -> None:
    """A callee whose presence says its node is in client mode (behind a NAT, where an
    unsolicited push may be filtered) is never reported as not responding: its dial ends
    at the answer deadline as before."""
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [f"{nodes[0].address[0]}:{nodes[0].address[1]}"]
    alice = await peers(
        "alice",
        boot,
        config=PeerConfig(push_ack_timeout=0.3),
        timeouts=SessionTimeouts(answer=1.5),
    )
    dan = await peers("dan", boot, node_config=NodeConfig(client_mode=True))
    info = await resolve(alice.node, "dan")
    assert info.client_mode and info.to_json()["client_mode"] is True
    await dan.node.close()
    with pytest.raises(DialFailed) as failed:
        await asyncio.wait_for(alice.connect("dan"), 10.0)
    assert failed.value.reason == "answer-timeout", failed.value
    assert alice.stats["dial-failed:not-responding"] == 0


# -- names across re-runs ----------------------------------------------------------------------


def _readme_example() -> str:
    """The first Python example of the README."""
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None, "no python example in the README"
    return match.group(1)


def test_readme_example_runs_twice_in_a_row(lau: Launcher) -> None:
    """The README's Python example, as written but for the bootstrap address, run twice
    as separate programs with the same home directory: the second run keeps alice's key
    (in ``$XDG_DATA_HOME/dhtsignal/peers/alice``) and so her node ID."""
    entry = _bootstrap(lau, "b0").ready()["addr"]
    bob = _peer(lau, "bob", entry)
    bob.ready()
    code = _readme_example()
    assert '"127.0.0.1:4000"' in code
    code = code.replace('"127.0.0.1:4000"', json.dumps(entry))
    env = {**lau.env, "HOME": str(lau.workdir / "home")}
    for run in range(2):
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=RUN_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0, (run, res.stderr)
        assert "bob answered" in res.stdout, (run, res.stdout)
        assert bob.line_matching(lambda line: line.startswith("message from ")) == (
            "message from alice: hi"
        ), run
    key_dir = default_data_dir("alice", env)
    assert key_dir == lau.workdir / "xdg" / "dhtsignal" / "peers" / "alice"
    assert (key_dir / "identity.key").exists()


async def test_a_labelled_peer_keeps_its_key_in_its_own_locked_directory() -> None:
    """Without a data directory, ``Peer("zed")`` keeps its key under ``$XDG_DATA_HOME``
    (the tests' own, see conftest); a second ``Peer("zed")`` while the first holds it is
    refused with the directory named; another label has a directory of its own."""
    first = Peer("zed")
    key_dir = default_data_dir("zed")
    assert first.data_dir == key_dir and (key_dir / "identity.key").exists()
    with pytest.raises(UsageError, match=re.escape(str(key_dir))):
        Peer("zed")
    other = Peer("yan")
    assert other.data_dir == default_data_dir("yan") and other.public_key != first.public_key
    for p in (first, other):
        await p.close()  # never started: releases the directory
    again = Peer("zed")
    assert again.public_key == first.public_key
    await again.close()
    assert Peer(None).data_dir is None  # anonymous: a throwaway key, nothing written


def _expiry(stderr: str) -> float:
    """The UNIX time a NodeIdTaken message names (``until YYYY-mm-dd HH:MM:SS UTC``)."""
    match = re.search(r"until (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC, in ", stderr)
    assert match is not None, stderr
    return float(calendar.timegm(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")))


def test_restarted_peer_keeps_its_name_and_a_new_key_is_refused_naming_the_expiry(
    lau: Launcher,
) -> None:
    entry = _bootstrap(lau, "b0").ready()["addr"]
    carol = _peer(lau, "carol", entry)
    key = carol.ready()["key"]
    carol.kill()  # SIGKILL: its claim stays live
    again = _peer(lau, "carol", entry)  # the same data directory
    assert again.ready()["key"] == key

    claimed = time.time()
    taker = _peer(lau, "carol", entry, "--data-dir", str(lau.workdir / "fresh"))
    assert taker.popen.wait(RUN_TIMEOUT) == 1, taker.stderr()
    line = _one_line(taker.stderr())
    assert "node id 'carol' is taken" in line and key[:16] in line, line
    # The claim lasts an hour (claim_ttl) from its last refresh, the restart.
    assert claimed + 3600 - 120 <= _expiry(line) <= claimed + 3600 + 1, line


# -- pins ----------------------------------------------------------------------------------------


def test_pins_are_scoped_per_network(lau: Launcher) -> None:
    """Two local networks with different ids and a ``bob`` in each: one client pins both
    in one known-peers file, neither blocks the other; ``pins list`` shows both, ``pins
    forget`` removes one; a changed key names the file and the way out."""
    entries: dict[str, str] = {}
    keys: dict[str, str] = {}
    for net in ("lab-a", "lab-b"):
        entries[net] = _bootstrap(lau, f"boot-{net}", "--network", net).ready()["addr"]
        bob = _peer(
            lau,
            "bob",
            entries[net],
            "--network",
            net,
            "--data-dir",
            str(lau.workdir / f"bob-{net}"),
        )
        keys[net] = bob.ready()["key"]
    assert keys["lab-a"] != keys["lab-b"]
    pins = lau.workdir / "xdg" / "dhtsignal" / "known_peers"  # the default file
    for _ in range(2):  # the second round reads the pins the first wrote
        for net in ("lab-a", "lab-b"):
            res = lau.run("lookup", "bob", "--bootstrap", entries[net], "--network", net, "--json")
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["key"] == keys[net]
    listed = lau.run("pins", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted((p["network"], p["node_id"], p["key"]) for p in json.loads(listed.stdout)) == [
        ("lab-a", "bob", keys["lab-a"]),
        ("lab-b", "bob", keys["lab-b"]),
    ]
    text = lau.run("pins", "list")
    assert text.returncode == 0 and "lab-a" in text.stdout and keys["lab-b"] in text.stdout

    # A wrong key pinned for bob in lab-a: refused, naming the file and the way out.
    forgot = lau.run("pins", "forget", "bob", "--network", "lab-a")
    assert forgot.returncode == 0, forgot.stderr
    assert KnownPeers(pins, "lab-a").get("bob") is None
    assert KnownPeers(pins, "lab-b").get("bob") == keys["lab-b"]
    KnownPeers(pins, "lab-a").pin("bob", "ab" * 32)
    res = lau.run("lookup", "bob", "--bootstrap", entries["lab-a"], "--network", "lab-a")
    assert res.returncode == 1
    line = _one_line(res.stderr)
    assert str(pins) in line and "dhtsignal pins forget bob --network lab-a" in line, line
    assert lau.run("pins", "forget", "bob", "--network", "lab-a").returncode == 0
    res = lau.run("lookup", "bob", "--bootstrap", entries["lab-a"], "--network", "lab-a")
    assert res.returncode == 0, res.stderr  # pinned afresh
    assert KnownPeers(pins, "lab-a").get("bob") == keys["lab-a"]

    missing = lau.run("pins", "forget", "bob")  # nothing pinned in the default network
    assert missing.returncode == 1
    assert "pinned in network 'lab-a', 'lab-b'" in _one_line(missing.stderr)
    assert lau.run("pins", "forget").returncode == 2
    assert lau.run("pins", "drop", "bob").returncode == 2


def test_known_peers_file_reads_the_old_format_as_the_default_network(tmp_path: Path) -> None:
    assert DEFAULT_NETWORK == DHT_DEFAULT_NETWORK
    pins = tmp_path / "known_peers"
    old, other = "ab" * 32, "cd" * 32
    pins.write_text(f"# written before pins were scoped\nbob {old}\n")
    default = KnownPeers(pins)
    assert default.get("bob") == old
    spaced = KnownPeers(pins, "my lab #2")
    assert spaced.get("bob") is None  # the old pin does not block another network
    spaced.pin("bob", other)
    assert KnownPeers(pins, "my lab #2").get("bob") == other
    assert KnownPeers(pins).get("bob") == old
    lines = pins.read_text().splitlines()
    assert lines[:2] == ["# written before pins were scoped", f"bob {old}"]
    assert lines[2] == f"bob {other} my%20lab%20%232"
    with pytest.raises(PinnedKeyChanged) as changed:
        spaced.pin("bob", old)
    message = str(changed.value)
    assert str(pins) in message and "'my lab #2'" in message
    assert "dhtsignal pins forget bob --network 'my lab #2' --known-peers " in message
    assert default.forget("bob") == old
    assert pins.read_text().splitlines() == [lines[0], lines[2]]  # comment and other kept
    assert default.forget("bob") is None


# -- pin policy (issue 13) ------------------------------------------------------------------------


async def test_inbound_offers_and_room_listings_pin_nothing(
    peers: StartPeer, dht: StartDht, tmp_path: Path
) -> None:
    """carol's offer names her label; bob verifies it (without pinning) and the session
    opens with remote_id ``carol``; bob's known-peers file is unchanged, also with an
    accept list and after listing a room. carol's own dial pins bob."""
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [f"{nodes[0].address[0]}:{nodes[0].address[1]}"]
    bob_pins = tmp_path / "bob_pins"
    bob_pins.write_text("# bob's pins\n")
    before = bob_pins.read_bytes()
    bob = await peers("bob", boot, known_peers=bob_pins, rooms=["lab"])
    dave = await peers("dave", boot, known_peers=bob_pins, accept=["carol"])
    carol_pins = tmp_path / "carol_pins"
    carol = await peers("carol", boot, known_peers=carol_pins, rooms=["lab"])
    for callee in (bob, dave):
        assert callee.node_id is not None
        out = await asyncio.wait_for(carol.connect(callee.node_id), 10.0)
        inc = await asyncio.wait_for(anext(callee.incoming()), 10.0)
        assert inc.remote_id == "carol"  # the label was verified ...
        await out.close()
    listed = await room_peers(bob.node, "lab", bob.known)
    assert sorted(p.node_id for p in listed) == ["bob", "carol"]
    assert bob_pins.read_bytes() == before  # ... and nothing was pinned
    assert KnownPeers(carol_pins).get("bob") == bob.public_key.hex()  # carol's own dial
    assert KnownPeers(carol_pins).get("dave") == dave.public_key.hex()
    # resolve() honours a pin it does not write
    KnownPeers(bob_pins).pin("carol", Identity.generate().public_key.hex())
    bob.known = KnownPeers(bob_pins)
    with pytest.raises(PinnedKeyChanged):
        await resolve(bob.node, "carol", bob.known)


# -- joining --------------------------------------------------------------------------------------


def test_peer_started_before_its_bootstrap_node_joins_once_it_runs(lau: Launcher) -> None:
    port = _free_udp_port()
    entry = f"127.0.0.1:{port}"
    bob = _peer(lau, "bob", entry, "--rejoin-interval", "0.5")
    _wait_stderr(bob, "no bootstrap node answered")
    assert bob.popen.poll() is None  # still running, retrying
    boot = lau.start(
        "late", "bootstrap", "--listen", entry, "--data-dir", str(lau.workdir / "late")
    )
    assert boot.ready()["addr"] == entry
    ready = bob.ready()
    assert ready["node_id"] == "bob"
    res = lau.run("lookup", "bob", "--bootstrap", entry, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["key"] == ready["key"], res.stderr
    rc, seconds = bob.signal_and_wait(signal.SIGTERM)
    assert rc == 0 and seconds < 2.0


def test_sigterm_ends_a_peer_still_waiting_for_its_bootstrap_node(lau: Launcher) -> None:
    entry = f"127.0.0.1:{_free_udp_port()}"  # nobody listens there
    bob = _peer(lau, "bob", entry, "--rejoin-interval", "0.5")
    _wait_stderr(bob, "retrying every 0.5 s")
    rc, seconds = bob.signal_and_wait(signal.SIGTERM)
    assert rc == 0 and seconds < 2.0, (rc, seconds, bob.stderr())
    assert bob.rest() == []  # never ready
