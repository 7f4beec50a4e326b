"""Prometheus metrics of a daemon (``--metrics HOST:PORT``), through ``prometheus_client``.

Theory of operation
-------------------
Each daemon has its own :class:`~prometheus_client.CollectorRegistry` (never the
process-global one, so several daemons in one process, as in tests, do not collide).
Gauges and counters are read from the node when scraped (:class:`DaemonCollector`: the
node's ``stats`` counters, its routing table, store and subscriptions, and the peer's
sessions), so nothing is updated on the datagram path; the one histogram,
``dhtsignal_session_setup_seconds``, is observed as sessions open.

:class:`MetricsServer` serves the text exposition format on the daemon's own event
loop (``GET /metrics``; any other path is 404), so a scrape reads the node between
two callbacks and never races it. It is a minimal HTTP/1.0 responder with bounds:
:data:`MAX_CONNECTIONS` at once, :data:`MAX_REQUEST` bytes of request head, and
:data:`REQUEST_TIMEOUT` seconds to send it.

Metrics (all prefixed ``dhtsignal_``):

==================================  =========  ===========================================
name                                type       meaning
==================================  =========  ===========================================
``routing_contacts``                gauge      contacts in the routing table
``records``                         gauge      signed records stored for others
``record_bytes``                    gauge      their size, bytes
``listeners``                       gauge      subscriptions others hold on this node
``rpc_requests_total{rpc}``         counter    requests answered, per RPC
``datagrams_dropped_total{reason}`` counter    datagrams dropped (malformed, rate-limited...)
``refused_total{reason}``           counter    requests and sessions refused, per reason
``rpc_timeouts_total``              counter    requests of ours that got no answer
``sessions{state}``                 gauge      WebRTC sessions: open, dialing, answering
``session_setup_seconds``           histogram  time from dial (or offer) to open channel
==================================  =========  ===========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from dhtsignal.errors import ConfigError
from dhtsignal.wire.addr import Addr

if TYPE_CHECKING:
    from dhtsignal.api import DaemonApi

log = logging.getLogger(__name__)

#: Scrapes served at once.
MAX_CONNECTIONS = 16
#: Bytes of request line and headers read at most.
MAX_REQUEST = 8192
#: Seconds a client has to send its request.
REQUEST_TIMEOUT = 5.0
#: Buckets of ``dhtsignal_session_setup_seconds`` (loopback sessions open in ~50 ms,
#: sessions over TURN in seconds).
SETUP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SESSION_STATES = ("open", "dialing", "answering")


class DaemonCollector(Collector):
    """Reads a daemon's node (and sessions) at scrape time.

    :param api: the daemon's :class:`~dhtsignal.api.DaemonApi` (node, sessions).
    """

    def __init__(self, api: DaemonApi) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        node = self.api.node
        yield GaugeMetricFamily(
            "dhtsignal_routing_contacts", "Contacts in the routing table", value=len(node.table)
        )
        yield GaugeMetricFamily(
            "dhtsignal_records", "Signed records stored for others", value=len(node.store)
        )
        yield GaugeMetricFamily(
            "dhtsignal_record_bytes", "Bytes of stored records", value=node.store.total_bytes
        )
        yield GaugeMetricFamily(
            "dhtsignal_listeners", "Subscriptions others hold on this node", value=len(node.subs)
        )
        stats = dict(node.stats)
        if self.api.hub is not None:
            for k, n in self.api.hub.peer.stats.items():
                stats[k] = stats.get(k, 0) + n
        rpc = CounterMetricFamily(
            "dhtsignal_rpc_requests", "DHT requests answered, per RPC", labels=["rpc"]
        )
        dropped = CounterMetricFamily(
            "dhtsignal_datagrams_dropped", "Datagrams dropped, per reason", labels=["reason"]
        )
        refused = CounterMetricFamily(
            "dhtsignal_refused", "Requests and sessions refused, per reason", labels=["reason"]
        )
        for name, n in sorted(stats.items()):
            kind, _, reason = name.partition(":")
            if kind == "rpc":
                rpc.add_metric([reason], n)
            elif kind == "drop":
                dropped.add_metric([reason], n)
            elif kind in ("refused", "incoming-failed", "closed"):
                refused.add_metric([name], n)
        yield rpc
        yield dropped
        yield refused
        yield CounterMetricFamily(
            "dhtsignal_rpc_timeouts",
            "Requests of ours that got no answer",
            value=stats.get("rpc-timeout", 0),
        )
        sessions = GaugeMetricFamily(
            "dhtsignal_sessions", "WebRTC sessions, per state", labels=["state"]
        )
        counts = self.api.hub.counts() if self.api.hub is not None else {}
        for state in SESSION_STATES:
            sessions.add_metric([state], counts.get(state, 0))
        yield sessions


class DaemonMetrics:
    """A daemon's registry: the collector and the session-setup histogram.

    :param api: the daemon's local API object (what the collector reads).
    """

    def __init__(self, api: DaemonApi) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(api))
        self.setup_seconds = Histogram(
            "dhtsignal_session_setup_seconds",
            "Seconds from dial (or offer received) to open data channels",
            buckets=SETUP_BUCKETS,
            registry=self.registry,
        )

    def observe_setup(self, seconds: float) -> None:
        """Count one session that opened after ``seconds``."""
        self.setup_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)


class MetricsServer:
    """Serves ``GET /metrics`` from ``render`` on the running loop.

    :param render: makes the body (the text exposition).
    :param addr: where to listen.
    """

    def __init__(self, render: Callable[[], bytes], addr: Addr) -> None:
        self.render = render
        self.addr = addr
        self.bound: Addr | None = None
        self._server: asyncio.AbstractServer | None = None
        self._busy = 0

    async def start(self) -> Addr:
        """Listen; returns the bound address.

        :raises ConfigError: ``metrics`` cannot be bound.
        """
        host, port = self.addr
        try:
            self._server = await asyncio.start_server(self._client, host, port, limit=MAX_REQUEST)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ConfigError("metrics", f"cannot listen on {host}:{port}: {why}") from None
        sock = self._server.sockets[0].getsockname()
        self.bound = (sock[0], sock[1])
        log.info("metrics on http://%s:%d/metrics", *self.bound)
        return self.bound

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._busy >= MAX_CONNECTIONS:
                return
            self._busy += 1
            try:
                await asyncio.wait_for(self._serve(reader, writer), REQUEST_TIMEOUT)
            finally:
                self._busy -= 1
        except (
            TimeoutError,
            ConnectionError,
            asyncio.LimitOverrunError,
            asyncio.IncompleteReadError,
        ):
            pass
        except asyncio.CancelledError:  # the server closed (see api.ApiServer._client)
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError past MAX_REQUEST
        words = head.split(b"\r\n", 1)[0].split()
        if len(words) < 2 or words[0] not in (b"GET", b"HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        elif words[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
        else:
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        if words[:1] != [b"HEAD"]:
            writer.write(body)
        await writer.drain()


__all__ = ["DaemonCollector", "DaemonMetrics", "MetricsServer"]
