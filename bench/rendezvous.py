#!/usr/bin/env python3
"""Rendezvous time: connect() to data channel open on both sides, three ways in one run.

Ways
----
``floor``
    Two RTCPeerConnections in the bench process, offer and answer handed over in memory.
    The lower bound for any signaling channel.
``relay``
    The seed documents' design: a central WebSocket hub (``websockets``) in its own OS
    process; the callee is another OS process registered at the hub under a name; the
    caller (the bench process) sends the offer addressed to that name and gets the answer
    back through the hub. Both WebSocket connections are opened once and stay open across
    iterations (a long-lived signaling connection is how the relay design works), so the
    WebSocket/TCP handshakes are outside the measured window.
``dhtsignal``
    The library under test (:class:`DhtsignalWay`): ``--dht-nodes`` (100) DhtNodes in
    ``--dht-procs`` (10) OS processes, a callee process holding ``Peer("bob", [boot])`` and
    the caller ``Peer("alice", [boot])`` in the bench process; both peers are joined once
    and stay joined (as the relay's WebSockets stay open). ``t0`` is taken just before
    ``await alice.connect("bob")`` (resolve, sealed offer and answer through the DHT, ICE,
    DTLS, SCTP); ``connect()`` constructs its RTCPeerConnection inside the window, so
    dhtsignal pays that construction. Each session's ``phases`` (both sides) are reported.

One definition for every way
----------------------------
Both RTCPeerConnections are constructed before the clock starts (the relay callee keeps a
fresh spare one ready; construction, mostly certificate generation, is measured and printed
separately). ``t0`` is taken just before the caller's ``createDataChannel()`` and
``createOffer()``. The callee sends one byte over the data channel as soon as its channel is
open (``pc.on("datachannel")``: aiortc emits it with the channel already open, else on its
"open" event). ``t_end`` is taken at the caller as max(its channel "open" event, arrival of
that byte), which bounds both sides being open. Rendezvous time = ``t_end - t0``. Everything
waits on asyncio Events, never polls; every await has a timeout. The one exception is
dhtsignal: ``Peer.connect()`` and the callee's ``Peer`` construct their RTCPeerConnections
inside the call, so dhtsignal pays that construction (the report says so); its caller-side
"open" is ``connect()`` returning, and the callee sends its byte when ``incoming()`` yields.

Iterations are interleaved round-robin (floor, relay, dhtsignal, floor-fast, relay-fast,
floor, ...) after a warm-up, each with fresh peer connections, so machine noise hits every
way alike; ratios come from the same run.

aioice pacing
-------------
aioice's ``Connection.connect()`` runs its check list with a hard-coded
``await asyncio.sleep(0.02)`` between rounds: a literal, not a module-level knob. The
primary rows use stock aioice. The ``-fast`` rows (``--fast-pacing-ms``, default 1, 0 turns
them off) swap the ``asyncio`` name inside ``aioice.ice`` for a proxy whose ``sleep(0.02)``
sleeps the given time instead; the bench process swaps it in only around a ``-fast``
iteration, and the relay way runs a second callee process with it on for good.

Only 127.0.0.1
--------------
aioice skips 127.0.0.1 when gathering host candidates; every process of this bench replaces
``aioice.ice.get_host_addresses`` so 127.0.0.1 is the only host candidate (as the tests do),
uses ``RTCConfiguration(iceServers=[])`` (no STUN) and opens WebSockets with ``proxy=None``.

Memory per open session
-----------------------
A separate process opens ``--memory-sessions`` caller/callee pairs (in-memory handover),
waits until every data channel is open and reports RSS growth (everything, OpenSSL
included) and, in another process, tracemalloc growth (Python heap only), per pair and per
RTCPeerConnection (one side of a session).

Usage::

    python bench/rendezvous.py --iterations 30 [--uvloop] [--json PATH]
                               [--dht-nodes 100 --dht-procs 10]

Internal entry points (started by the bench itself)::

    python bench/rendezvous.py --serve-relay --port 0
    python bench/rendezvous.py --serve-callee --relay-port P --name callee
    python bench/rendezvous.py --serve-dht --dht-count 10 [--bootstrap HOST:PORT]
    python bench/rendezvous.py --serve-dht-callee --bootstrap HOST:PORT --name bob
    python bench/rendezvous.py --measure-memory 20 --memory-mode rss
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aioice
import aioice.ice
import aiortc
import websockets
from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

HERE = Path(__file__).resolve()
HOST = "127.0.0.1"
PING = b"\x01"
BYE = b"\x00bye"  # dhtsignal: the caller asks the callee to close its side (after the window)
PHASES = ("resolve", "signaling", "ice", "dtls_sctp", "total")  # fields of Session.phases
TARGET_DHT_OVER_RELAY = 1.25
AIOICE_PACING_S = 0.02  # the literal in aioice.ice.Connection.connect()
MAX_RELAY_MESSAGES = 1_000_000  # per connection, so every serve loop is bounded in count
now = time.perf_counter


# -- process hygiene -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def _run(coro: Awaitable[Any], use_uvloop: bool) -> Any:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ChildDied(RuntimeError):
    """A subprocess of the bench exited while it was still needed."""


_LIVE_PIDS: set[int] = set()  # children not yet reaped, killed by PID on any exit path


class Child:
    """One subprocess of the bench: started, checked, stopped by its own PID."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child)

    def stderr_tail(self, limit: int = 2000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-limit:].strip()

    def _died(self, what: str) -> ChildDied:
        rc = self.proc.returncode if self.proc else None
        tail = self.stderr_tail() or "(empty)"
        return ChildDied(f"{self.label} {what} (rc={rc}); its stderr ends with:\n{tail}")

    async def start(self, expect: str = "READY", timeout: float = 30.0) -> dict[str, Any]:
        """Start and wait for the line ``<expect> {json}`` on its stdout."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        _LIVE_PIDS.add(self.proc.pid)
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:  # bounded by the timeout and by EOF
                    line = (await self.proc.stdout.readline()).decode().strip()
                    if not line:
                        await self.proc.wait()
                        raise self._died(f"exited before printing {expect}")
                    if line.startswith(expect + " "):
                        return dict(json.loads(line[len(expect) + 1 :]))
        except TimeoutError:
            raise self._died(f"printed no {expect} line within {timeout:.0f} s") from None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise self._died("exited unexpectedly")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            self._stderr.close()
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 3.0)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    await asyncio.wait_for(proc.wait(), 3.0)
        finally:
            if proc.returncode is not None:
                _LIVE_PIDS.discard(proc.pid)
            self._stderr.close()


def _kill_leftovers() -> None:
    for pid in list(_LIVE_PIDS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        _LIVE_PIDS.discard(pid)


# -- aiortc / aioice helpers -----------------------------------------------------------------


def only_loopback() -> None:
    """Make 127.0.0.1 the only host candidate of every connection in this process."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [HOST]


