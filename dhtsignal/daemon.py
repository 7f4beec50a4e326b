"""Running dhtsignal processes: bootstrap and peer daemons, and one-shot client nodes.

Theory of operation
-------------------
This module holds the I/O policy of a process; the protocol lives below it.

A :class:`Daemon` owns one :class:`~dhtsignal.aio.node.DhtNode`, its data
directory (locked, so two processes never share an identity), and the stop
signal. :meth:`Daemon.run` goes through four phases:

1. *start*: load the identity key and the saved state (contacts, stored records)
   from the data directory, bind the UDP socket, join the DHT, and (for a peer)
   claim the node ID and publish presence (a peer daemon does all of this through
   :meth:`Peer.start <dhtsignal.peer.Peer.start>`, the library's own sequence).
   SIGTERM or SIGINT during start cancels it (before :meth:`Daemon.run` installs its
   handlers, the CLI's own end the process quietly; they are put back when it returns).
   A setting that parses but cannot be used (the listen address, the data directory) raises
   :class:`~dhtsignal.errors.ConfigError` naming it.
2. *ready*: one line goes to the ``ready`` callback (the CLI prints it). A peer
   announces itself only after its records are published, so a reader that
   waits for the line finds it.
3. *serve* until SIGTERM or SIGINT. Tasks owned by the node save the state every
   ``save_interval`` seconds and re-join while the routing table is empty. A peer
   is a :class:`~dhtsignal.peer.Peer`: it accepts WebRTC sessions (ping is answered by
   the session itself) and prints every message it receives as
   ``message from NODE_ID: TEXT``.
4. *shutdown*, bounded by :data:`SHUTDOWN_BUDGET` so the process exits within
   2 s: a peer publishes tombstones (offline for everyone at once), then the
   state is saved and the node closed.

:func:`client_node` is the short-lived counterpart used by ``peers``,
``lookup`` and ``status``: a client-mode node with a throwaway key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from dhtsignal.aio.node import DhtNode, routing_id
from dhtsignal.config import Settings
from dhtsignal.datadir import KNOWN_PEERS_FILE, DataDirLock
from dhtsignal.errors import ConfigError, DhtTimeout, PeerNotFound, UsageError
from dhtsignal.identity import Identity
from dhtsignal.presence import claim_holder, resolve
from dhtsignal.wire.addr import Addr, listen_for, show_addr, show_addrs

if TYPE_CHECKING:  # aiortc is imported only by the commands that run sessions
    from dhtsignal.api import ApiServer, DaemonApi, SessionHub
    from dhtsignal.metrics import MetricsServer
    from dhtsignal.peer import Peer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds from SIGTERM to the end of shutdown (the contract is an exit within 2 s).
SHUTDOWN_BUDGET = 1.6
#: Of which a peer may spend this long publishing its tombstones.
SIGNOFF_BUDGET = 1.0
#: Signals that end a daemon (the state is saved on the way out).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
#: The signal that reloads what can be reloaded (log level, accept list) and saves.
RELOAD_SIGNAL = signal.SIGHUP

ReadyCallback = Callable[[str], None]


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh event loop (uvloop where installed)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _unreachable(addrs: Sequence[Addr], started: float, why: str = "") -> DhtTimeout:
    listed = show_addrs(addrs)
    return DhtTimeout(
        f"joining the DHT (no bootstrap node answered: {listed}{why})", time.monotonic() - started
    )


class Daemon:
    """A long-lived node process (see the module docstring for its phases).

    :param settings: the merged settings of the command.
    :param ready: writes one line to stdout: the ready line once the daemon serves, and
        (for a peer) each message received.
    """

    command = ""

    def __init__(self, settings: Settings, ready: ReadyCallback) -> None:
        assert settings.data_dir is not None
        self.settings = settings
        self.data_dir = settings.data_dir
        self.ready = ready
        self.node: DhtNode | None = None
        self.identity: Identity | None = None
        self._lock = DataDirLock(self.data_dir)
        self.api: DaemonApi | None = None
        self._api_server: ApiServer | None = None
        self.reload_settings: Callable[[], Settings] | None = None
        """Reads the settings again on SIGHUP (the CLI sets it; None: SIGHUP only saves)."""
        self._metrics_server: MetricsServer | None = None

    async def run(self) -> None:
        """Start, announce readiness, serve until SIGTERM/SIGINT, shut down.

        :raises DhtSignalError: start failed (the node is shut down first).
        """
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = (*_STOP_SIGNALS, RELOAD_SIGNAL)
        before = {sig: signal.getsignal(sig) for sig in handled}
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(RELOAD_SIGNAL, self.reload)
        try:
            if await self._unless_stopped(self.start(), stop):
                await self.start_api()
                line = self.ready_line()
                if self._metrics_server is not None and self._metrics_server.bound:
                    line += f" metrics={show_addr(self._metrics_server.bound)}"
                self.ready(line)
                await self.serve(stop)
            else:
                log.info("stopped while starting")
        finally:
            try:
                await self.stop_api()
                await asyncio.wait_for(self.shutdown(), SHUTDOWN_BUDGET)
            except TimeoutError:
                log.warning("shutdown took over %.1f s; exiting anyway", SHUTDOWN_BUDGET)
            finally:
                self._lock.release()
                for sig in handled:
                    loop.remove_signal_handler(sig)
                    if before[sig] is not None:  # e.g. the CLI's quiet exit
                        signal.signal(sig, before[sig])

    @staticmethod
    async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
        """Run ``work`` unless ``stop`` is set first; returns whether it completed."""
        task = asyncio.create_task(work, name="start")
        stopped = asyncio.create_task(stop.wait(), name="stop-wait")
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True

    # -- phases -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the node (overridden to join and publish)."""
        await self.open_node()

    def ready_line(self) -> str:
        """The one line printed when the daemon serves."""
        raise NotImplementedError

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (the node's own tasks do the work)."""
        await stop.wait()

    async def shutdown(self) -> None:
        """Save the state and close the node."""
        node = self.node
        if node is None:
            return
        self.save()
        await node.close()
        log.info("stopped")

    def reload(self) -> None:
        """SIGHUP: read the settings again and apply the log level and the accept list;
        save the state. A bad config file is logged and changes nothing."""
        from dhtsignal import logs

        self.save()
        if self.reload_settings is None:
            return
        try:
            new = self.reload_settings()
        except ConfigError as exc:
            log.warning("SIGHUP: settings not reloaded: %s", exc)
            return
        logs.set_level(new.log_level)
        self.apply_reloaded(new)
        self.settings = dataclasses.replace(
            self.settings, log_level=new.log_level, accept=new.accept
        )
        log.info(
            "SIGHUP: reloaded settings: log_level %s, accept %s",
            new.log_level,
            ", ".join(new.accept) or "anyone",
        )

    def apply_reloaded(self, new: Settings) -> None:
        """Apply what a peer reloads besides the log level (nothing for a bootstrap node)."""

    # -- local API ----------------------------------------------------------------------

    def make_api(self) -> DaemonApi:
        """The operations this daemon offers on its local API."""
        from dhtsignal.api import DaemonApi, Events
        from dhtsignal.datadir import KnownPeers

        assert self.node is not None and self.identity is not None
        return DaemonApi(
            self.command,
            self.node,
            KnownPeers(self.data_dir / KNOWN_PEERS_FILE),
            events=Events(),
            key=self.identity.public_key.hex(),
        )

    async def start_api(self) -> None:
        """Serve the local API on the socket in the data directory (:mod:`dhtsignal.api`),
        and the metrics with ``--metrics`` (:mod:`dhtsignal.metrics`).

        :raises ConfigError: the metrics address cannot be bound.
        """
        from dhtsignal.api import ApiServer, socket_path

        self.api = api = self.make_api()
        if self.settings.metrics is not None:
            from dhtsignal.metrics import DaemonMetrics, MetricsServer

            metrics = DaemonMetrics(api)
            if api.hub is not None:
                api.hub.on_setup = metrics.observe_setup
            self._metrics_server = MetricsServer(metrics.exposition, self.settings.metrics)
            await self._metrics_server.start()  # ConfigError("metrics") if it cannot
        server = ApiServer(api, socket_path(self.data_dir))
        if await server.start():
            self._api_server = server

    async def stop_api(self) -> None:
        """Stop serving the local API (before the node closes)."""
        if self._metrics_server is not None:
            metrics, self._metrics_server = self._metrics_server, None
            await metrics.close()
        if self._api_server is not None:
            server, self._api_server = self._api_server, None
            await server.close()

    # -- helpers ------------------------------------------------------------------------

    async def open_node(self) -> DhtNode:
        """Lock the data directory, load identity and state, bind, start the save task.

        :raises ConfigError: the data directory or the listen address is unusable.
        """
        s = self.settings
        self._lock.acquire()
        self.identity = identity = Identity.load_or_create(self.data_dir)
        node = DhtNode(routing_id(identity.public_key), s.node_config())
        try:
            restored = node.load_state(self.data_dir)
        except UsageError as exc:  # corrupt: not self.node yet, so shutdown keeps the file
            raise ConfigError("data_dir", str(exc)) from None
        self.node = node
        log.info(
            "data directory %s: restored %d records and %d contacts",
            self.data_dir,
            restored,
            len(node.table),
        )
        await node.listen_udp(*bind_for(s.listen, s.join))  # ConfigError("listen") if it cannot
        node.spawn(self._save_periodically(), name="save-state")
        return node

    def save(self) -> None:
        """Write contacts and stored records to the data directory (atomically)."""
        if self.node is None:
            return
        try:
            self.node.save_state(self.data_dir)
        except OSError as exc:
            log.warning("cannot save state to %s: %s", self.data_dir, exc)

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.save_interval)
            self.save()


