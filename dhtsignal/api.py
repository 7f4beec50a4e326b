"""The local API of a running daemon: JSON lines over a Unix socket in its data directory.

Theory of operation
-------------------
Every daemon (``peer`` and ``bootstrap``) serves :data:`SOCKET_FILE` in its data
directory, mode 0600 inside a 0700 directory: only its owner can talk to it. The
client commands (``send``, ``ping``, ``chat``, ``peers``, ``lookup``, ``status``,
``recv``) given ``--daemon DATA_DIR`` speak through it: they use the daemon's DHT node,
its node ID and its open sessions instead of starting a throwaway node.

Protocol (version :data:`PROTOCOL_VERSION`)
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
Each message is one JSON object on one line (UTF-8, ``\\n``-terminated, at most
:data:`MAX_LINE` bytes). The same objects are meant to travel later as WebSocket text
frames, one object per frame; nothing in them depends on the transport.

*Request* (client to daemon)::

    {"id": 7, "op": "send", "to": "bob", "text": "hi"}

``id`` is any JSON number or string the client chooses; it comes back in the response.

*Response* (daemon to client), exactly one per request, in any order::

    {"id": 7, "ok": true, "result": {...}}
    {"id": 7, "ok": false, "error": {"type": "DialFailed", "reason": "answer-timeout",
                                     "message": "..."}}

``type`` is the name of the :mod:`dhtsignal.errors` class; ``reason`` its machine
tag, or null.

*Event* (daemon to client, only after ``subscribe``)::

    {"event": "message", "from": "alice", "session": "9f..", "text": "hi"}
    {"event": "message", "from": "alice", "session": "9f..", "data": "<base64>"}
    {"event": "session-opened", "with": "alice", "session": "9f..", "incoming": true}
    {"event": "session-closed", "with": "alice", "session": "9f.."}
    {"event": "peer-joined", "room": "lab", "peer": {...presence as lookup --json...}}
    {"event": "peer-left", "room": "lab", "node_id": "carol", "key": "ab.."}

Operations (the fields of a request besides ``id`` and ``op``):

=============  ==============================================  ==============================
op             fields                                          result
=============  ==============================================  ==============================
``hello``      none                                            ``{"protocol", "kind",
                                                               "node_id"}``
``status``     none                                            the node's view (see
                                                               :meth:`DaemonApi.status`)
``lookup``     ``node_id``                                     presence (``lookup --json``)
``peers``      ``rooms`` (list)                                list of presences
``send``       ``to``, ``text`` or ``data`` (base64),          ``{"session", "reused"}``
               ``timeout`` (seconds to wait for the ack)
``connect``    ``to``                                          ``{"session", "reused",
                                                               "path"}``
``ping``       ``to``, ``count``                               as ``ping --json``, and
                                                               ``reused``
``subscribe``  ``events``: list of ``message``, ``session``,   ``{}``; events follow
               ``room``; ``rooms`` (list, for ``room``)
=============  ==============================================  ==============================

``send``, ``connect`` and ``ping`` reuse an open session with the peer (incoming or
outgoing) and dial one otherwise; a bootstrap daemon has no sessions and refuses them
(``UsageError``). Every message the daemon receives, on any session, goes to the
``message`` subscribers (and the peer daemon prints it as ``message from NODE_ID: TEXT``).

Bounds: at most :data:`MAX_CLIENTS` connections and :data:`MAX_INFLIGHT` requests in
progress per connection; a subscriber that lets :data:`MAX_QUEUED_EVENTS` events pile up
is disconnected. The socket is local, but every bound holds anyway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dhtsignal import errors
from dhtsignal.errors import ConfigError, DaemonError, DhtSignalError, UsageError

if TYPE_CHECKING:
    from dhtsignal.aio.node import DhtNode
    from dhtsignal.datadir import KnownPeers
    from dhtsignal.peer import Peer
    from dhtsignal.session import Session

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: The socket's name in the data directory.
SOCKET_FILE = "api.sock"
#: Longest line either side accepts, bytes.
MAX_LINE = 1 << 20
#: Connections served at once.
MAX_CLIENTS = 32
#: Requests in progress per connection.
MAX_INFLIGHT = 16
#: Events queued for one subscriber before it is disconnected.
MAX_QUEUED_EVENTS = 1024
#: Longest path of a Unix socket (``sun_path`` is 108 bytes on Linux, with its NUL).
MAX_SOCKET_PATH = 107
#: Rooms one subscription may watch.
MAX_WATCHED_ROOMS = 16

Event = dict[str, Any]
Emit = Callable[[str], None]


def socket_path(data_dir: Path) -> Path:
    """Where the daemon of ``data_dir`` serves its API."""
    return data_dir / SOCKET_FILE


def error_json(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of a failed response."""
    name = type(exc).__name__ if isinstance(exc, DhtSignalError) else "DhtSignalError"
    message = str(exc) if isinstance(exc, DhtSignalError) else f"internal error: {exc!r}"
    return {"type": name, "reason": getattr(exc, "reason", None), "message": message}