def pacing_literal_present() -> bool:
    """True while aioice still paces its checks with ``asyncio.sleep(0.02)``."""
    try:
        return "asyncio.sleep(0.02)" in inspect.getsource(aioice.ice.Connection.connect)
    except (OSError, TypeError):
        return False


class _PacedAsyncio(types.ModuleType):
    """Stands in for ``asyncio`` inside ``aioice.ice``; only ``sleep(0.02)`` changes."""

    def __init__(self, pacing_s: float) -> None:
        super().__init__("asyncio")
        self._pacing_s = pacing_s

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        if delay == AIOICE_PACING_S:
            delay = self._pacing_s
        return await asyncio.sleep(delay, result)


def set_aioice_pacing(pacing_ms: float | None) -> None:
    """None restores stock aioice; a number replaces its 20 ms check pacing."""
    aioice.ice.asyncio = asyncio if pacing_ms is None else _PacedAsyncio(pacing_ms / 1000)


@contextlib.contextmanager
def aioice_pacing(pacing_ms: float | None) -> Iterator[None]:
    if pacing_ms is None:
        yield
        return
    set_aioice_pacing(pacing_ms)
    try:
        yield
    finally:
        set_aioice_pacing(None)


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # never the default public STUN


def arm_callee(pc: RTCPeerConnection) -> None:
    """The callee sends one byte as soon as its data channel is open."""

    @pc.on("datachannel")
    def _on_datachannel(channel: RTCDataChannel) -> None:
        if channel.readyState == "open":
            channel.send(PING)
        else:
            channel.on("open", lambda: channel.send(PING))


async def close_pcs(*pcs: RTCPeerConnection | None, timeout: float = 5.0) -> None:
    for pc in pcs:
        if pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), timeout)


@dataclass
class Sample:
    total_ms: float  # t0 -> max(caller channel open, callee's byte arrived at the caller)
    caller_open_ms: float  # t0 -> caller channel "open"
    signal_ms: float  # t0 -> answer applied at the caller (setRemoteDescription returned)
    phases: dict[str, Any] | None = None  # dhtsignal only: Session.phases (ms) of both sides


class CallerProbe:
    """Creates the caller's data channel and records when it opens and the callee's byte."""

    def __init__(self, pc: RTCPeerConnection, t0: float) -> None:
        self.t0 = t0
        self.t_open = 0.0
        self.t_byte = 0.0
        self.t_signal = 0.0
        self._opened = asyncio.Event()
        self._byte = asyncio.Event()
        self.channel = pc.createDataChannel("rendezvous")
        self.channel.on("open", self._on_open)
        self.channel.on("message", self._on_message)

    def _on_open(self) -> None:
        if not self._opened.is_set():
            self.t_open = now()
            self._opened.set()

    def _on_message(self, message: bytes | str) -> None:
        if not self._byte.is_set():
            self.t_byte = now()
            self._byte.set()

    def signalled(self) -> None:
        self.t_signal = now()

    async def wait(self) -> Sample:
        await self._opened.wait()
        await self._byte.wait()
        t_end = max(self.t_open, self.t_byte)
        return Sample(
            total_ms=(t_end - self.t0) * 1000,
            caller_open_ms=(self.t_open - self.t0) * 1000,
            signal_ms=(self.t_signal - self.t0) * 1000,
        )


# -- the ways --------------------------------------------------------------------------------


class Way:
    """One way to rendezvous. The harness calls setup(), iteration() many times, teardown().

    ``pacing_ms`` None means stock aioice; a number means the harness swaps aioice's 20 ms
    check pacing for it in the bench process around each iteration of this way.
    """

    name = "?"
    note = ""

    def __init__(self, args: argparse.Namespace, pacing_ms: float | None = None) -> None:
        self.args = args
        self.pacing_ms = pacing_ms
        self.details: list[str] = []  # extra lines for the report (see report_lines())

    async def setup(self) -> None:
        """Start whatever the way needs; raise NotImplementedError if it cannot run."""

    async def iteration(self, index: int) -> Sample:
        raise NotImplementedError

    def report_lines(self) -> list[str]:
        """Lines for the report, asked for after the last round, before teardown()."""
        return list(self.details)

    def check_health(self) -> None:
        """Raise ChildDied with a clear message if a process this way needs is gone."""

    async def teardown(self) -> None:
        """Stop everything setup() started; must be safe after a failed setup()."""


class FloorWay(Way):
    name = "floor"
    note = "one process, SDP handed over in memory"

    async def iteration(self, index: int) -> Sample:
        caller, callee = new_pc(), new_pc()
        arm_callee(callee)
        try:
            async with asyncio.timeout(self.args.timeout):
                probe = CallerProbe(caller, now())
                await caller.setLocalDescription(await caller.createOffer())
                await callee.setRemoteDescription(caller.localDescription)
                await callee.setLocalDescription(await callee.createAnswer())
                await caller.setRemoteDescription(callee.localDescription)
                probe.signalled()
                return await probe.wait()
        finally:
            await close_pcs(caller, callee)


