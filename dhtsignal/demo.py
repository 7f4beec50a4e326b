"""The embedded demo: a whole serverless rendezvous on loopback, narrated.

It starts a bootstrap node and a few DHT nodes on 127.0.0.1, two peers ``alice``
and ``bob`` that join through the bootstrap node only, lists the room, has alice
dial bob by node ID, exchanges messages over the data channel, and prints a
timeline with the measured setup time split into its phases. Everything runs in
one process and sends traffic to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from dhtsignal.aio import rtc
from dhtsignal.aio.node import DhtNode
from dhtsignal.identity import Identity
from dhtsignal.peer import Peer
from dhtsignal.presence import room_peers

DHT_NODES = 8
ROOM = "demo"


async def run_demo(emit: Callable[[str], None] = print, *, nodes: int = DHT_NODES) -> int:
    """Run the demo; returns the process exit status (0 on success).

    :param emit: where the timeline lines go.
    :param nodes: DHT nodes to start besides the bootstrap node.
    """
    t0 = time.perf_counter()

    def say(text: str) -> None:
        emit(f"[{(time.perf_counter() - t0) * 1000:7.1f} ms] {text}")

    rtc.use_host_addresses(["127.0.0.1"])
    dht: list[DhtNode] = []
    try:
        boot = DhtNode(os.urandom(20))
        host, port = await boot.listen_udp("127.0.0.1", 0)
        dht.append(boot)
        say(f"bootstrap node listening on {host}:{port}")
        for _ in range(nodes):
            n = DhtNode(os.urandom(20))
            await n.listen_udp("127.0.0.1", 0)
            dht.append(n)
        await asyncio.gather(*(n.bootstrap([(host, port)]) for n in dht[1:]))
        say(f"{nodes} DHT nodes joined (no other server exists)")
        bootstrap = [f"{host}:{port}"]
        async with (
            # Throwaway keys: the demo's network lives for one run; nothing is written.
            Peer("alice", bootstrap, rooms=[ROOM], identity=Identity.generate()) as alice,
            Peer("bob", bootstrap, rooms=[ROOM], identity=Identity.generate()) as bob,
        ):
            say(f"alice and bob published signed presence in room {ROOM!r}")
            online = await room_peers(alice.node, ROOM)
            say("online in room: " + ", ".join(f"{p.node_id} ({p.key[:12]}…)" for p in online))

            async def echo() -> None:
                async for session in bob.incoming():
                    say(f"bob accepted a session from {session.remote_id}")
                    async for message in session:
                        text = message if isinstance(message, str) else message.decode()
                        say(f"bob received: {text!r}")
                        await session.send(f"echo: {text}")

            echo_task = asyncio.create_task(echo())
            try:
                say("alice dials 'bob' by node ID through the DHT")
                started = time.perf_counter()
                session = await alice.connect("bob")
                setup = (time.perf_counter() - started) * 1000
                path = " -> ".join(session.path) if session.path else "unknown"
                say(f"data channel open on both sides: setup {setup:.1f} ms, path {path}")
                if session.phases is not None:
                    p = session.phases
                    say(
                        "  resolve {:.1f} ms | signaling {:.1f} ms | ICE {:.1f} ms | "
                        "DTLS/SCTP {:.1f} ms".format(
                            *(
                                (x or 0.0) * 1000
                                for x in (p.resolve, p.signaling, p.ice, p.dtls_sctp)
                            )
                        )
                    )
                for text in ("hello bob", "no signaling server was harmed"):
                    await session.send(text)
                    reply = await session.recv(timeout=5)
                    say(f"alice received: {reply!r}")
                rtt = await session.ping()
                say(f"round trip over the data channel: {rtt * 1000:.2f} ms")
                await session.close()
            finally:
                echo_task.cancel()
        say("alice and bob signed off (tombstones published)")
        return 0
    finally:
        for n in dht:
            await n.close()
        rtc.use_host_addresses(None)


def main() -> int:
    """Entry point of ``python -m dhtsignal.demo`` (``make demo``)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        pass
    return asyncio.run(run_demo())


if __name__ == "__main__":
    raise SystemExit(main())