def message_event(session: Session, message: bytes | str) -> Event:
    """The ``message`` event of one received message."""
    ev: Event = {"event": "message", "from": session.remote_id, "session": session.session_id.hex()}
    if isinstance(message, str):
        ev["text"] = message
    else:
        ev["data"] = base64.b64encode(message).decode()
    return ev


# -- the daemon side ------------------------------------------------------------------------


class Subscriber:
    """One connection's event queue (bounded)."""

    def __init__(self, kinds: set[str], rooms: set[str]) -> None:
        self.kinds = kinds
        self.rooms = rooms
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(MAX_QUEUED_EVENTS + 1)
        self.overflowed = False

    def offer(self, kind: str, event: Event) -> None:
        if kind not in self.kinds or self.overflowed:
            return
        if kind == "room" and event.get("room") not in self.rooms:
            return
        if self.queue.qsize() >= MAX_QUEUED_EVENTS:
            self.overflowed = True
            self.queue.put_nowait(None)  # the writer ends the connection
            return
        self.queue.put_nowait(event)


class Events:
    """Fan-out of daemon events to the subscribed connections."""

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()

    def publish(self, kind: str, event: Event) -> None:
        """Queue ``event`` (of kind ``message``, ``session`` or ``room``) for its subscribers."""
        for sub in list(self.subscribers):
            sub.offer(kind, event)


