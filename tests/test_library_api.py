"""The library API added for local programs: room events as an async iterator, Session as
an async context manager, and the packaging split (WebRTC as an extra).

Peers run in this process on real UDP sockets and real aiortc connections on 127.0.0.1;
the packaging test runs the CLI as separate processes with aiortc made unimportable.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from conftest import StartDht, StartPeer
from test_cli import Launcher

import dhtsignal
from dhtsignal.rooms import PeerJoined, PeerLeft, RoomEvent

STEP = 10.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
async def boot(dht: StartDht) -> list[str]:
    nodes = await dht(3)
    assert nodes[0].address is not None
    host, port = nodes[0].address
    return [f"{host}:{port}"]


async def _next(events: AsyncIterator[RoomEvent]) -> RoomEvent:
    return await asyncio.wait_for(anext(events), STEP)


@pytest.mark.timeout(30)
async def test_room_events_announce_joins_and_clean_leaves(
    peers: StartPeer, boot: list[str]
) -> None:
    alice = await peers("alice", boot, rooms=["hall"])
    events = alice.room_events("hall")
    try:
        first = await _next(events)  # the members already there come first
        assert isinstance(first, PeerJoined) and first.peer.node_id == "alice"
        carol = await peers("carol", boot, rooms=["hall"])
        joined = await _next(events)
        assert isinstance(joined, PeerJoined) and joined.room == "hall"
        assert joined.peer.node_id == "carol" and joined.peer.key == carol.public_key.hex()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await carol.close()  # signs off: tombstones
        left = await _next(events)
        assert left == PeerLeft("hall", "carol", carol.public_key.hex(), "signed-off")
        assert loop.time() - began < 2.0
    finally:
        await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
async def test_session_is_an_async_context_manager(peers: StartPeer, boot: list[str]) -> None:
    alice = await peers("alice", boot)
    bob = await peers("bob", boot)
    async with await asyncio.wait_for(alice.connect("bob"), STEP) as session:
        incoming = await asyncio.wait_for(anext(bob.incoming()), STEP)
        await session.send("inside")
        assert await incoming.recv(STEP) == "inside"
    assert session.is_closed


def test_every_public_error_type_is_exported() -> None:
    import inspect

    from dhtsignal import errors

    public = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    assert public <= set(dhtsignal.__all__)
    assert {"PeerNotFound", "NodeIdTaken", "ConnectFailed", "PinnedKeyChanged", "DaemonError"} <= (
        public
    )


def test_webrtc_is_an_extra_that_the_test_install_includes() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("aiortc") for d in meta["dependencies"])
    assert any(d.startswith("aiortc") for d in meta["optional-dependencies"]["webrtc"])
    assert any(d.startswith("aiortc") for d in meta["optional-dependencies"]["test"])
    assert any(d.startswith("prometheus_client") for d in meta["dependencies"])


def test_the_image_health_check_follows_the_configured_port() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    check = next(ln for ln in dockerfile.splitlines() if ln.strip().startswith("CMD"))
    assert '"--daemon", "/data"' in check and "4000" not in check
    assert "[webrtc]" not in dockerfile.split("HEALTHCHECK")[0].split("FROM python:3.11-slim\n")[-1]


#: Makes aiortc, aioice and PyAV unimportable, as in an install without the extra.
_NO_WEBRTC = """
import importlib.abc, sys

class _NoWebRTC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("aiortc", "aioice", "av"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoWebRTC())
"""


@pytest.fixture()
def no_webrtc(tmp_path: Path) -> Iterator[Launcher]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_WEBRTC)
    lau = Launcher(tmp_path)
    lau.env["PYTHONPATH"] = f"{site}:{ROOT}"
    try:
        yield lau
    finally:
        lau.close()


def test_a_bootstrap_node_runs_without_webrtc(no_webrtc: Launcher) -> None:
    lau = no_webrtc
    probe = lau.run("status", "--target", "127.0.0.1:9", "--rpc-retries", "0")
    assert "Traceback" not in probe.stderr
    b0 = lau.start(
        "b0", "bootstrap", "--listen", "127.0.0.1:0", "--data-dir", str(lau.workdir / "b0")
    )
    entry = b0.ready()["addr"]
    peers = lau.run("peers", "--bootstrap", entry, "--json")
    assert peers.returncode == 0 and peers.stdout.strip() == "[]", peers.stderr
    status = lau.run("status", "--daemon", str(lau.workdir / "b0"), "--json")
    assert status.returncode == 0, status.stderr
    peer = ("peer", "--node-id", "x", "--data-dir", str(lau.workdir / "x"))
    for command in (("ping", "bob"), ("send", "bob", "hi"), ("chat", "bob"), peer):
        res = lau.run(*command, "--bootstrap", entry)
        assert res.returncode == 1, res.stderr
        assert "pip install 'dhtsignal[webrtc]'" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    imported = lau.run("peers", "--bootstrap", entry)  # no traceback anywhere
    assert "Traceback" not in imported.stderr + b0.stderr()


@pytest.mark.timeout(30)
async def test_room_events_announce_a_crashed_member_when_its_record_expires(
    peers: StartPeer, boot: list[str]
) -> None:
    alice = await peers("alice", boot, rooms=["hall"])
    dave = await peers("dave", boot, rooms=["hall"], presence_ttl=2.0)
    events = alice.room_events("hall")
    try:
        seen = {e.peer.node_id for e in [await _next(events), await _next(events)]}  # type: ignore[union-attr]
        assert seen == {"alice", "dave"}
        dave.presence = None  # a crash: no tombstones, no refresh
        await dave.close()
        left = await _next(events)
        assert left == PeerLeft("hall", "dave", dave.public_key.hex(), "expired")
    finally:
        await events.aclose()  # type: ignore[attr-defined]
