"""The client commands run through a running daemon (``--daemon DATA_DIR``).

Each function connects to the daemon's local API (:mod:`dhtsignal.api`), sends its
requests, prints what the command prints without a daemon (same text and JSON shapes),
and returns the exit status. Errors are raised as
:class:`~dhtsignal.errors.DhtSignalError` for the CLI to print on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from dhtsignal.api import ApiClient, open_client
from dhtsignal.errors import DaemonError

Emit = Callable[[str], None]


def _addr(a: Sequence[Any]) -> str:
    host, port = a[0], a[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def peer_table(peers: Sequence[dict[str, Any]]) -> str:
    """An aligned text table of presences as JSON objects (``peers``' text output)."""
    header = ("NODE_ID", "KEY", "ROOMS", "ADDRESSES", "EXPIRES_IN")
    rows = [header] + [
        (
            str(p["node_id"]),
            str(p["key"])[:16],
            ",".join(p["rooms"]),
            " ".join(_addr(a) for a in p["addresses"]) or "-",
            f"{p['expires_in']:.0f}s",
        )
        for p in peers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


async def peers(data_dir: Path, rooms: Sequence[str], as_json: bool, out: Emit, err: Emit) -> int:
    """``peers --daemon``."""
    async with open_client(data_dir) as api:
        found = await api.call("peers", rooms=list(rooms))
    if as_json:
        out(json.dumps(found))
    elif not found:
        err(f"no peers online in {', '.join(rooms)}")
    else:
        out(peer_table(found))
    return 0


async def lookup(data_dir: Path, node_id: str, as_json: bool, out: Emit) -> int:
    """``lookup --daemon``."""
    async with open_client(data_dir) as api:
        info = await api.call("lookup", node_id=node_id)
    if as_json:
        out(json.dumps(info))
        return 0
    fields = [
        ("node_id", info["node_id"]),
        ("key", info["key"]),
        ("self_id", info["self_id"]),
        ("rooms", ", ".join(info["rooms"]) or "-"),
        ("addresses", " ".join(_addr(a) for a in info["addresses"]) or "-"),
        ("expires_in", f"{info['expires_in']:.1f} s"),
    ]
    out("\n".join(f"{k:<11} {v}" for k, v in fields))
    return 0


async def status(data_dir: Path, as_json: bool, out: Emit) -> int:
    """``status --daemon``: the daemon's own view."""
    async with open_client(data_dir) as api:
        st = await api.call("status")
    if as_json:
        out(json.dumps(st))
        return 0
    out(format_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    """``status --daemon``'s text output."""

    def pairs(d: dict[str, Any]) -> str:
        return " ".join(f"{k}={v}" for k, v in d.items()) or "-"

    rows = [
        ("kind", st["kind"]),
        ("node_id", st.get("node_id") or "-"),
        ("key", st.get("key") or "-"),
        ("routing_id", st["routing_id"]),
        ("address", st.get("address") or "-"),
        ("seen_as", " ".join(st.get("seen_as") or []) or "-"),
        ("contacts", st["routing_contacts"]),
        ("records", f"{st['records']} ({st['record_bytes']} bytes)"),
        ("listeners", st["listeners"]),
        ("sessions", pairs(st.get("sessions") or {})),
        ("rpc", pairs(st.get("rpc_requests") or {})),
        ("dropped", pairs(st.get("dropped") or {})),
        ("refused", pairs(st.get("refused") or {})),
        ("uptime", f"{st['uptime_s']} s"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


async def send(data_dir: Path, target: str, text: str, timeout: float, out: Emit) -> int:
    """``send --daemon``: through the daemon's session with ``target`` (dialed if none)."""
    async with open_client(data_dir) as api:
        await api.call("send", to=target, text=text, timeout=timeout)
    out(f"delivered to {target}")
    return 0


async def ping(data_dir: Path, target: str, count: int, as_json: bool, out: Emit) -> int:
    """``ping --daemon``: round trips over the daemon's session with ``target``."""
    async with open_client(data_dir) as api:
        result = await api.call("ping", to=target, count=count)
    if as_json:
        out(json.dumps(result))
        return 0
    ph = result["phases_ms"]
    if result.get("reused"):
        out(f"reusing the daemon's open session with {target}")
    else:
        out(
            f"connected to {target} in {result['setup_ms']} ms "
            f"(resolve {ph['resolve']} | signaling {ph['signaling']} | ICE {ph['ice']} | "
            f"DTLS/SCTP {ph['dtls_sctp']} ms)"
        )
    path = result.get("path")
    if path:
        out(f"path: {path['local']} -> {path['remote']}")
    rtts = result["rtt_ms"]
    for i, r in enumerate(rtts, 1):
        out(f"rtt {i}: {r} ms")
    if rtts:
        out(f"rtt median {round(statistics.median(rtts), 2)} ms over {len(rtts)}")
    return 0


def format_message(ev: dict[str, Any]) -> str:
    """A ``message`` event as the daemon prints it: ``message from NODE_ID: TEXT``."""
    from dhtsignal.terminal import one_line

    body = ev.get("text")
    if body is None:
        body = f"<{len(str(ev.get('data', '')))} base64 chars of binary>"
    return f"message from {ev.get('from')}: {one_line(str(body))}"


async def recv(data_dir: Path, as_json: bool, out: Emit) -> int:
    """``recv --daemon``: print every message the daemon receives until it stops.

    :raises DaemonError: the daemon closed the connection (it stopped).
    """
    async with open_client(data_dir) as api:
        await api.subscribe(["message"])
        async for ev in api.events():
            if ev.get("event") != "message":
                continue
            out(json.dumps(ev) if as_json else format_message(ev))
    raise DaemonError("DaemonGone", None, "the daemon closed the connection (it stopped)")


async def chat(
    data_dir: Path,
    target: str,
    out: Emit,
    lines: AsyncIterator[str] | None = None,
    timeout: float = 5.0,
) -> int:
    """``chat --daemon``: lines typed go to ``target`` through the daemon; its messages
    (on any of the daemon's sessions with it) are printed. Ends at the end of input (once
    every line is acknowledged) or when the session closes."""
    from dhtsignal.terminal import one_line, stdin_lines

    async with open_client(data_dir) as api:
        await api.subscribe(["message", "session"])
        opened = await api.call("connect", to=target)
        path = opened.get("path")
        over = f" over {path['local']} -> {path['remote']}" if path else ""
        out(f"connected to {target}{over} through the daemon; type messages, end with Ctrl-D")
        session = opened["session"]

        async def typing(api: ApiClient) -> None:
            async for line in lines if lines is not None else stdin_lines():
                await api.call("send", to=target, text=line, timeout=timeout)

        async def showing(api: ApiClient) -> None:
            async for ev in api.events():
                if ev.get("event") == "message" and ev.get("from") == target:
                    out(f"{target}: {one_line(str(ev.get('text', '')))}")
                elif ev.get("event") == "session-closed" and ev.get("session") == session:
                    out(f"{target} closed the session")
                    return

        tasks = {asyncio.create_task(typing(api)), asyncio.create_task(showing(api))}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None:
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
    return 0


__all__ = [
    "chat",
    "format_status",
    "lookup",
    "peer_table",
    "peers",
    "ping",
    "recv",
    "send",
    "status",
]


def format_room_event(ev: dict[str, Any]) -> str:
    """A room event as ``peers --watch`` prints it."""
    if ev.get("event") == "peer-joined":
        p = ev["peer"]
        addrs = " ".join(_addr(a) for a in p["addresses"]) or "-"
        return f"joined {ev['room']} {p['node_id']} key={str(p['key'])[:16]} {addrs}"
    return f"left {ev.get('room')} {ev.get('node_id')} ({ev.get('why')})"


async def watch_peers(
    data_dir: Path | None, rooms: Sequence[str], as_json: bool, out: Emit, **client: Any
) -> int:
    """``peers --watch``: a line per join and leave in ``rooms`` as the DHT pushes them,
    through the daemon of ``data_dir``, or else a client node of its own (``client``:
    ``settings`` and ``known`` for :func:`~dhtsignal.daemon.client_node`).

    Runs until interrupted.

    :raises DaemonError: the daemon stopped.
    """

    def show(ev: dict[str, Any]) -> None:
        out(json.dumps(ev) if as_json else format_room_event(ev))

    if data_dir is not None:
        async with open_client(data_dir) as api:
            await api.subscribe(["room"], list(rooms))
            async for ev in api.events():
                show(ev)
        raise DaemonError("DaemonGone", None, "the daemon closed the connection (it stopped)")

    from dhtsignal.daemon import client_node
    from dhtsignal.rooms import watch_room

    settings = client["settings"]
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def one(node: Any, room: str) -> None:
        async for change in watch_room(node, room, client.get("known")):
            events.put_nowait(change.to_json())

    async with client_node(settings, settings.bootstrap) as node:
        tasks = [asyncio.create_task(one(node, r)) for r in rooms]
        try:
            while True:
                getting = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait([getting, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if getting not in done:
                    getting.cancel()
                    for t in tasks:
                        if t.done() and t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
                    return 0
                show(getting.result())
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