class RelayClient:
    """A long-lived signaling connection to the central WebSocket relay."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ws: Any = None
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.closed_reason: str | None = None

    async def open(self, port: int, timeout: float) -> None:
        from websockets.asyncio.client import connect

        self.ws = await asyncio.wait_for(
            connect(f"ws://{HOST}:{port}", proxy=None, open_timeout=timeout), timeout
        )
        await asyncio.wait_for(
            self.ws.send(json.dumps({"op": "register", "name": self.name})), timeout
        )
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if reply.get("op") != "registered":
            raise RuntimeError(f"relay refused registration of {self.name!r}: {reply}")
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            for _ in range(MAX_RELAY_MESSAGES):
                frame = json.loads(await self.ws.recv())
                if frame.get("op") == "error":  # e.g. no such peer: fail what is pending
                    self._fail(f"relay error: {frame.get('reason')}", closed=False)
                    continue
                msg = dict(frame["msg"], sender=frame["from"])
                waiter = self._waiters.pop((msg["kind"], int(msg["id"])), None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(msg)
                else:
                    self.inbox.put_nowait(msg)
        except Exception as exc:  # the connection is gone: wake everyone waiting
            self.closed_reason = f"relay connection of {self.name!r} closed: {exc!r}"
            self._fail(self.closed_reason)

    def _fail(self, reason: str, closed: bool = True) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
        self._waiters.clear()
        if closed:
            self.inbox.put_nowait({"kind": "closed", "id": -1, "reason": reason})

    def expect(self, kind: str, index: int) -> asyncio.Future[dict[str, Any]]:
        if self.closed_reason:
            raise ConnectionError(self.closed_reason)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, index)] = fut
        return fut

    async def send(self, to: str, msg: dict[str, Any]) -> None:
        await asyncio.wait_for(self.ws.send(json.dumps({"op": "send", "to": to, "msg": msg})), 5.0)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 2.0)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2.0)


class RelayHub:
    """The relay server process and the bench's caller connection, shared by relay ways."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: Child | None = None
        self.port = 0
        self.client: RelayClient | None = None
        self.users = 0

    async def acquire(self) -> tuple[int, RelayClient]:
        if self.server is None:
            self.server = Child(
                "relay server", _child_argv(self.args, ["--serve-relay", "--port", "0"])
            )
            try:
                self.port = int((await self.server.start())["port"])
                self.client = RelayClient("caller")
                await self.client.open(self.port, self.args.timeout)
            except BaseException:
                self.users = 1
                await self.release()
                raise
        self.users += 1
        assert self.client is not None
        return self.port, self.client

    def check_alive(self) -> None:
        if self.server is not None:
            self.server.check_alive()

    async def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.server is not None:
            await self.server.stop()
            self.server = None


class RelayWay(Way):
    name = "relay"
    note = "central WebSocket hub in its own process; callee in another; WS kept open"

    def __init__(
        self, args: argparse.Namespace, hub: RelayHub, pacing_ms: float | None = None
    ) -> None:
        super().__init__(args, pacing_ms)
        self.hub = hub
        self.callee: Child | None = None
        self.callee_name = f"callee-{self.name}"
        self.client: RelayClient | None = None
        self._acquired = False

    async def setup(self) -> None:
        port, self.client = await self.hub.acquire()
        self._acquired = True
        extra = ["--serve-callee", "--relay-port", str(port), "--name", self.callee_name]
        if self.pacing_ms is not None:
            extra += ["--pacing-ms", str(self.pacing_ms)]
        self.callee = Child(f"callee process ({self.name})", _child_argv(self.args, extra))
        await self.callee.start()

    def check_health(self) -> None:
        self.hub.check_alive()
        if self.callee is not None:
            self.callee.check_alive()
        if self.client is not None and self.client.closed_reason:
            raise ConnectionError(self.client.closed_reason)

    async def iteration(self, index: int) -> Sample:
        assert self.client is not None
        caller = new_pc()
        try:
            async with asyncio.timeout(self.args.timeout):
                probe = CallerProbe(caller, now())  # connect() begins
                await caller.setLocalDescription(await caller.createOffer())
                answer = self.client.expect("answer", index)
                offer = {"kind": "offer", "id": index, "sdp": caller.localDescription.sdp}
                await self.client.send(self.callee_name, offer)
                reply = await answer
                await caller.setRemoteDescription(RTCSessionDescription(reply["sdp"], "answer"))
                probe.signalled()
                return await probe.wait()
        finally:
            await close_pcs(caller)
            await self._bye(index)

    async def _bye(self, index: int) -> None:
        """Have the callee close its side and get ready again, outside the measured window."""
        if self.client is None or self.client.closed_reason:
            return
        with contextlib.suppress(TimeoutError, ConnectionError):
            closed = self.client.expect("closed", index)
            await self.client.send(self.callee_name, {"kind": "bye", "id": index})
            await asyncio.wait_for(closed, 10.0)

    async def teardown(self) -> None:
        try:
            if self.callee is not None:
                await self.callee.stop()
        finally:
            if self._acquired:
                self._acquired = False
                await self.hub.release()


class FloorFastWay(FloorWay):
    name = "floor-fast"
    note = "floor with aioice check pacing patched"


class RelayFastWay(RelayWay):
    name = "relay-fast"
    note = "relay with aioice check pacing patched in caller and callee"


