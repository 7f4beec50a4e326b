"""IPv6: addresses as written, dual-stack daemons, and a whole network on ``::1``.

The process tests run only where ``::1`` can be bound (they are skipped with the reason
otherwise). Every process is started and killed by PID through :class:`test_cli.Launcher`.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import Launcher

from dhtsignal.wire.addr import listen_for, parse_addr


def _ipv6_loopback() -> str | None:
    """None if ``::1`` can be bound, else why not."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"::1 unavailable: {exc}"
    return None


_NO_V6 = _ipv6_loopback()
needs_v6 = pytest.mark.skipif(_NO_V6 is not None, reason=_NO_V6 or "")


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("127.0.0.1:4000", ("127.0.0.1", 4000)),
        ("[::1]:4000", ("::1", 4000)),
        ("[::]:0", ("::", 0)),
        ("boot-1.example.org:4000", ("boot-1.example.org", 4000)),
        (" localhost:1 ", ("localhost", 1)),
    ],
)
def test_addresses_parse(text: str, addr: tuple[str, int]) -> None:
    assert parse_addr(text) == addr


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("300.1.1.1:4000", "not an IPv4 address"),
        ("1.2.3:4000", "not an IPv4 address"),
        ("::1:4000", "in brackets"),
        ("[::1]4000", "is not [V6]:PORT"),
        ("[zz::q]:4000", "not an IPv6 address"),
        ("a b:1", "not a host name"),
        ("host:port", "must be a number"),
        ("host:70000", "out of range"),
        ("4000", "is not HOST:PORT"),
    ],
)
def test_malformed_addresses_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_addr(text)


def test_the_ipv4_wildcard_becomes_dual_stack_for_ipv6_targets() -> None:
    assert listen_for(("0.0.0.0", 0), [("::1", 4000)]) == ("::", 0)
    assert listen_for(("0.0.0.0", 7), [("127.0.0.1", 4000)]) == ("0.0.0.0", 7)
    assert listen_for(("::", 0), [("127.0.0.1", 4000)]) == ("::", 0)
    assert listen_for(("127.0.0.1", 0), [("example.org", 4000)]) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match="cannot reach ::1"):
        listen_for(("127.0.0.1", 0), [("::1", 4000)])
    with pytest.raises(ValueError, match=r"cannot reach 127\.0\.0\.1"):
        listen_for(("::1", 0), [("127.0.0.1", 4000)])


@pytest.fixture()
def lau(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.close()


def test_malformed_addresses_exit_2_naming_the_setting(lau: Launcher) -> None:
    cases = [
        (("peers", "--bootstrap", "300.1.1.1:4000"), "'--bootstrap'"),
        (("status", "--target", "::1:4000"), "'--target'"),
        (("bootstrap", "--listen", "[::1]4000"), "'--listen'"),
        (("peers", "--bootstrap", "[::1]:4000", "--listen", "127.0.0.1:0"), "'listen'"),
    ]
    for args, setting in cases:
        res = lau.run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert setting in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


@needs_v6
def test_a_network_on_ipv6_loopback(lau: Launcher) -> None:
    # A dual-stack bootstrap node: reachable as [::1] and as 127.0.0.1 on one port.
    b0 = lau.start("b0", "bootstrap", "--listen", "[::]:0", "--data-dir", str(lau.workdir / "b0"))
    port = b0.ready()["addr"].rsplit(":", 1)[1]
    v6, v4 = f"[::1]:{port}", f"127.0.0.1:{port}"
    bob = lau.start(
        "bob",
        *("peer", "--node-id", "bob", "--bootstrap", v6, "--room", "six"),
        *("--listen", "[::1]:0", "--ice-host", "::1", "--data-dir", str(lau.workdir / "bob")),
    )
    assert bob.ready()["addr"].startswith("[::1]:")
    # An IPv4 peer in the same network, joined through the same node's IPv4 address.
    al = lau.start(
        "al",
        *("peer", "--node-id", "al", "--bootstrap", v4, "--room", "six"),
        *("--listen", "127.0.0.1:0", "--ice-host", "127.0.0.1"),
        *("--data-dir", str(lau.workdir / "al")),
    )
    al.ready()

    for target in (v6, v4):
        st = lau.run("status", "--target", target, "--json")
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["addr"] == target
    for entry in (v6, v4):
        peers = lau.run("peers", "--room", "six", "--bootstrap", entry, "--json")
        assert peers.returncode == 0, peers.stderr
        found = {p["node_id"]: p for p in json.loads(peers.stdout)}
        assert set(found) == {"al", "bob"}
        assert found["bob"]["addresses"][0][0] == "::1"
    lookup = lau.run("lookup", "bob", "--bootstrap", v6, "--json", "--known-peers", "none")
    assert lookup.returncode == 0, lookup.stderr
    assert json.loads(lookup.stdout)["addresses"][0][0] == "::1"
    ping = lau.run(
        "ping", "bob", "--bootstrap", v6, "--ice-host", "::1", "--known-peers", "none", "--json"
    )
    assert ping.returncode == 0, ping.stderr
    assert len(json.loads(ping.stdout)["rtt_ms"]) == 3
    # Gathering on IPv4 only toward bob (IPv6 only): no pair is possible, and it says so
    # (it said "session input 'answer_received' is invalid in state CLOSED").
    ping4 = lau.run("ping", "bob", "--bootstrap", v4, "--ice-host", "127.0.0.1")
    assert ping4.returncode == 1
    assert "we offered IPv4 candidates only, bob IPv6 only" in ping4.stderr, ping4.stderr
    assert "Traceback" not in ping4.stderr and len(ping4.stderr.strip().splitlines()) == 1
    for proc in (b0, bob, al):
        assert "Traceback" not in proc.stderr()
