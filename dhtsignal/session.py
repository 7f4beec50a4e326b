"""A data-channel session with one remote peer, and its control channel.

Theory of operation
-------------------
A :class:`Session` wraps one open :class:`~dhtsignal.aio.rtc.PeerConnection` and its two
pre-negotiated data channels (:func:`~dhtsignal.aio.rtc.open_channels`):

- ``data`` (SCTP stream 0) carries the application's messages, ``bytes`` or ``str``,
  reliable and ordered unless the dial asked otherwise. Received messages wait in a queue
  until the application reads them (:meth:`Session.recv` or ``async for``); past
  ``max_unread_bytes`` unread the session is closed rather than grow without bound or
  drop messages of a reliable channel unseen (counted as ``closed:unread-limit``).
- ``ctl`` (SCTP stream 1, always reliable and ordered) carries JSON control messages
  ``{"t": TAG, "n": INT}``: ``ping``/``pong`` measure a round trip (:meth:`Session.ping`);
  ``sync``/``synced`` tell a sender that the remote *application* has taken its first
  ``n`` messages off the queue's input (:meth:`Session.flush`). A malformed control
  message is counted as ``ctl-malformed`` and dropped. ``bind`` (``{"t": "bind", "n": 0,
  "sig": HEX}``) carries the remote's channel-binding signature
  (:mod:`dhtsignal.signaling.binding`): :meth:`Session.send_binding` sends ours as soon as
  the channels are open, :attr:`Session.remote_binding` completes with the remote's and
  :meth:`Session.binding_holds` checks it. The peer hands a session to the application
  only after that check; until then nothing received is read by anyone.

The session knows nothing of the peer that made it: it reports through three callbacks,
``on_closed`` (once, when it closes for any reason), ``count`` (a counter name) and
``spawn`` (an owned background task, for closing the connection from a callback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from dhtsignal.aio import rtc
from dhtsignal.aio.node import ignore_outcome
from dhtsignal.errors import DhtSignalError, SessionClosed
from dhtsignal.identity import Identity
from dhtsignal.signaling import binding
from dhtsignal.signaling.inbox import ChannelOptions
from dhtsignal.signaling.session import Phases

log = logging.getLogger(__name__)

DEFAULT_MAX_UNREAD_BYTES = 16 * 1024 * 1024
"""Bytes (characters for text) received and not yet read before the session is closed."""
MAX_PENDING_SYNCS = 64
"""Remote ``sync`` requests for messages not yet received that are remembered."""


class Session:
    """A data-channel session with one remote peer.

    Iterate it for incoming messages (``bytes`` or ``str``); the iteration ends
    when the session closes.

    :param pc: the connection, its channels not yet created.
    :param session_id: 8 bytes naming the session.
    :param remote_key: the remote's Ed25519 key.
    :param remote_id: the remote's node ID (label or self-certifying ID).
    :param options: the ``data`` channel's options.
    :param on_closed: called once with the session when it closes.
    :param count: called with a counter name for each event worth counting.
    :param spawn: runs a coroutine as an owned background task.
    :param max_unread_bytes: the bound on received and unread message bytes.
    :param identity: ours; if given, :meth:`send_binding` runs as soon as ``ctl`` opens
        (in aiortc's callback, a few loop turns before the peer's own code would run).
    """

    def __init__(
        self,
        pc: Any,
        session_id: bytes,
        remote_key: bytes,
        remote_id: str,
        options: ChannelOptions,
        *,
        on_closed: Callable[[Session], None],
        count: Callable[[str], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        max_unread_bytes: int = DEFAULT_MAX_UNREAD_BYTES,
        identity: Identity | None = None,
    ) -> None:
        self.session_id = session_id
        self.remote_key = remote_key
        self.remote_id = remote_id
        self.options = options
        self.phases: Phases | None = None
        """Where the setup time went (set when the session opened)."""
        self.path: tuple[str, str] | None = None
        """The nominated candidate pair's (local, remote) types."""
        self.max_unread_bytes = max_unread_bytes
        self._pc = pc
        self._on_closed_cb = on_closed
        self._count = count
        self._spawn = spawn
        self.data, self.ctl = rtc.open_channels(
            pc, options.ordered, options.max_retransmits, options.max_packet_life_time
        )
        self._inbox: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._buffered = 0  # size of the messages received and not yet read
        self._received = 0
        self._sent = 0
        self._sync_waiters: dict[int, asyncio.Future[None]] = {}
        self._pending_syncs: list[int] = []
        self._pongs: dict[int, asyncio.Future[float]] = {}
        self._ping_seq = 0
        self._closed = asyncio.Event()
        self.remote_binding: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        """Completes with the remote's channel-binding signature (fails with
        :class:`~dhtsignal.errors.SessionClosed` if the session closes first)."""
        self.remote_binding.add_done_callback(ignore_outcome)
        self._fingerprints: tuple[bytes, bytes] | None = None
        if identity is not None:
            self.ctl.on("open", lambda: self._bind_early(identity))
        self.data.on("message", self._on_data)
        self.ctl.on("message", self._on_ctl)
        self.data.on("close", self._on_close)
        pc.on("connectionstatechange", self._on_state)

    @property
    def pc(self) -> Any:
        """The underlying :class:`~dhtsignal.aio.rtc.PeerConnection`."""
        return self._pc

    @property
    def is_open(self) -> bool:
        """Whether messages can be sent."""
        return not self._closed.is_set() and self.data.readyState == "open"

    @property
    def is_closed(self) -> bool:
        """Whether the session has closed (it never reopens)."""
        return self._closed.is_set()

    def _on_state(self) -> None:
        if self._pc.connectionState in ("failed", "closed"):
            self._on_close()

    def _on_close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._inbox.put_nowait(None)
            waiters: list[asyncio.Future[Any]] = [*self._sync_waiters.values()]
            waiters += self._pongs.values()
            waiters.append(self.remote_binding)
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(SessionClosed("session closed"))
            self._on_closed_cb(self)

    def _on_data(self, message: bytes | str) -> None:
        if self._closed.is_set():
            return
        self._buffered += len(message)
        if self._buffered > self.max_unread_bytes:
            # The remote sends faster than the application reads: end the session rather
            # than grow without bound or drop messages of a reliable channel unseen.
            self._count("closed:unread-limit")
            log.warning(
                "session %s with %s closed: over %d unread bytes",
                self.session_id.hex(),
                self.remote_id,
                self.max_unread_bytes,
            )
            self._on_close()
            self._spawn(self._pc.close())
            return
        self._received += 1
        self._inbox.put_nowait(message)
        if self._pending_syncs:
            done = [n for n in self._pending_syncs if n <= self._received]
            for n in done:
                self._pending_syncs.remove(n)
                self._ctl_send({"t": "synced", "n": n})

    def _ctl_send(self, msg: dict[str, Any]) -> None:
        if self.ctl.readyState == "open":
            self.ctl.send(json.dumps(msg))

    def _on_ctl(self, message: bytes | str) -> None:
        try:
            msg = json.loads(message)
            tag, n = msg["t"], msg["n"]
            if not isinstance(n, int):
                raise ValueError("n")
        except (ValueError, KeyError, TypeError, RecursionError):
            self._count("ctl-malformed")
            return
        if tag == "bind":
            sig = msg.get("sig")
            if not isinstance(sig, str) or len(sig) != 2 * binding.SIGNATURE_SIZE:
                self._count("ctl-malformed")
            elif not self.remote_binding.done():
                try:
                    self.remote_binding.set_result(bytes.fromhex(sig))
                except ValueError:
                    self._count("ctl-malformed")
        elif tag == "ping":
            self._ctl_send({"t": "pong", "n": n})
        elif tag == "pong":
            pong = self._pongs.pop(n, None)
            if pong is not None and not pong.done():
                pong.set_result(time.perf_counter())
        elif tag == "sync":
            if n <= self._received:
                self._ctl_send({"t": "synced", "n": n})
            elif len(self._pending_syncs) < MAX_PENDING_SYNCS:
                self._pending_syncs.append(n)
        elif tag == "synced":
            for m in [m for m in self._sync_waiters if m <= n]:
                synced = self._sync_waiters.pop(m)
                if not synced.done():
                    synced.set_result(None)

    @property
    def binding_sent(self) -> bool:
        """Whether our channel-binding signature was sent."""
        return self._fingerprints is not None

    def _bind_early(self, identity: Identity) -> None:
        if self.binding_sent:
            return
        try:
            self.send_binding(identity)
        except DhtSignalError as exc:  # the peer's own call reports it
            log.debug("session %s: binding not sent on open: %s", self.session_id.hex(), exc)

    def send_binding(self, identity: Identity) -> None:
        """Send our channel-binding signature over the fingerprints of this very DTLS
        connection (once, when the channels are open).

        :param identity: our identity.
        :raises ConnectFailed: the DTLS handshake has not completed.
        """
        self._fingerprints = rtc.dtls_fingerprints(self._pc)
        local_fp, remote_fp = self._fingerprints
        sig = binding.sign(identity, self.remote_key, self.session_id, local_fp, remote_fp)
        self._ctl_send({"t": "bind", "n": 0, "sig": sig.hex()})

    def binding_holds(self, local_key: bytes, signature: bytes) -> bool:
        """Whether the remote's ``signature`` binds :attr:`remote_key` to this connection
        (after :meth:`send_binding`).

        :param local_key: our Ed25519 key.
        :param signature: the remote's, from :attr:`remote_binding`.
        """
        if self._fingerprints is None:
            return False
        local_fp, remote_fp = self._fingerprints
        return binding.check(
            local_key, self.remote_key, self.session_id, local_fp, remote_fp, signature
        )

    def __aiter__(self) -> AsyncIterator[bytes | str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[bytes | str]:
        while True:
            msg = await self._inbox.get()
            if msg is None:
                self._inbox.put_nowait(None)  # later recv() calls and loops end too
                return
            self._buffered -= len(msg)
            yield msg

    async def recv(self, timeout: float | None = None) -> bytes | str:
        """The next message.

        :param timeout: seconds to wait at most (None: no limit).
        :raises SessionClosed: the session closed first.
        :raises TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)
            raise SessionClosed("session closed")
        self._buffered -= len(msg)
        return msg

    async def send(self, data: bytes | str) -> None:
        """Queue one message on the data channel.

        :param data: the message.
        :raises SessionClosed: the session is closed.
        """
        if not self.is_open:
            raise SessionClosed("session closed")
        self.data.send(data)
        self._sent += 1

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the remote application has received every message sent so far.

        :param timeout: seconds to wait at most.
        :raises TimeoutError: no acknowledgement within ``timeout`` seconds.
        :raises SessionClosed: the session is closed.
        """
        if self._closed.is_set():
            raise SessionClosed("session closed")
        n = self._sent
        if n == 0:
            return
        fut = self._sync_waiters.get(n)
        if fut is None:  # concurrent flushes of the same messages share one sync
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(ignore_outcome)
            self._sync_waiters[n] = fut
            self._ctl_send({"t": "sync", "n": n})
        await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def ping(self, timeout: float = 5.0) -> float:
        """One round trip over the control channel; returns seconds.

        :param timeout: seconds to wait for the pong at most.
        :raises SessionClosed: the session is closed.
        :raises TimeoutError: no pong within ``timeout`` seconds.
        """
        if self._closed.is_set():
            raise SessionClosed("session closed")
        self._ping_seq += 1
        n = self._ping_seq
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs[n] = fut
        t0 = time.perf_counter()
        self._ctl_send({"t": "ping", "n": n})
        t1 = await asyncio.wait_for(fut, timeout)
        return t1 - t0

    async def close(self) -> None:
        """Close the connection."""
        self._on_close()
        await self._pc.close()

    async def __aenter__(self) -> Session:
        """``async with await peer.connect("bob") as session:`` closes it on the way out."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Session {self.session_id.hex()} with {self.remote_id}>"


__all__ = ["ChannelOptions", "Session"]