def dht_layout(nodes: int, procs: int) -> list[int]:
    """How many DHT nodes each of ``procs`` processes runs (as even as possible)."""
    return [nodes // procs + (1 if i < nodes % procs else 0) for i in range(procs)]


class DhtsignalWay(Way):
    """The library under test: ``Peer.connect()`` with the DHT as the only signaling channel.

    setup() starts ``--dht-nodes`` DhtNodes spread over ``--dht-procs`` OS processes (the
    first node of the first process is the bootstrap node, every other node joins through
    it), then a callee process holding ``Peer("bob", [boot])`` and, in the bench process, the
    caller ``Peer("alice", [boot])``. Both peers stay joined across iterations (as the relay
    keeps its WebSocket connections open): joining the DHT and publishing presence are not
    timed. An iteration takes ``t0`` just before ``await alice.connect("bob")``, which
    resolves bob, exchanges the sealed offer and answer through the DHT and waits for ICE,
    DTLS and SCTP. The callee sends ``PING`` as soon as ``incoming()`` hands it the (open)
    session; ``t_end`` = max(``connect()`` returned, ``PING`` arrived), as for the baselines.
    ``connect()`` constructs its RTCPeerConnection inside the window: dhtsignal pays for it.
    After the window the callee reports its own ``Session.phases``, the caller says ``BYE``,
    the callee closes its session, the caller sees that close and closes its own.
    """

    name = "dhtsignal"
    note = "DHT nodes in separate processes, DHT as the only signaling channel"

    def __init__(self, args: argparse.Namespace, pacing_ms: float | None = None) -> None:
        super().__init__(args, pacing_ms)
        self.dht: list[Child] = []
        self.callee: Child | None = None
        self.alice: Any = None  # dhtsignal.peer.Peer, imported in setup()
        self.boot = ""
        self.closes = {"closed by bob": 0, "timed out": 0, "failed": 0}

    async def setup(self) -> None:
        from dhtsignal.aio import rtc
        from dhtsignal.peer import Peer

        only_loopback()
        rtc.use_host_addresses([HOST])  # the same replacement, through the library's API
        layout = dht_layout(self.args.dht_nodes, self.args.dht_procs)
        t = now()
        first = Child("DHT process 0", self._argv(["--serve-dht", "--dht-count", str(layout[0])]))
        self.dht.append(first)  # before start(): teardown() stops whatever was started
        info = await first.start(timeout=60.0)
        self.boot = str(info["boot"])
        readies = [info]
        rest = [
            Child(
                f"DHT process {i}",
                self._argv(["--serve-dht", "--dht-count", str(n), "--bootstrap", self.boot]),
            )
            for i, n in enumerate(layout[1:], start=1)
        ]
        self.dht.extend(rest)
        try:
            async with asyncio.TaskGroup() as tg:  # the first failure cancels the other starts
                starts = [tg.create_task(child.start(timeout=60.0)) for child in rest]
        except ExceptionGroup as group:  # e.g. ChildDied: raise it as the harness expects
            raise group.exceptions[0] from None
        readies += [task.result() for task in starts]
        t_dht = now() - t
        contacts = statistics.fmean(float(r["contacts_mean"]) for r in readies)
        self.callee = Child(
            "dhtsignal callee process (bob)",
            self._argv(["--serve-dht-callee", "--bootstrap", self.boot, "--name", "bob"]),
        )
        await self.callee.start(timeout=60.0)
        self.alice = Peer("alice", [self.boot])
        await asyncio.wait_for(self.alice.start(), 30.0)
        sizes = "+".join(str(n) for n in layout)
        self.note = (
            f"{sum(layout)} DHT nodes in {len(layout)} processes, DHT as the only signaling channel"
        )
        self.details = [
            f"dhtsignal: {sum(layout)} DhtNodes in {len(layout)} OS processes ({sizes}); node 0 "
            f"of process 0 ({self.boot}) is the bootstrap node, every other node joined "
            f"through it (DHT up in {t_dht:.1f} s; {contacts:.1f} routing-table contacts per "
            "node right after joining, mean)",
            "dhtsignal: callee Peer('bob') in its own process, caller Peer('alice') in the bench "
            "process; both joined the DHT once in setup and stay joined across iterations "
            "(a peer daemon stays joined, as the relay keeps its WebSocket open): join and "
            "presence publication are not timed",
            "dhtsignal: t0 just before await alice.connect('bob'); t_end = max(connect() "
            "returned, bob's 1-byte message arrived); bob sends it as soon as incoming() "
            "yields the (already open) session",
            "dhtsignal: Peer.connect() constructs its RTCPeerConnection inside the timed window "
            "(the baselines construct theirs before t0): dhtsignal pays that construction, "
            "about the per-pc figure above",
        ]

    def report_lines(self) -> list[str]:
        closes = ", ".join(f"{k} {v}" for k, v in self.closes.items())
        return [
            *self.details,
            f"dhtsignal: after each window (not timed) bob reports its phases, alice sends BYE, "
            f"bob closes, alice waits for that close, then closes hers: {closes}",
        ]

    def _argv(self, extra: list[str]) -> list[str]:
        return _child_argv(self.args, [*extra, "--timeout", str(self.args.timeout)])

    def check_health(self) -> None:
        for child in self.dht:
            child.check_alive()
        if self.callee is not None:
            self.callee.check_alive()

    async def iteration(self, index: int) -> Sample:
        assert self.alice is not None
        session: Any = None
        t_byte = 0.0

        def on_message(message: bytes | str) -> None:
            nonlocal t_byte
            if not t_byte:
                t_byte = now()

        sample: Sample | None = None
        try:
            async with asyncio.timeout(self.args.timeout):
                t0 = now()
                session = await self.alice.connect("bob")
                t_open = now()
                session.data.on("message", on_message)  # no await since connect() returned
                first = await session.recv()
                if first != PING:
                    raise RuntimeError(f"expected the callee's byte first, got {first!r}")
                # Not seen by on_message: it arrived before connect() returned, so t_open bounds.
                t_byte = t_byte or t_open
            t_end = max(t_open, t_byte)
            caller = _phases_ms(session.phases)
            # Outside the window: one control-channel round trip, the unit in which the
            # channel-binding check's cost is stated.
            caller["ctl_rtt"] = await session.ping(5.0) * 1000
            sample = Sample(
                total_ms=(t_end - t0) * 1000,
                caller_open_ms=(t_open - t0) * 1000,
                signal_ms=(caller.get("resolve") or 0.0) + (caller.get("signaling") or 0.0),
                phases={"caller": caller, "path": list(session.path or ())},
            )
        finally:
            if session is not None:
                session.data.remove_listener("message", on_message)
                report = await self._bye(session)
                if sample is not None and sample.phases is not None and report:
                    sample.phases["callee"] = report.get("phases")
        assert sample is not None
        return sample

    async def _bye(self, session: Any) -> dict[str, Any] | None:
        """Outside the window: get bob's phases, say BYE, wait for bob to close, close ours."""
        report: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(5.0):
                for _ in range(4):  # PING (if the window ended early), then the report
                    msg = await session.recv()
                    if isinstance(msg, str):
                        report = json.loads(msg)
                        break
                await session.send(BYE)
                async for _msg in session:  # ends when bob's close reaches us
                    pass
            self.closes["closed by bob"] += 1
        except TimeoutError:
            self.closes["timed out"] += 1
            print("  dhtsignal: bob did not close within 5 s", flush=True)
        except Exception as exc:  # the session broke: closing ours is all that is left
            self.closes["failed"] += 1
            print(f"  dhtsignal: closing handshake failed: {exc!r}", flush=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), 5.0)
        return report

    async def teardown(self) -> None:
        try:
            if self.alice is not None:
                alice, self.alice = self.alice, None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(alice.close(), 5.0)
        finally:
            children = [c for c in (self.callee, *reversed(self.dht)) if c is not None]
            self.callee, self.dht = None, []
            for child in children:  # one by one, each by its own PID
                with contextlib.suppress(Exception):
                    await child.stop()


def _phases_ms(phases: Any) -> dict[str, float | None]:
    """``Session.phases`` as milliseconds by stage (None for a stage not passed)."""
    if phases is None:
        return {}
    return {
        name: None if getattr(phases, name) is None else getattr(phases, name) * 1000
        for name in PHASES
    }