class BootstrapDaemon(Daemon):
    """A long-lived public node that others join through."""

    command = "bootstrap"

    async def start(self) -> None:
        """Open the node and join the other bootstrap nodes (failure is not fatal)."""
        node = await self.open_node()
        addrs = self.settings.join
        size = await node.bootstrap(addrs)
        if addrs and size == 0:
            log.warning(
                "no node to join answered (%s%s); serving alone, retrying with waits up to %g s",
                show_addrs(addrs),
                node.core.why_unanswered(),
                self.settings.rejoin_interval,
            )
        log.info("routing table: %d contacts", size)

    def ready_line(self) -> str:
        """``ready bootstrap id=<routing id hex> addr=HOST:PORT``."""
        assert self.node is not None
        return f"ready bootstrap id={self.node.id.hex()} addr={show_addr(self.node.address)}"


class PeerDaemon(Daemon):
    """A peer: claims its node ID and keeps its presence published while it runs."""

    command = "peer"

    def __init__(self, settings: Settings, ready: ReadyCallback) -> None:
        super().__init__(settings, ready)
        self.peer: Peer | None = None
        self.node_id = settings.node_id or ""
        self.hub: SessionHub | None = None

    def apply_reloaded(self, new: Settings) -> None:
        """The accept list takes effect for the next incoming session."""
        if self.peer is not None:
            self.peer.accept = set(new.accept) if new.accept else None

    def make_api(self) -> DaemonApi:
        """The local API with the peer's sessions (:class:`~dhtsignal.api.SessionHub`)."""
        from dhtsignal.api import SessionHub

        api = super().make_api()
        assert self.peer is not None
        api.known = self.peer.known
        api.node_id = self.node_id
        self.hub = api.hub = SessionHub(self.peer, api.events, self.ready)
        return api

    async def start(self) -> None:
        """Lock the data directory, then :meth:`Peer.start <dhtsignal.peer.Peer.start>`:
        load the saved state, bind, join, listen on the inbox (before the ready line, so a
        dial right after it is heard), claim the node ID and publish presence and room
        records; then save periodically, re-join when the table runs empty, and read the
        node ID back.

        Until a bootstrap node answers, the join is retried every ``rejoin_interval``
        seconds (as a bootstrap node retries its ``--join`` nodes), with one warning.

        :raises ConfigError: the data directory, its state or the listen address is unusable.
        :raises NodeIdTaken: another key holds a live claim on the node ID (saying until
            when).
        """
        from dhtsignal.aio import rtc
        from dhtsignal.peer import Peer, PeerConfig

        s = self.settings
        self._lock.acquire()
        self.identity = identity = Identity.load_or_create(self.data_dir)
        self.node_id = s.node_id or identity.self_id
        rtc.use_host_addresses(list(s.ice_host) or None)
        self.peer = peer = Peer(
            self.node_id,
            s.bootstrap,
            listen=bind_for(s.listen, s.bootstrap),
            rooms=list(s.room),
            data_dir=self.data_dir,
            identity=identity,
            ice_servers=s.ice_servers(),
            accept=list(s.accept) or None,
            presence_ttl=s.presence_ttl,
            claim_ttl=s.claim_ttl,
            node_config=s.node_config(),
            known_peers=self.data_dir / KNOWN_PEERS_FILE,
            config=PeerConfig(
                keep_state=True,
                sign_off_timeout=SIGNOFF_BUDGET,
                join_retry_interval=s.rejoin_interval,
                keepalive_interval=s.keepalive_interval,
            ),
        )
        self.node = node = peer.node
        await peer.start()
        log.info("joined the DHT: %d contacts", len(node.table))
        node.spawn(self._save_periodically(), name="save-state")
        if not await self._owns_node_id():
            raise await claim_holder(node, self.node_id, identity.public_key)
        log.info("published %s in rooms %s", self.node_id, ", ".join(s.room))

    async def _owns_node_id(self) -> bool:
        """Read our node ID back: does the DHT name our key as its owner?

        A publisher's put succeeds when any storing node (its own store included)
        accepts the claim, so in a small network a second key's claim can look
        accepted; readers decide by the oldest live claim, and so do we.
        """
        assert self.node is not None and self.identity is not None
        try:
            info = await resolve(self.node, self.node_id)
        except PeerNotFound as exc:
            log.warning("cannot read back own presence (%s); continuing", exc)
            return True
        return info.key == self.identity.public_key.hex()

    def ready_line(self) -> str:
        """``ready peer node_id=NAME key=<public key hex> addr=HOST:PORT nat=TYPE``."""
        assert self.node is not None and self.identity is not None
        nat = self.peer.nat if self.peer is not None else "unknown"
        return (
            f"ready peer node_id={self.node_id} key={self.identity.public_key.hex()} "
            f"addr={show_addr(self.node.address)} nat={nat}"
        )

    async def serve(self, stop: asyncio.Event) -> None:
        """The peer's main loop: runs until SIGTERM or SIGINT.

        Presence refresh, state saves and re-joins run as tasks of the node.
        """
        assert self.hub is not None
        serving = asyncio.create_task(self.hub.serve(), name="sessions")
        try:
            await stop.wait()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    async def shutdown(self) -> None:
        """:meth:`Peer.close <dhtsignal.peer.Peer.close>`: publish tombstones (bounded by
        :data:`SIGNOFF_BUDGET`), close the sessions, save the state (unless it could not be
        loaded) and close the node."""
        if self.peer is not None:
            peer, self.peer = self.peer, None
            await peer.close()
            log.info("stopped")