class SessionHub:
    """The peer daemon's sessions, incoming and outgoing, by remote node ID.

    Reads every session it tracks: each message is written as ``message from NODE_ID:
    TEXT`` through ``emit`` and published as a ``message`` event.

    :param peer: the daemon's peer.
    :param events: where events go.
    :param emit: the daemon's stdout line writer.
    :param on_setup: called with the setup seconds of every session that opened.
    """

    def __init__(
        self,
        peer: Peer,
        events: Events,
        emit: Emit,
        on_setup: Callable[[float], None] | None = None,
    ) -> None:
        self.peer = peer
        self.events = events
        self.emit = emit
        self.on_setup = on_setup
        self.sessions: dict[bytes, Session] = {}
        self._dialing: dict[str, asyncio.Task[Session]] = {}
        self._readers: set[asyncio.Task[None]] = set()

    def find(self, node_id: str) -> Session | None:
        """An open session with ``node_id`` (the newest), if any; a self-certifying ID
        matches a session by its key, whatever label the session was opened under."""
        from dhtsignal.identity import self_certifying_id

        for session in reversed(list(self.sessions.values())):
            if session.is_open and (
                session.remote_id == node_id or self_certifying_id(session.remote_key) == node_id
            ):
                return session
        return None

    async def session_for(self, node_id: str) -> tuple[Session, bool]:
        """An open session with ``node_id``, and whether it was reused; dials one if none.

        Concurrent requests for the same peer share one dial.

        :raises PeerNotFound, DialFailed, ConnectFailed: as :meth:`Peer.connect`.
        """
        found = self.find(node_id)
        if found is not None:
            return found, True
        task = self._dialing.get(node_id)
        if task is None:  # owned here: cancelled by serve()'s end, failures go to the caller
            task = asyncio.create_task(self._dial(node_id), name="api-dial")
            task.add_done_callback(_read_outcome)
            self._dialing[node_id] = task
        return await asyncio.shield(task), False

    async def _dial(self, node_id: str) -> Session:
        try:
            began = time.monotonic()
            session = await self.peer.connect(node_id)
            self.track(session, incoming=False, setup=time.monotonic() - began)
            return session
        finally:
            self._dialing.pop(node_id, None)

    def track(self, session: Session, *, incoming: bool, setup: float | None = None) -> None:
        """Read ``session`` until it closes, publishing its messages."""
        self.sessions[session.session_id] = session
        if setup is None and session.phases is not None:
            setup = session.phases.total
        if setup is not None and self.on_setup is not None:
            self.on_setup(setup)
        self.events.publish(
            "session",
            {
                "event": "session-opened",
                "with": session.remote_id,
                "session": session.session_id.hex(),
                "incoming": incoming,
            },
        )
        task = asyncio.create_task(self._read(session), name="session-read")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, session: Session) -> None:
        from dhtsignal.terminal import one_line, text_of

        try:
            async for message in session:
                self.emit(f"message from {session.remote_id}: {one_line(text_of(message))}")
                self.events.publish("message", message_event(session, message))
        finally:
            self.sessions.pop(session.session_id, None)
            self.events.publish(
                "session",
                {
                    "event": "session-closed",
                    "with": session.remote_id,
                    "session": session.session_id.hex(),
                },
            )

    async def serve(self) -> None:
        """Track every incoming session until cancelled; then stop reading."""
        try:
            async for session in self.peer.incoming():
                log.info("session %s from %s", session.session_id.hex(), session.remote_id)
                self.track(session, incoming=True)
        finally:
            tasks = [*self._readers, *self._dialing.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def counts(self) -> dict[str, int]:
        """Sessions by state: ``open``, ``dialing``, ``answering``."""
        return {
            "open": sum(1 for s in self.sessions.values() if s.is_open),
            "dialing": self.peer.dialing,
            "answering": self.peer.pending_incoming,
        }


def _read_outcome(task: asyncio.Task[Any]) -> None:
    """Mark a shared dial's failure as seen (each caller gets it from the shield)."""
    if not task.cancelled():
        task.exception()


class DaemonApi:
    """The operations of the protocol, over one daemon's node (and peer, for a peer daemon).

    :param kind: ``peer`` or ``bootstrap``.
    :param node: the daemon's DHT node.
    :param known: the pins ``lookup`` and ``peers`` honour.
    :param hub: the peer daemon's sessions (None for a bootstrap daemon).
    :param node_id: the peer's node ID (None for a bootstrap daemon).
    :param key: the daemon's public key, hex.
    """

    def __init__(
        self,
        kind: str,
        node: DhtNode,
        known: KnownPeers,
        *,
        events: Events,
        hub: SessionHub | None = None,
        node_id: str | None = None,
        key: str = "",
    ) -> None:
        self.kind = kind
        self.node = node
        self.known = known
        self.events = events
        self.hub = hub
        self.node_id = node_id
        self.key = key
        self.started = time.monotonic()
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "hello": self._hello,
            "status": self._status,
            "lookup": self._lookup,
            "peers": self._peers,
            "send": self._send,
            "connect": self._connect,
            "ping": self._ping,
        }

    async def call(self, op: str, params: dict[str, Any]) -> Any:
        """Run one operation.

        :raises UsageError: unknown operation or bad parameters.
        :raises DhtSignalError: what the operation raised.
        """
        fn = self._ops.get(op)
        if fn is None:
            raise UsageError(f"unknown operation {op!r}")
        return await fn(params)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The node's own view: identity, addresses, table, storage, sessions, counters."""
        from dhtsignal.wire.addr import show_addr

        node = self.node
        stats = node.stats
        peer_stats = self.hub.peer.stats if self.hub is not None else {}
        dropped: dict[str, int] = {}
        refused: dict[str, int] = {}
        for name, n in [*stats.items(), *peer_stats.items()]:
            kind, _, reason = name.partition(":")
            if kind == "drop" and n:
                dropped[reason] = dropped.get(reason, 0) + n
            elif kind in ("refused", "incoming-failed", "closed") and n:
                refused[name] = refused.get(name, 0) + n
        return {
            "kind": self.kind,
            "node_id": self.node_id,
            "key": self.key,
            "routing_id": node.id.hex(),
            "address": show_addr(node.address) if node.address else None,
            "seen_as": [show_addr(a) for a, _ in node.observed.most_common(4)],
            "network": node.config.network,
            "client_mode": node.config.client_mode,
            "routing_contacts": len(node.table),
            "records": len(node.store),
            "record_bytes": node.store.total_bytes,
            "legacy_values": len(node.legacy),
            "listeners": len(node.subs),
            "sessions": self.hub.counts() if self.hub is not None else {},
            "rpc_requests": {
                k.split(":", 1)[1]: n for k, n in sorted(stats.items()) if k.startswith("rpc:")
            },
            "dropped": dict(sorted(dropped.items())),
            "refused": dict(sorted(refused.items())),
            "api": {"subscribers": len(self.events.subscribers)},
            "uptime_s": round(time.monotonic() - self.started, 1),
        }

    # -- operations ---------------------------------------------------------------------

    async def _hello(self, p: dict[str, Any]) -> Any:
        return {"protocol": PROTOCOL_VERSION, "kind": self.kind, "node_id": self.node_id}

    async def _status(self, p: dict[str, Any]) -> Any:
        return self.status()

    async def _lookup(self, p: dict[str, Any]) -> Any:
        from dhtsignal.presence import resolve

        info = await resolve(self.node, _str(p, "node_id"), self.known)
        return info.to_json()

    async def _peers(self, p: dict[str, Any]) -> Any:
        from dhtsignal.presence import PeerInfo, room_peers

        found: dict[str, PeerInfo] = {}
        for room in _rooms(p):
            for info in await room_peers(self.node, room, self.known):
                found.setdefault(info.key, info)
        peers = sorted(found.values(), key=lambda i: (i.node_id, i.key))
        return [i.to_json() for i in peers]

    def _sessions(self) -> SessionHub:
        if self.hub is None:
            raise UsageError(f"a {self.kind} daemon runs no sessions: use a peer daemon")
        return self.hub

    async def _send(self, p: dict[str, Any]) -> Any:
        hub = self._sessions()
        to = _str(p, "to")
        body: bytes | str
        if "data" in p:
            try:
                body = base64.b64decode(_str(p, "data"), validate=True)
            except ValueError:
                raise UsageError("'data' is not base64") from None
        else:
            body = _str(p, "text", empty=True)
        timeout = _seconds(p, "timeout", 5.0)
        session, reused = await hub.session_for(to)
        await session.send(body)
        try:
            await session.flush(timeout)
        except TimeoutError:
            raise errors.DhtTimeout(f"acknowledgement from {to}", timeout) from None
        return {"session": session.session_id.hex(), "reused": reused}

    async def _connect(self, p: dict[str, Any]) -> Any:
        session, reused = await self._sessions().session_for(_str(p, "to"))
        path = {"local": session.path[0], "remote": session.path[1]} if session.path else None
        return {"session": session.session_id.hex(), "reused": reused, "path": path}

    async def _ping(self, p: dict[str, Any]) -> Any:
        from dhtsignal.dialing import RTT_TIMEOUT, _ms

        to = _str(p, "to")
        count = p.get("count", 3)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 1000:
            raise UsageError("'count' must be a whole number from 0 to 1000")
        began = time.perf_counter()
        session, reused = await self._sessions().session_for(to)
        setup = time.perf_counter() - began
        try:
            rtts = [await session.ping(RTT_TIMEOUT) for _ in range(count)]
        except TimeoutError:
            raise errors.DhtTimeout(f"round trip to {to} (no pong)", RTT_TIMEOUT) from None
        ph = session.phases
        return {
            "node_id": to,
            "reused": reused,
            "setup_ms": 0.0 if reused else _ms(setup),
            "phases_ms": {
                "resolve": _ms(ph.resolve if ph and not reused else None),
                "signaling": _ms(ph.signaling if ph and not reused else None),
                "ice": _ms(ph.ice if ph and not reused else None),
                "dtls_sctp": _ms(ph.dtls_sctp if ph and not reused else None),
            },
            "rtt_ms": [_ms(r) for r in rtts],
            "path": {"local": session.path[0], "remote": session.path[1]} if session.path else None,
        }

    # -- room events --------------------------------------------------------------------

    async def watch_room(self, room: str, sub: Subscriber) -> None:
        """Offer ``room``'s joins and leaves to ``sub`` (the current members first)."""
        from dhtsignal.rooms import watch_room

        async for change in watch_room(self.node, room, self.known):
            sub.offer("room", change.to_json())