def run_dhtsignal(args: argparse.Namespace) -> list[float]:
    """Rendezvous times (ms) of the dhtsignal way alone, not interleaved with the baselines."""

    async def alone() -> list[float]:
        way = DhtsignalWay(args)
        try:
            await way.setup()
            samples = []
            for i in range(args.warmup + args.iterations):
                with aioice_pacing(way.pacing_ms):
                    sample = await asyncio.wait_for(way.iteration(i), args.timeout + 15)
                if i >= args.warmup:
                    samples.append(sample.total_ms)
                await asyncio.sleep(args.settle_ms / 1000)
            return samples
        finally:
            await way.teardown()

    return list(_run(alone(), args.uvloop))


def build_ways(args: argparse.Namespace) -> list[Way]:
    hub = RelayHub(args)
    ways: list[Way] = []
    wanted = {w.strip() for w in args.ways.split(",") if w.strip()}
    if "floor" in wanted:
        ways.append(FloorWay(args))
    if "relay" in wanted:
        ways.append(RelayWay(args, hub))
    if "dhtsignal" in wanted:
        ways.append(DhtsignalWay(args))
    if args.fast_pacing_ms > 0:
        if "floor" in wanted:
            ways.append(FloorFastWay(args, args.fast_pacing_ms))
        if "relay" in wanted:
            ways.append(RelayFastWay(args, hub, args.fast_pacing_ms))
    return ways


# -- child entry points ----------------------------------------------------------------------


def _child_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = [sys.executable, str(HERE), *extra, "--lifetime", str(args.child_lifetime)]
    if args.uvloop:
        argv.append("--uvloop")
    return argv


def _emit(tag: str, payload: dict[str, Any]) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


async def serve_relay(args: argparse.Namespace) -> None:
    """The central hub: peers register under a name; messages are routed by name."""
    from websockets.asyncio.server import serve

    peers: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        name: str | None = None
        try:
            for _ in range(MAX_RELAY_MESSAGES):
                frame = json.loads(await ws.recv())
                if frame.get("op") == "register":
                    name = str(frame["name"])
                    peers[name] = ws
                    await ws.send(json.dumps({"op": "registered", "name": name}))
                elif frame.get("op") == "send" and name is not None:
                    target = peers.get(str(frame["to"]))
                    if target is None:
                        reason = f"no peer named {frame['to']!r}"
                        await ws.send(json.dumps({"op": "error", "reason": reason}))
                        continue
                    await target.send(json.dumps({"op": "msg", "from": name, "msg": frame["msg"]}))
                else:
                    await ws.send(json.dumps({"op": "error", "reason": "bad frame"}))
        except websockets.ConnectionClosed:
            pass
        finally:
            if name is not None and peers.get(name) is ws:
                del peers[name]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(handler, HOST, args.port) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        _emit("READY", {"port": port, "pid": os.getpid()})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.lifetime)


