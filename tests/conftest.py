"""Shared fixtures: ICE on loopback, small DHT networks and peers on real UDP sockets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import pytest

from dhtsignal.aio import rtc
from dhtsignal.aio.node import DhtNode
from dhtsignal.dht.params import NodeConfig
from dhtsignal.peer import Peer
from dhtsignal.wire.addr import Addr


class StartDht(Protocol):
    """Starts ``n`` nodes on 127.0.0.1; all but the first join through the first (or
    through ``join`` if given). Returns them in start order."""

    def __call__(
        self,
        n: int = 3,
        *,
        node_class: type[DhtNode] = DhtNode,
        config: NodeConfig | None = None,
        join: Addr | None = None,
    ) -> Awaitable[list[DhtNode]]: ...


StartPeer = Callable[..., Awaitable[Peer]]


@pytest.fixture(autouse=True)
def data_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own ``$XDG_DATA_HOME``: a ``Peer`` with a node ID and no data
    directory keeps its key there (never in the home directory of whoever runs the tests)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture
def loopback_ice() -> Iterator[None]:
    """aioice never gathers loopback: make 127.0.0.1 the only host address, then restore."""
    rtc.use_host_addresses(["127.0.0.1"])
    try:
        yield
    finally:
        rtc.use_host_addresses(None)


@pytest.fixture
async def dht() -> AsyncIterator[StartDht]:
    """A factory of DHT nodes on 127.0.0.1; every node it started is closed in teardown."""
    started: list[DhtNode] = []

    async def start(
        n: int = 3,
        *,
        node_class: type[DhtNode] = DhtNode,
        config: NodeConfig | None = None,
        join: Addr | None = None,
    ) -> list[DhtNode]:
        nodes: list[DhtNode] = []
        for _ in range(n):
            node = node_class(os.urandom(20), config)
            started.append(node)
            await node.listen_udp("127.0.0.1", 0)
            nodes.append(node)
        first = join or nodes[0].address
        assert first is not None
        joining = nodes if join is not None else nodes[1:]
        joined = await asyncio.gather(*(node.bootstrap([first]) for node in joining))
        assert all(joined), f"a node could not join through {first}: {joined}"
        return nodes

    try:
        yield start
    finally:
        await asyncio.gather(*(node.close() for node in started))


@pytest.fixture
async def peers(dht: StartDht, loopback_ice: None) -> AsyncIterator[StartPeer]:
    """A factory of started :class:`Peer` objects (same arguments as ``Peer``).

    Depends on ``dht`` so that peers close (and sign off) while the DHT still runs.
    Peers are closed together in teardown, even if a test closed some already.
    """
    started: list[Peer] = []

    async def start(node_id: str | None, bootstrap: Sequence[Any], **kwargs: Any) -> Peer:
        peer = Peer(node_id, bootstrap, **kwargs)
        started.append(peer)
        await peer.start()
        return peer

    try:
        yield start
    finally:
        results = await asyncio.gather(*(p.close() for p in started), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