def bind_for(listen: Addr, targets: Sequence[Addr]) -> Addr:
    """The address to bind to reach ``targets`` (see :func:`~dhtsignal.wire.addr.listen_for`:
    the IPv4 wildcard becomes the dual-stack ``[::]`` for an IPv6 target).

    :raises ConfigError: ``listen`` cannot reach a target's address family.
    """
    try:
        return listen_for(listen, targets)
    except ValueError as exc:
        raise ConfigError("listen", str(exc)) from None


@contextlib.asynccontextmanager
async def client_node(
    settings: Settings, addrs: Sequence[Addr] = (), *, reach: Sequence[Addr] = ()
) -> AsyncIterator[DhtNode]:
    """A short-lived client-mode node with a throwaway key, joined through ``addrs``.

    :param reach: other addresses it will talk to (the family of its socket follows them).

    :raises DhtTimeout: none of ``addrs`` answered.
    :raises ConfigError: the listen address cannot be bound.
    """
    node = DhtNode(routing_id(os.urandom(32)), settings.node_config(client_mode=True))
    try:
        await node.listen_udp(*bind_for(settings.listen, [*addrs, *reach]))
        began = time.monotonic()
        if addrs and await node.bootstrap(addrs) == 0:
            raise node.core.all_other_network() or _unreachable(
                addrs, began, node.core.why_unanswered()
            )
        yield node
    finally:
        await node.close()