async def serve_callee(args: argparse.Namespace) -> None:
    """The callee: registered at the hub, answers offers, sends PING when its channel opens."""
    only_loopback()
    set_aioice_pacing(args.pacing_ms)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client = RelayClient(args.name)
    await client.open(args.relay_port, 10.0)
    spare: RTCPeerConnection | None = new_pc()  # constructed outside the measured window
    sessions: dict[int, RTCPeerConnection] = {}
    _emit("READY", {"pid": os.getpid(), "name": args.name})
    deadline = time.monotonic() + args.lifetime
    stopper = asyncio.create_task(stop.wait())
    try:
        for _ in range(MAX_RELAY_MESSAGES):
            left = deadline - time.monotonic()
            if left <= 0 or stop.is_set():
                break
            getter = asyncio.create_task(client.inbox.get())
            done, _pending = await asyncio.wait(
                {getter, stopper}, timeout=left, return_when="FIRST_COMPLETED"
            )
            if getter not in done:
                getter.cancel()
                break
            msg = getter.result()
            kind, index = msg["kind"], int(msg["id"])
            if kind == "closed":
                raise ConnectionError(msg.get("reason"))
            try:
                if kind == "offer":
                    pc = spare or new_pc()
                    spare = None
                    arm_callee(pc)
                    sessions[index] = pc
                    async with asyncio.timeout(10.0):
                        await pc.setRemoteDescription(RTCSessionDescription(msg["sdp"], "offer"))
                        await pc.setLocalDescription(await pc.createAnswer())
                    answer = {"kind": "answer", "id": index, "sdp": pc.localDescription.sdp}
                    await client.send(msg["sender"], answer)
                elif kind == "bye":
                    await close_pcs(sessions.pop(index, None))
                    if spare is None:
                        spare = new_pc()
                    gc.collect()
                    await client.send(msg["sender"], {"kind": "closed", "id": index})
            except Exception as exc:  # keep serving; the caller times out and says so
                print(f"callee: {kind} {index} failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        stopper.cancel()
        await close_pcs(spare, *sessions.values())
        await client.close()


async def _until_stopped(lifetime: float) -> None:
    """Return on SIGTERM or after ``lifetime`` seconds."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), lifetime)


async def serve_dht(args: argparse.Namespace) -> None:
    """``--dht-count`` DhtNodes in this process. Without ``--bootstrap`` the first one is the
    bootstrap node (its address goes on the READY line) and the others join through it."""
    from dhtsignal.aio.node import DhtNode
    from dhtsignal.wire.addr import parse_addr

    nodes: list[DhtNode] = []
    try:
        for _ in range(args.dht_count):
            node = DhtNode(os.urandom(20))
            nodes.append(node)
            await node.listen_udp(HOST, 0)
        if args.bootstrap:
            boot, joiners = parse_addr(args.bootstrap), nodes
        else:
            assert nodes[0].address is not None
            boot, joiners = nodes[0].address, nodes[1:]
        async with asyncio.timeout(30.0):
            joined = await asyncio.gather(*(n.bootstrap([boot]) for n in joiners))
        if any(j == 0 for j in joined):
            raise RuntimeError(f"{joined.count(0)} node(s) could not join through {boot}")
        _emit(
            "READY",
            {
                "pid": os.getpid(),
                "boot": f"{boot[0]}:{boot[1]}",
                "nodes": len(nodes),
                "contacts_mean": statistics.fmean(len(n.table) for n in nodes),
            },
        )
        await _until_stopped(args.lifetime)
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(node.close(), 2.0)


async def serve_dht_callee(args: argparse.Namespace) -> None:
    """``Peer(name, [bootstrap])``: sends PING on every incoming session as soon as it is
    handed over (open), then its phases; closes the session on BYE (or when it closes)."""
    from dhtsignal.aio import rtc
    from dhtsignal.peer import Peer

    only_loopback()
    rtc.use_host_addresses([HOST])
    set_aioice_pacing(args.pacing_ms)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(session: Any) -> None:
        try:
            await session.send(PING)
            report = {"phases": _phases_ms(session.phases), "path": list(session.path or ())}
            await session.send(json.dumps(report))
            async with asyncio.timeout(args.timeout + 20):
                async for msg in session:  # ends when the caller closes
                    if msg == BYE:
                        break
        except Exception as exc:  # this session only; keep accepting
            print(f"callee: session failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.close(), 5.0)

    async def accept(peer: Any) -> None:
        sessions = peer.incoming()
        for _ in range(MAX_RELAY_MESSAGES):
            session = await anext(sessions)
            task = asyncio.create_task(serve(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    peer = Peer(args.name, [args.bootstrap])
    await asyncio.wait_for(peer.start(), 30.0)
    try:
        acceptor = asyncio.create_task(accept(peer))
        _emit("READY", {"pid": os.getpid(), "name": args.name, "dht": list(peer.node.address)})
        await _until_stopped(args.lifetime)
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.close(), 5.0)


async def measure_memory(args: argparse.Namespace) -> None:
    """Open M caller/callee pairs in this process; report growth once all channels are open."""
    import tracemalloc

    only_loopback()
    m = args.measure_memory

    async def open_pair() -> tuple[RTCPeerConnection, RTCPeerConnection, CallerProbe]:
        caller, callee = new_pc(), new_pc()
        arm_callee(callee)
        async with asyncio.timeout(args.timeout):
            probe = CallerProbe(caller, now())
            await caller.setLocalDescription(await caller.createOffer())
            await callee.setRemoteDescription(caller.localDescription)
            await callee.setLocalDescription(await callee.createAnswer())
            await caller.setRemoteDescription(callee.localDescription)
            await probe.wait()
        return caller, callee, probe

    for _ in range(3):  # warm-up: imports, OpenSSL and codec caches, first-use allocations
        caller, callee, _probe = await open_pair()
        await close_pcs(caller, callee)
    await asyncio.sleep(0.2)
    gc.collect()
    if args.memory_mode == "tracemalloc":
        tracemalloc.start()
    rss0 = _rss_bytes()
    heap0 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
    pairs = []
    try:
        for _ in range(m):
            pairs.append(await open_pair())
        await asyncio.sleep(0.5)  # let post-open work (SCTP acks, consent tasks) settle
        gc.collect()
        rss1 = _rss_bytes()
        heap1 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        open_channels = sum(
            1 for _c, _e, p in pairs if p.channel.readyState == "open" and p.t_byte > 0
        )
    finally:
        for caller, callee, _probe in pairs:
            await close_pcs(caller, callee)
    grown = (heap1 - heap0) if args.memory_mode == "tracemalloc" else (rss1 - rss0)
    _emit(
        "RESULT",
        {
            "mode": args.memory_mode,
            "pairs": m,
            "open_channels": open_channels,
            "bytes": grown,
            "kib_per_pair": grown / m / 1024,
            "kib_per_pc": grown / (2 * m) / 1024,
        },
    )


# -- the harness -----------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        v = values[0]
        return {"n": 1, "p50": v, "p90": v, "mean": v, "min": v, "max": v, "stdev": 0.0}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p90": q[89],
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values),
    }


@dataclass
class WayResult:
    name: str
    note: str
    pacing_ms: float | None
    samples: list[Sample] = field(default_factory=list)
    warmup: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    by_round: dict[int, float] = field(default_factory=dict)


async def pc_construction_ms(count: int = 20) -> float:
    pcs = []
    t = now()
    for _ in range(count):
        pcs.append(new_pc())
    elapsed = (now() - t) * 1000 / count
    await close_pcs(*pcs)
    return elapsed


async def run_rounds(args: argparse.Namespace) -> dict[str, Any]:
    only_loopback()
    ways = build_ways(args)
    results: dict[str, WayResult] = {}
    skipped: dict[str, str] = {}
    details: list[str] = []
    load_start = os.getloadavg()[0]
    active: list[Way] = []
    try:
        for way in ways:
            try:
                await way.setup()
            except NotImplementedError as exc:
                print(f"{way.name}: not available yet ({exc})", flush=True)
                skipped[way.name] = str(exc)
                await way.teardown()
                continue
            except BaseException:
                await way.teardown()
                raise
            active.append(way)
            results[way.name] = WayResult(way.name, way.note, way.pacing_ms)
        construction = await pc_construction_ms()
        rounds = args.warmup + args.iterations
        started = now()
        for r in range(rounds):
            for position, way in enumerate(active):
                res = results[way.name]
                index = r * len(active) + position  # unique per attempt: late replies never match
                try:
                    with aioice_pacing(way.pacing_ms):
                        sample = await asyncio.wait_for(way.iteration(index), args.timeout + 15)
                except Exception as exc:  # one failed attempt; a dead child aborts the run
                    way.check_health()  # raises ChildDied with the child's stderr if it died
                    if isinstance(exc, ChildDied):
                        raise
                    res.failures.append(f"round {r}: {exc!r}")
                    print(f"  {way.name} round {r} failed: {exc!r}", flush=True)
                    if len(res.failures) > max(3, args.iterations // 5):
                        raise RuntimeError(f"{way.name}: too many failures") from exc
                    continue
                if r < args.warmup:
                    res.warmup.append(sample)
                else:
                    res.samples.append(sample)
                    res.by_round[r] = sample.total_ms
                await asyncio.sleep(args.settle_ms / 1000)  # let closing tasks finish
            if (r + 1) % 10 == 0:
                print(f"  ... round {r + 1}/{rounds} ({now() - started:.1f} s)", flush=True)
    finally:
        for way in active:
            details.extend(way.report_lines())
        for way in reversed(active):
            with contextlib.suppress(Exception):
                await way.teardown()
    return {
        "results": results,
        "skipped": skipped,
        "pc_construction_ms": construction,
        "details": details,
        "loadavg_1min": [load_start, os.getloadavg()[0]],
    }


async def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for mode in ("rss", "tracemalloc"):
        child = Child(
            f"memory process ({mode})",
            _child_argv(
                args,
                ["--measure-memory", str(args.memory_sessions), "--memory-mode", mode],
            ),
        )
        try:
            out.append(await child.start(expect="RESULT", timeout=60 + 3 * args.memory_sessions))
        finally:
            await child.stop()
    return out


def phase_stats(samples: list[Sample]) -> dict[str, Any]:
    """Statistics of each side's Session.phases over the samples that carry them."""
    out: dict[str, Any] = {}
    for side in ("caller", "callee"):
        for phase in PHASES:
            values = [
                v
                for s in samples
                if s.phases and isinstance(s.phases.get(side), dict)
                for v in [s.phases[side].get(phase)]
                if isinstance(v, int | float)
            ]
            if values:
                out.setdefault(side, {})[phase] = stats(values)
    paths = [" -> ".join(s.phases["path"]) for s in samples if s.phases and s.phases.get("path")]
    out["paths"] = {p: paths.count(p) for p in sorted(set(paths))}
    return out


def phase_lines(name: str, phases: dict[str, Any], opened: dict[str, float]) -> list[str]:
    lines = ["", f"  {name} phases, p50 (p90) in ms, from each side's Session.phases:"]
    for side, what in (
        ("caller", "alice, connect(): resolve, offer->answer applied, ICE, DTLS+SCTP"),
        ("callee", "bob, offer in -> answer sent, ICE, DTLS+SCTP"),
    ):
        got = phases.get(side)
        if not got:
            lines.append(f"    {side:<7} (no report)")
            continue
        cells = [
            f"{phase} {got[phase]['p50']:.2f} ({got[phase]['p90']:.2f})"
            for phase in PHASES
            if phase in got
        ]
        lines.append(f"    {side:<7} {'  '.join(cells)}   [{what}]")
    if opened:
        lines.append(f"    caller  connect() returned at p50 {opened['p50']:.2f} ms after t0")
    if phases.get("paths"):
        paths = ", ".join(f"{p} x{n}" for p, n in phases["paths"].items())
        lines.append(f"    selected candidate pair (local -> remote): {paths}")
    return lines


def paired_ratio(a: WayResult, b: WayResult) -> float | None:
    """Median over rounds of a/b, using only rounds where both ways succeeded."""
    ratios = [a.by_round[r] / b.by_round[r] for r in a.by_round if r in b.by_round]
    return statistics.median(ratios) if ratios else None


def report(args: argparse.Namespace, run: dict[str, Any], memory: list[dict[str, Any]]) -> dict:
    results: dict[str, WayResult] = run["results"]
    lines = []
    loop = "uvloop" if args.uvloop else "asyncio"
    lines.append(
        "rendezvous: createOffer -> both data channels open (callee's first byte at the caller)"
    )
    lines.append(
        f"  {args.iterations} interleaved rounds after {args.warmup} warm-up, loop={loop}, "
        f"python {platform.python_version()}, aiortc {aiortc.__version__}, "
        f"aioice {aioice.__version__}, websockets {websockets.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    lines.append(
        "  relay: WebSocket connections opened once and kept open across iterations "
        "(handshakes not timed)"
    )
    load = run.get("loadavg_1min")
    if load:
        lines.append(
            f"  1-min load average at start / end of the rounds: {load[0]:.2f} / {load[1]:.2f} "
            "(everything on this machine, other jobs included)"
        )
    lines.append(
        f"  RTCPeerConnection() construction, outside the window for every way: "
        f"{run['pc_construction_ms']:.2f} ms per pc"
    )
    lines.append("")
    header = (
        f"  {'way':<11} {'pacing':>7} {'n':>3} {'p50':>7} {'p90':>7} {'mean':>7} {'min':>7} "
        f"{'max':>7} {'sig p50':>8} {'fail':>4}"
    )
    lines.append(header + "   (ms)")
    table: dict[str, Any] = {}
    for name, res in results.items():
        totals = [s.total_ms for s in res.samples]
        st = stats(totals)
        sig = stats([s.signal_ms for s in res.samples])
        opened = stats([s.caller_open_ms for s in res.samples])
        table[name] = {
            "note": res.note,
            "aioice_pacing_ms": res.pacing_ms if res.pacing_ms is not None else 20.0,
            "total_ms": st,
            "signal_ms": sig,
            "caller_open_ms": opened,
            "failures": res.failures,
            "samples": [asdict(s) for s in res.samples],
            "warmup_samples": [asdict(s) for s in res.warmup],
        }
        if any(s.phases for s in res.samples):
            table[name]["phases_ms"] = phase_stats(res.samples)
            rtts = [
                s.phases["caller"]["ctl_rtt"]
                for s in res.samples
                if s.phases and isinstance(s.phases.get("caller"), dict)
                if isinstance(s.phases["caller"].get("ctl_rtt"), float)
            ]
            if rtts:
                table[name]["ctl_rtt_ms"] = stats(rtts)
        pacing = "20" if res.pacing_ms is None else f"{res.pacing_ms:g}"
        if st:
            lines.append(
                f"  {name:<11} {pacing:>7} {st['n']:>3} {st['p50']:7.2f} {st['p90']:7.2f} "
                f"{st['mean']:7.2f} {st['min']:7.2f} {st['max']:7.2f} {sig['p50']:8.2f} "
                f"{len(res.failures):>4}"
            )
        else:
            lines.append(f"  {name:<11} {pacing:>7}   0   (no successful iteration)")
    for name in run["skipped"]:
        lines.append(f"  {name:<11} not available yet")
    for name, entry in table.items():
        if "phases_ms" in entry:
            lines.extend(phase_lines(name, entry["phases_ms"], entry["caller_open_ms"]))
    if run.get("details"):
        lines.append("")
        lines.extend(f"  {line}" for line in run["details"])
    lines.append("")
    ratios: dict[str, Any] = {}

    def ratio(num: str, den: str, target: float | None = None) -> None:
        a, b = results.get(num), results.get(den)
        if not a or not b or not a.samples or not b.samples:
            return
        sa = stats([s.total_ms for s in a.samples])
        sb = stats([s.total_ms for s in b.samples])
        entry = {
            "p50": sa["p50"] / sb["p50"],
            "mean": sa["mean"] / sb["mean"],
            "paired_median": paired_ratio(a, b),
        }
        verdict = ""
        if target is not None:
            entry["target"] = target
            entry["meets_target"] = entry["p50"] <= target
            verdict = f"  target <= {target:g}: {'MET' if entry['meets_target'] else 'NOT MET'}"
        ratios[f"{num}/{den}"] = entry
        pm = entry["paired_median"]
        lines.append(
            f"  {num + '/' + den:<22} p50 {entry['p50']:.3f}x  mean {entry['mean']:.3f}x  "
            f"median of per-round ratios {pm:.3f}x{verdict}"
        )

    lines.append("  ratios (primary rows: stock aioice)")
    ratio("relay", "floor")
    ratio("dhtsignal", "relay", TARGET_DHT_OVER_RELAY)
    ratio("dhtsignal", "floor")
    if "dhtsignal" in run["skipped"]:
        lines.append("  dhtsignal/relay        dhtsignal: not available yet")
    if any(r.pacing_ms is not None for r in results.values()):
        lines.append(f"  with aioice check pacing at {args.fast_pacing_ms:g} ms (secondary rows)")
        ratio("relay-fast", "floor-fast")
        ratio("floor-fast", "floor")
        ratio("relay-fast", "relay")
    if memory:
        lines.append("")
        lines.append(
            f"  memory per open session ({args.memory_sessions} caller/callee pairs with "
            f"open data channels, one process, in-memory SDP)"
        )
        for m in memory:
            what = "RSS" if m["mode"] == "rss" else "tracemalloc (Python heap only)"
            lines.append(
                f"    {what:<31} {m['kib_per_pc']:7.1f} KiB per RTCPeerConnection, "
                f"{m['kib_per_pair']:7.1f} KiB per pair  ({m['open_channels']}/{m['pairs']} open)"
            )
    print("\n".join(lines), flush=True)
    return {
        "config": {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "loop": loop,
            "timeout_s": args.timeout,
            "fast_pacing_ms": args.fast_pacing_ms,
            "memory_sessions": args.memory_sessions,
            "relay_websockets_kept_open": True,
            "dht_nodes": args.dht_nodes,
            "dht_procs": args.dht_procs,
            "dhtsignal_peers_kept_joined": True,
            "dhtsignal_pc_constructed_inside_window": True,
            "definition": "t0 before caller createDataChannel/createOffer (pcs constructed "
            "before); t_end = max(caller channel open, arrival at caller of the 1-byte "
            "message the callee sends when its channel opens)",
        },
        "environment": {
            "python": platform.python_version(),
            "aiortc": aiortc.__version__,
            "aioice": aioice.__version__,
            "websockets": websockets.__version__,
            "cpus": os.cpu_count(),
            "aioice_pacing_literal_present": pacing_literal_present(),
        },
        "pc_construction_ms": run["pc_construction_ms"],
        "loadavg_1min": run.get("loadavg_1min"),
        "details": run.get("details", []),
        "ways": table,
        "skipped": run["skipped"],
        "ratios": ratios,
        "memory": memory,
    }


async def bench_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.fast_pacing_ms > 0 and not pacing_literal_present():
        print(
            "warning: aioice.ice.Connection.connect() no longer contains asyncio.sleep(0.02); "
            "the -fast rows are skipped",
            flush=True,
        )
        args.fast_pacing_ms = 0
    run = await run_rounds(args)
    memory = await run_memory(args) if args.memory_sessions > 0 else []
    return report(args, run, memory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--iterations", type=int, default=30, help="measured rounds (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="discarded rounds first (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--uvloop", action="store_true", help="run every process on uvloop")
    p.add_argument("--ways", default="floor,relay,dhtsignal", help="comma-separated ways")
    p.add_argument(
        "--fast-pacing-ms",
        type=float,
        default=1.0,
        help="extra rows with aioice's 20 ms check pacing set to this (0: no extra rows)",
    )
    p.add_argument("--memory-sessions", type=int, default=20, help="pairs for memory (0: skip)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per iteration")
    p.add_argument("--settle-ms", type=float, default=20.0, help="pause after each iteration")
    p.add_argument("--dht-nodes", type=int, default=100, help="dhtsignal: DHT nodes (default 100)")
    p.add_argument(
        "--dht-procs", type=int, default=10, help="dhtsignal: processes they run in (default 10)"
    )
    # internal entry points
    p.add_argument("--serve-relay", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-callee", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-dht", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-dht-callee", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dht-count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", default="", help=argparse.SUPPRESS)
    p.add_argument("--measure-memory", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-mode", choices=["rss", "tracemalloc"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--relay-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--name", default="callee", help=argparse.SUPPRESS)
    p.add_argument("--pacing-ms", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")
    if not 1 <= args.dht_procs <= args.dht_nodes:
        p.error("--dht-procs must be between 1 and --dht-nodes")
    # children outlive no more than the whole run could take
    ways = 5
    args.child_lifetime = (args.warmup + args.iterations) * ways * (args.timeout + 30) + 120
    return args


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: children are stopped by PID


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "DHTSIGNAL_BENCH_DATA" not in os.environ:
        # Peer("alice") keeps its key under $XDG_DATA_HOME/dhtsignal/peers/alice: not the
        # user's own data directory; a fresh one per run, shared with the child processes.
        data = tempfile.mkdtemp(prefix="dhtsignal-bench-")
        os.environ["DHTSIGNAL_BENCH_DATA"] = os.environ["XDG_DATA_HOME"] = data
        atexit.register(shutil.rmtree, data, True)
    if (
        args.serve_relay
        or args.serve_callee
        or args.serve_dht
        or args.serve_dht_callee
        or args.measure_memory
    ):
        _die_with_parent()
        if args.serve_relay:
            _run(serve_relay(args), args.uvloop)
        elif args.serve_callee:
            _run(serve_callee(args), args.uvloop)
        elif args.serve_dht:
            _run(serve_dht(args), args.uvloop)
        elif args.serve_dht_callee:
            _run(serve_dht_callee(args), args.uvloop)
        else:
            _run(measure_memory(args), args.uvloop)
        return 0
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        out = _run(bench_main(args), args.uvloop)
    except (ChildDied, ConnectionError, TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; subprocesses stopped", file=sys.stderr)
        return 130
    finally:
        _kill_leftovers()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
