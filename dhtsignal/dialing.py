"""The commands that open sessions: ``ping``, ``send`` and ``chat``, and the peer daemon's
session handling.

Each short-lived command runs an anonymous :class:`~dhtsignal.peer.Peer` (a throwaway
key, no presence, a client-mode DHT node), dials, does its job and closes. They
return an exit status and write their output through ``emit``; errors are raised as
:class:`~dhtsignal.errors.DhtSignalError` for the CLI to print on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from dhtsignal.errors import DhtTimeout, SessionClosed
from dhtsignal.peer import Peer, Session
from dhtsignal.wire.addr import Addr

log = logging.getLogger(__name__)

Emit = Callable[[str], None]
#: Seconds ``ping`` waits for one pong.
RTT_TIMEOUT = 5.0


def _ms(x: float | None) -> float:
    return round((x or 0.0) * 1000, 2)


async def ping(
    target: str,
    bootstrap: Sequence[str | Addr],
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
        try:
            rtts = [await session.ping(RTT_TIMEOUT) for _ in range(count)]
        except TimeoutError:
            raise DhtTimeout(f"round trip to {target} (no pong)", RTT_TIMEOUT) from None
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
            "nat": peer.nat,
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
        emit(f"path: {session.path[0]} -> {session.path[1]} (NAT here: {peer.nat})")
    for i, r in enumerate(rtts, 1):
        emit(f"rtt {i}: {_ms(r)} ms")
    if rtts:
        emit(f"rtt median {_ms(statistics.median(rtts))} ms over {len(rtts)}")
    return 0


async def send(
    target: str,
    text: str,
    bootstrap: Sequence[str | Addr],
    *,
    timeout: float = 5.0,
    emit: Emit = print,
    **peer_options: Any,
) -> int:
    """Deliver ``text`` to ``target``; returns once its application acknowledged it."""
    async with Peer(None, bootstrap, **peer_options) as peer:
        session = await peer.connect(target)
        await session.send(text)
        try:
            await session.flush(timeout)
        except TimeoutError:
            raise DhtTimeout(f"acknowledgement from {target}", timeout) from None
        emit(f"delivered to {target}")
        await session.close()
    return 0


async def chat(
    target: str,
    bootstrap: Sequence[str | Addr],
    *,
    emit: Emit = print,
    lines: AsyncIterator[str] | None = None,
    timeout: float = 5.0,
    **peer_options: Any,
) -> int:
    """An interactive chat: each line typed goes to ``target``, its messages are printed.

    Ends at the end of input (after the remote acknowledged every line, or ``timeout``
    seconds) or when the remote closes the session.

    :param lines: the lines to send (default: standard input).
    """
    async with Peer(None, bootstrap, **peer_options) as peer:
        session = await peer.connect(target)
        path = f" over {session.path[0]} -> {session.path[1]}" if session.path else ""
        emit(f"connected to {target}{path}; type messages, end with Ctrl-D")

        async def typing() -> None:
            async for line in lines if lines is not None else _stdin_lines():
                await session.send(line)
            with contextlib.suppress(TimeoutError):
                await session.flush(timeout)

        async def showing() -> None:
            async for message in session:
                emit(f"{target}: {_one_line(_text(message))}")

        tasks = {asyncio.create_task(typing()), asyncio.create_task(showing())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, SessionClosed):
                    raise exc
            if not session.is_open:
                emit(f"{target} closed the session")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()
    return 0


async def _stdin_lines() -> AsyncIterator[str]:
    """Lines of standard input without their newline, read without blocking the loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # a regular file: reading it never blocks for long
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    while raw := await reader.readline():
        yield raw.decode("utf-8", "replace").rstrip("\n")


def _text(message: bytes | str) -> str:
    return message if isinstance(message, str) else message.decode("utf-8", "replace")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one_line(text: str) -> str:
    """``text`` on one line and harmless to a terminal: backslash, newline, carriage
    return, tab and other control characters (escape sequences) are written as escapes."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m[0]) or f"\\x{ord(m[0]):02x}", text)


async def serve_sessions(peer: Peer, emit: Emit = print) -> None:
    """The peer daemon's session loop: print every message as
    ``message from NODE_ID: TEXT`` (pings and acknowledgements are answered by the
    session's control channel)."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: Session) -> None:
        async for message in session:
            emit(f"message from {session.remote_id}: {_one_line(_text(message))}")

    try:
        async for session in peer.incoming():
            log.info("session %s from %s", session.session_id.hex(), session.remote_id)
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