def _str(p: dict[str, Any], name: str, *, empty: bool = False) -> str:
    v = p.get(name)
    if not isinstance(v, str) or (not v and not empty):
        raise UsageError(f"'{name}' must be a non-empty string")
    return v


def _seconds(p: dict[str, Any], name: str, default: float) -> float:
    v = p.get(name, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v <= 300:
        raise UsageError(f"'{name}' must be a number of seconds in (0, 300]")
    return float(v)


def _rooms(p: dict[str, Any]) -> list[str]:
    from dhtsignal.dht.records import check_label

    rooms = p.get("rooms")
    if (
        not isinstance(rooms, list)
        or not rooms
        or len(rooms) > MAX_WATCHED_ROOMS
        or not all(isinstance(r, str) for r in rooms)
    ):
        raise UsageError(f"'rooms' must be a list of 1 to {MAX_WATCHED_ROOMS} room names")
    for r in rooms:
        try:
            check_label(r, "room")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return list(rooms)


class ApiServer:
    """Serves a :class:`DaemonApi` on a Unix socket (see the module docstring).

    :param api: the operations.
    :param path: the socket's path.
    """

    def __init__(self, api: DaemonApi, path: Path) -> None:
        self.api = api
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> bool:
        """Bind the socket (a stale one left by a crash is replaced: the data directory
        is locked, so no live daemon owns it); returns False, logged, if it cannot."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            log.warning(
                "local API disabled: socket path %s is over %d bytes", self.path, MAX_SOCKET_PATH
            )
            return False
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_LINE
            )
            os.chmod(self.path, 0o600)
        except OSError as exc:
            log.warning("local API disabled: cannot serve %s: %s", self.path, exc)
            return False
        log.info("local API on %s", self.path)
        return True

    async def close(self) -> None:
        """Stop serving, end every connection, remove the socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("local API: over %d connections, refusing one", MAX_CLIENTS)
            writer.close()
            return
        self._clients.add(task)
        try:
            await _Connection(self.api, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() ends the connection; asyncio's stream callback would log a task that
            # ends cancelled as an error, so it ends normally.
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Connection:
    """One client connection: requests in, responses and events out."""

    def __init__(
        self, api: DaemonApi, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.api = api
        self.reader = reader
        self.writer = writer
        self.out: asyncio.Queue[Event | None] = asyncio.Queue()
        self.sub: Subscriber | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self.watching: dict[str, asyncio.Task[None]] = {}
        self._forwarding = False  # events flow once the subscribe response is written

    async def run(self) -> None:
        writing = asyncio.create_task(self._write(), name="api-write")
        try:
            while True:
                try:
                    line = await self.reader.readline()
                except ValueError:  # over the line limit
                    self.out.put_nowait(_failure(None, UsageError(f"line over {MAX_LINE} bytes")))
                    break
                if not line:
                    break
                self._request(line)
                if writing.done():
                    break
        finally:
            for t in [*self.inflight, *self.watching.values()]:
                t.cancel()
            await asyncio.gather(*self.inflight, *self.watching.values(), return_exceptions=True)
            if self.sub is not None:
                self.api.events.subscribers.discard(self.sub)
            self.out.put_nowait(None)
            await asyncio.gather(writing, return_exceptions=True)

    def _request(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            self.out.put_nowait(_failure(None, UsageError("not a JSON line")))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            self.out.put_nowait(_failure(None, UsageError("a request is an object with 'op'")))
            return
        rid = msg.get("id")
        if len(self.inflight) >= MAX_INFLIGHT:
            self.out.put_nowait(_failure(rid, UsageError(f"over {MAX_INFLIGHT} requests")))
            return
        if msg["op"] == "subscribe":
            self._subscribe(rid, msg)
            return
        task = asyncio.create_task(self._run(rid, msg["op"], msg), name="api-op")
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    def _subscribe(self, rid: Any, msg: dict[str, Any]) -> None:
        kinds = msg.get("events", ["message"])
        if not isinstance(kinds, list) or not set(kinds) <= {"message", "session", "room"}:
            self.out.put_nowait(
                _failure(rid, UsageError("'events' must list message, session or room"))
            )
            return
        rooms: set[str] = set()
        if "room" in kinds:
            try:
                rooms = set(_rooms(msg))
            except UsageError as exc:
                self.out.put_nowait(_failure(rid, exc))
                return
        if self.sub is None:
            self.sub = Subscriber(set(kinds), rooms)
            self.api.events.subscribers.add(self.sub)
            self.out.put_nowait({"id": rid, "ok": True, "result": {}})
            self.out.put_nowait({"forward": True})  # start forwarding events
        else:
            self.sub.kinds |= set(kinds)
            self.sub.rooms |= rooms
            self.out.put_nowait({"id": rid, "ok": True, "result": {}})
        sub = self.sub
        for room in rooms:
            if room not in self.watching and len(self.watching) < MAX_WATCHED_ROOMS:
                self.watching[room] = asyncio.create_task(
                    self.api.watch_room(room, sub), name="room-watch"
                )

    async def _run(self, rid: Any, op: str, msg: dict[str, Any]) -> None:
        try:
            result = await self.api.call(op, msg)
        except DhtSignalError as exc:
            self.out.put_nowait(_failure(rid, exc))
        except Exception as exc:  # an API call must never end the daemon
            log.warning("local API: %s failed: %r", op, exc)
            self.out.put_nowait(_failure(rid, exc))
        else:
            self.out.put_nowait({"id": rid, "ok": True, "result": result})

    async def _write(self) -> None:
        events: asyncio.Task[Event | None] | None = None
        responses: asyncio.Task[Event | None] = asyncio.create_task(self.out.get())
        try:
            while True:
                waiting: set[asyncio.Task[Event | None]] = {responses}
                if events is None and self.sub is not None and self._forwarding:
                    events = asyncio.create_task(self.sub.queue.get())
                if events is not None:
                    waiting.add(events)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if responses in done:
                    item = responses.result()
                    if item is None:
                        return
                    if item.get("forward"):
                        self._forwarding = True
                    else:
                        await self._send(item)
                    responses = asyncio.create_task(self.out.get())
                if events is not None and events in done:
                    ev = events.result()
                    events = None
                    if ev is None:  # the subscriber fell too far behind
                        log.warning("local API: a subscriber fell behind; disconnecting it")
                        return
                    await self._send(ev)
        finally:
            responses.cancel()
            if events is not None:
                events.cancel()

    async def _send(self, item: Event) -> None:
        self.writer.write(json.dumps(item, separators=(",", ":")).encode() + b"\n")
        await self.writer.drain()


def _failure(rid: Any, exc: BaseException) -> Event:
    return {"id": rid, "ok": False, "error": error_json(exc)}


# -- the client side ------------------------------------------------------------------------


class ApiClient:
    """A connection to a daemon's local API.

    Use :func:`open_client`; :meth:`call` sends one request and awaits its response,
    :meth:`events` yields the events after :meth:`subscribe`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(), name="api-client")

    async def _pump(self) -> None:
        try:
            while line := await self._reader.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "event" in msg:
                    self._events.put_nowait(msg)
                    continue
                fut = self._waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
                if fut is None or fut.done():
                    continue
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    fut.set_exception(remote_error(msg.get("error")))
        except (ConnectionError, ValueError):
            pass
        finally:
            gone = DaemonError("DaemonGone", None, "the daemon closed the connection")
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(gone)
            self._waiting.clear()
            self._events.put_nowait(None)

    async def call(self, op: str, **params: Any) -> Any:
        """Send one request; returns its result.

        :raises DaemonError: the daemon refused or failed it (its error's type and reason
            are kept), or it closed the connection.
        """
        if self._task.done():
            raise DaemonError("DaemonGone", None, "the daemon closed the connection")
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        line = json.dumps({"id": rid, "op": op, **params}, separators=(",", ":"))
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()
        return await fut

    async def subscribe(self, events: list[str], rooms: list[str] | None = None) -> None:
        """Ask for events of the given kinds (``message``, ``session``, ``room``)."""
        params: dict[str, Any] = {"events": events}
        if rooms:
            params["rooms"] = rooms
        await self.call("subscribe", **params)

    async def events(self) -> AsyncIterator[Event]:
        """The events, until the daemon closes the connection."""
        while (ev := await self._events.get()) is not None:
            yield ev

    async def close(self) -> None:
        """Close the connection."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def remote_error(err: object) -> DaemonError:
    """The :class:`DaemonError` for a response's ``error`` object."""
    if not isinstance(err, dict):
        return DaemonError("DhtSignalError", None, "the daemon failed the request")
    kind = err.get("type")
    reason = err.get("reason")
    return DaemonError(
        kind if isinstance(kind, str) else "DhtSignalError",
        reason if isinstance(reason, str) else None,
        str(err.get("message", "")),
    )


@contextlib.asynccontextmanager
async def open_client(data_dir: Path) -> AsyncIterator[ApiClient]:
    """Connect to the daemon of ``data_dir``.

    :raises ConfigError: no daemon serves there (the ``daemon`` setting names it).
    """
    path = socket_path(data_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    except FileNotFoundError:
        raise ConfigError(
            "daemon", f"no daemon serves {data_dir} (no {SOCKET_FILE}: is the daemon running?)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            "daemon", f"cannot reach the daemon at {path}: {exc.strerror or exc}"
        ) from None
    client = ApiClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


__all__ = [
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "SOCKET_FILE",
    "ApiClient",
    "ApiServer",
    "DaemonApi",
    "Events",
    "SessionHub",
    "open_client",
    "remote_error",
    "socket_path",
]
