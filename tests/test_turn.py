"""TURN through a real coturn on 127.0.0.1.

With host candidates switched off (no local address to gather), the only path between
two peers is through the TURN server: the session must still open, relay to relay, and
carry messages. coturn runs as a separate process started and killed (by PID) here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dhtsignal.aio import rtc
from dhtsignal.errors import DialFailed
from dhtsignal.peer import Peer

if TYPE_CHECKING:
    from conftest import StartDht

USER, PASSWORD, REALM = "dhtsignal", "test-secret", "dhtsignal.test"
SECRET = "shared-turn-secret"
_MAGIC = 0x2112A442


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_stun(port: int, tries: int = 50, timeout: float = 0.1) -> bool:
    """Send STUN Binding requests until one is answered (bounded: ``tries`` x ``timeout``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            txid = os.urandom(12)
            s.sendto(struct.pack("!HHI", 0x0001, 0, _MAGIC) + txid, ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            if data[8:20] == txid:
                return True
    return False


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[int]:
    """A coturn TURN server on 127.0.0.1 (long-term credentials); yields its port."""
    yield from _coturn(tmp_path, ["--lt-cred-mech", "--user", f"{USER}:{PASSWORD}"])


@pytest.fixture
def coturn_secret(tmp_path: Path) -> Iterator[int]:
    """A coturn TURN server on 127.0.0.1 with ``use-auth-secret`` (ephemeral credentials
    from the shared secret :data:`SECRET`); yields its port."""
    yield from _coturn(tmp_path, ["--use-auth-secret", "--static-auth-secret", SECRET])


def _coturn(tmp_path: Path, auth: list[str]) -> Iterator[int]:
    exe = shutil.which("turnserver")
    if exe is None:
        pytest.skip("coturn's turnserver is not installed (.ci/run installs it)")
    port = _free_udp_port()
    log = open(tmp_path / "turnserver.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            exe,
            "-n",
            *("--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1"),
            *("--listening-port", str(port), "--allow-loopback-peers"),
            *auth,
            *("--realm", REALM),
            *("--no-tls", "--no-dtls", "--no-tcp", "--no-cli"),
            *("--pidfile", str(tmp_path / "turnserver.pid"), "--log-file", "stdout"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        if not _answers_stun(port):
            pytest.fail(
                f"coturn did not answer on port {port}: {(tmp_path / 'turnserver.log').read_text()}"
            )
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()


@pytest.mark.timeout(60)
async def test_session_opens_through_turn_alone(dht: StartDht, coturn: int) -> None:
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [nodes[0].address]
    server = {
        "urls": f"turn:127.0.0.1:{coturn}?transport=udp",
        "username": USER,
        "credential": PASSWORD,
    }
    rtc.use_host_addresses([])  # no host candidates: TURN is the only way
    alice = Peer("alice", boot, ice_servers=[server])
    bob = Peer("bob", boot, ice_servers=[server])
    try:
        await alice.start()
        await bob.start()
        session = await asyncio.wait_for(alice.connect("bob"), 20)
        assert session.path == ("relay", "relay")
        incoming = await asyncio.wait_for(anext(aiter(bob.incoming())), 5)
        await session.send("through the relay")
        assert await incoming.recv(5) == "through the relay"
        assert 0 < await session.ping() < 5
    finally:
        rtc.use_host_addresses(None)
        await asyncio.gather(alice.close(), bob.close(), return_exceptions=True)


@pytest.mark.timeout(60)
async def test_wrong_turn_credential_fails_fast_with_a_reason(dht: StartDht, coturn: int) -> None:
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [nodes[0].address]
    good = {"urls": f"turn:127.0.0.1:{coturn}", "username": USER, "credential": PASSWORD}
    bad = {**good, "credential": "wrong"}
    rtc.use_host_addresses([])
    alice = Peer("alice", boot, ice_servers=[bad])
    bob = Peer("bob", boot, ice_servers=[good])
    try:
        await alice.start()
        await bob.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(DialFailed) as caught:
            await alice.connect("bob")
        assert loop.time() - began < 3.0
        assert caught.value.reason == "no-candidates"
        assert "TURN credentials" in str(caught.value)
        assert (
            f"TURN server turn:127.0.0.1:{coturn} answers but gave no relay candidate: "
            "it refused the TURN credentials"
        ) in str(caught.value)
        # The other way round, the callee has no candidate: it refuses with the reason.
        with pytest.raises(DialFailed) as refused:
            await bob.connect("alice")
        assert refused.value.reason == "rejected"
        assert "the callee gathered no ICE candidates" in str(refused.value)
    finally:
        rtc.use_host_addresses(None)
        await asyncio.gather(alice.close(), bob.close(), return_exceptions=True)


@pytest.mark.timeout(60)
async def test_ephemeral_credentials_from_a_shared_secret(
    dht: StartDht, coturn_secret: int
) -> None:
    """coturn's use-auth-secret: each side mints its own username and password from the
    secret; a wrong secret is refused and named."""
    nodes = await dht(3)
    assert nodes[0].address is not None
    boot = [nodes[0].address]
    server = {"urls": f"turn:127.0.0.1:{coturn_secret}", "secret": SECRET}
    rtc.use_host_addresses([])
    alice = Peer("alice", boot, ice_servers=[server])
    bob = Peer("bob", boot, ice_servers=[server])
    mallory = Peer(None, boot, ice_servers=[{**server, "secret": "guessed"}])
    try:
        for p in (alice, bob, mallory):
            await p.start()
        session = await asyncio.wait_for(alice.connect("bob"), 20)
        assert session.path == ("relay", "relay")
        with pytest.raises(DialFailed) as caught:
            await mallory.connect("bob")
        assert caught.value.reason == "no-candidates"
        assert "refused the TURN credentials" in str(caught.value)
    finally:
        rtc.use_host_addresses(None)
        await asyncio.gather(alice.close(), bob.close(), mallory.close(), return_exceptions=True)
