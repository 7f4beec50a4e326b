"""The commands that open sessions: ``ping``, ``send`` and ``chat``, and the peer daemon's
session handling.

Each short-lived command runs an anonymous :class:`~dhtsignal.peer.Peer` (a throwaway
key, no presence, a client-mode DHT node), dials, does its job and closes. They
return an exit status and write their output through ``emit``; errors are raised as
:class:`~dhtsignal.errors.DhtSignalError` for the CLI to print on one line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from dhtsignal.peer import Peer, Session

log = logging.getLogger(__name__)

Emit = Callable[[str], None]


def _ms(x: float | None) -> float:
    return round((x or 0.0) * 1000, 2)


async def ping(
    target: str,
    bootstrap: Sequence[str],
    *,
    count: int = 3,
    as_json: bool = False,
    emit: Emit = print,
    **peer_options: Any,
) -> int:
    """Dial ``target``, report the setup split and ``count`` round trips.

    :returns: 0 (failures raise).
    """
    async with Peer(None, bootstrap, **peer_options) as peer:
        started = time.perf_counter()
        session = await peer.connect(target)
        setup = time.perf_counter() - started
        rtts = [await session.ping() for _ in range(count)]
        p = session.phases
        result = {
            "node_id": target,
            "setup_ms": _ms(setup),
            "phases_ms": {
                "resolve": _ms(p.resolve if p else None),
                "signaling": _ms(p.signaling if p else None),
                "ice": _ms(p.ice if p else None),
                "dtls_sctp": _ms(p.dtls_sctp if p else None),
            },
            "rtt_ms": [_ms(r) for r in rtts],
            "path": {"local": session.path[0], "remote": session.path[1]} if session.path else None,
        }
        await session.close()
    if as_json:
        emit(json.dumps(result))
        return 0
    ph = result["phases_ms"]
    assert isinstance(ph, dict)
    emit(
        f"connected to {target} in {result['setup_ms']} ms "
        f"(resolve {ph['resolve']} | signaling {ph['signaling']} | ICE {ph['ice']} | "
        f"DTLS/SCTP {ph['dtls_sctp']} ms)"
    )
    if session.path:
        emit(f"path: {session.path[0]} -> {session.path[1]}")
    for i, r in enumerate(rtts, 1):
        emit(f"rtt {i}: {_ms(r)} ms")
    if rtts:
        emit(f"rtt median {_ms(statistics.median(rtts))} ms over {len(rtts)}")
    return 0


async def send(
    target: str,
    text: str,
    bootstrap: Sequence[str],
    *,
    timeout: float = 5.0,
    emit: Emit = print,
    **peer_options: Any,
) -> int:
    """Deliver ``text`` to ``target``; returns once its application acknowledged it."""
    async with Peer(None, bootstrap, **peer_options) as peer:
        session = await peer.connect(target)
        await session.send(text)
        await session.flush(timeout)
        emit(f"delivered to {target}")
        await session.close()
    return 0


async def chat(
    target: str,
    bootstrap: Sequence[str],
    *,
    emit: Emit = print,
    **peer_options: Any,
) -> int:
    """An interactive chat: lines from stdin go to ``target``, its messages are printed."""
    loop = asyncio.get_running_loop()
    async with Peer(None, bootstrap, **peer_options) as peer:
        session = await peer.connect(target)
        emit(f"connected to {target}; type messages, Ctrl-D to quit")

        async def show() -> None:
            async for message in session:
                emit(f"{target}: {message if isinstance(message, str) else message.hex()}")

        shower = asyncio.create_task(show())
        try:
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                await session.send(line.rstrip("\n"))
        finally:
            shower.cancel()
            await session.close()
    return 0


async def serve_sessions(peer: Peer, emit: Emit = print) -> None:
    """The peer daemon's session loop: print every message as
    ``message from NODE_ID: TEXT`` (pings and acknowledgements are answered by the
    session's control channel)."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: Session) -> None:
        async for message in session:
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            emit(f"message from {session.remote_id}: {text}")

    try:
        async for session in peer.incoming():
            log.info("session %s from %s", session.session_id.hex(), session.remote_id)
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
