"""The ``dhtsignal`` command line.

Commands: ``bootstrap`` and ``peer`` run daemons (:mod:`dhtsignal.daemon`);
``peers``, ``lookup`` and ``status`` run a short-lived client node, print, and
exit; ``ping``, ``send`` and ``chat`` run a short-lived anonymous peer that opens
one WebRTC session (:mod:`dhtsignal.dialing`); ``demo`` runs the embedded demo.
Settings come from flags, ``DHTSIGNAL_*`` variables and a TOML file
(:mod:`dhtsignal.config`).

Exit status: 0 success; 1 the operation failed (unreachable, offline, taken,
pinned key changed); 2 bad usage or a bad setting, also one that parses but
cannot be used (an address that cannot be bound, an unusable data directory, a
malformed known-peers file); 130 interrupted. Errors are one line on stderr,
never a traceback.

SIGTERM or SIGINT during start-up (while modules load and settings are read,
before a daemon installs its graceful handlers) end the process at once without
a traceback: exit 0 for ``bootstrap`` and ``peer`` (stopped before serving, as
they report a stop during their own start), 128 + the signal number otherwise.
The modules behind the commands are imported only once those handlers are in
place (:func:`main` is the first code of ours that runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from dhtsignal import __version__
from dhtsignal.commands import BY_NAME, COMMANDS, DAEMONS, SESSIONS
from dhtsignal.errors import ConfigError, DhtSignalError, UsageError

if TYPE_CHECKING:  # config imports the DHT node: loaded after the signal handlers
    from dhtsignal.config import Settings

EPILOG = (
    "Every option can also be set in the environment (DHTSIGNAL_<OPTION>, lists "
    "comma-separated) or in the TOML file given by --config; flags win over the "
    "environment, which wins over the file."
)
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger(__name__)


class _UsageError(Exception):
    """A command line argparse refused (reported on one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors instead of usage text on stderr."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The ``dhtsignal`` parser with one sub-parser per command."""
    from dhtsignal import config

    parser = _Parser(
        prog="dhtsignal",
        description="Serverless WebRTC signaling over a Kademlia DHT.",
        epilog=EPILOG,
    )
    version = f"dhtsignal {__version__}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            epilog=EPILOG,
        )
        p.add_argument("--version", action="version", version=version)
        for arg in command.positionals:
            extra: dict[str, Any] = {"nargs": "?", "default": None} if arg.optional else {}
            if arg.choices is not None:
                extra["choices"] = arg.choices
            p.add_argument(arg.dest, metavar=arg.metavar, help=arg.help, **extra)
        config.add_arguments(p, command.name)
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the effective settings (flags, environment, file, defaults) as TOML "
            "and exit",
        )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one ``dhtsignal`` command; returns the exit status.

    Run as the program (``argv`` None, in the main thread), it first makes SIGTERM and
    SIGINT end the process quietly (see the module docstring), and a command other than
    ``bootstrap`` and ``peer`` ends the process itself once its output is flushed, with
    that status (no interpreter teardown: :func:`_exit_now`).

    :param argv: arguments after the program name (default ``sys.argv[1:]``).
    :param environ: the environment (default ``os.environ``).
    """
    if argv is None:
        _stop_quietly_on_signals(sys.argv[1:])
    try:
        status = _main(argv, environ)
    except BrokenPipeError:  # stdout closed early (``dhtsignal peers | head``)
        _stdout_to_devnull()
        return EXIT_FAILED
    if argv is None and _command(sys.argv[1:]) not in DAEMONS:
        _exit_now(status)
    return status


def _command(args: Sequence[str]) -> str | None:
    """The command of a command line: its first word that is not an option."""
    return next((a for a in args if not a.startswith("-")), None)


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _exit_now(status: int) -> NoReturn:
    """End a one-shot command's process once its output is out, without tearing the
    interpreter down: the command has closed everything it opened (sockets, files,
    data-directory locks; it starts no threads), and finalizing the modules a session
    command loads (aiortc, PyAV, cryptography) takes 0.1-0.2 s, which every ``ping`` or
    ``lookup`` would add to its run time (see ``bench/killed_ping.py``)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()
        status = status or EXIT_FAILED
    except OSError:
        status = status or EXIT_FAILED
    logging.shutdown()  # flushes the log handlers
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


def _stop_quietly_on_signals(args: Sequence[str]) -> None:
    """Until the command runs, SIGTERM and SIGINT end the process at once, quietly.

    ``os._exit``, not an exception: a signal can land anywhere (inside an import, in code
    that catches ``BaseException``), and nothing has started yet that needs stopping. A
    daemon replaces these handlers with its graceful ones and puts them back when it
    stops; the other commands get the default handlers back in :func:`_main` (SIGINT:
    KeyboardInterrupt, exit 130).

    :param args: the command line, to tell a daemon from the other commands before it is
        parsed (the command is the first word that is not an option).
    """
    daemon = _command(args) in DAEMONS

    def stop(signum: int, frame: FrameType | None) -> None:
        os._exit(0 if daemon else 128 + signum)

    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, stop)
    except ValueError:  # not the main thread: leave the handlers alone
        pass


def _default_signal_handlers() -> None:
    """SIGTERM and SIGINT as Python starts them (a no-op outside the main thread)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    from dhtsignal import config

    env = os.environ if environ is None else environ
    try:
        ns = build_parser().parse_args(argv)
    except _UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    command: str = ns.command
    try:
        settings = config.load(command, vars(ns), env)
        if getattr(ns, "target_id", None) is not None:
            _check_node_id(ns.target_id)
    except ConfigError as exc:
        _err(f"dhtsignal {command}: {exc}")
        return EXIT_USAGE
    if ns.print_config:
        _out(config.dump(settings, command).rstrip("\n"))
        return 0
    _setup_logging(settings.log_level, settings.log_format)
    try:
        if argv is None and command not in DAEMONS:
            _default_signal_handlers()  # a daemon keeps them until it installs its own
        if command in SESSIONS and getattr(settings, "daemon", None) is None:
            _require_webrtc(command)
        from dhtsignal import daemon

        return daemon.run(_HANDLERS[command](settings, ns))
    except ConfigError as exc:
        _err(f"dhtsignal {command}: {exc}")
        return EXIT_USAGE
    except DhtSignalError as exc:
        _err(f"dhtsignal {command}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _err(message: str) -> None:
    print(message.replace("\n", " "), file=sys.stderr, flush=True)


def _out(line: str) -> None:
    print(line, flush=True)


def _setup_logging(level: str, fmt: str = "text") -> None:
    from dhtsignal import logs

    logs.setup(level, fmt, sys.stderr)


def _require_webrtc(command: str) -> None:
    """Refuse a command that runs WebRTC sessions when aiortc is not installed.

    :raises UsageError: naming the extra to install.
    """
    from dhtsignal import WEBRTC_EXTRA

    try:
        import aiortc  # noqa: F401
    except ImportError:
        raise UsageError(
            f"'{command}' needs WebRTC support, which is not installed: "
            f"pip install '{WEBRTC_EXTRA}' (a bootstrap node, peers, lookup and status "
            "work without it)"
        ) from None


def _check_node_id(node_id: str) -> None:
    from dhtsignal.dht.records import check_label

    try:
        check_label(node_id)
    except ValueError as exc:
        raise ConfigError("NODE_ID", str(exc)) from None


# -- commands -----------------------------------------------------------------------------


_Handler = Callable[["Settings", argparse.Namespace], Coroutine[Any, Any, int]]
#: The code of each command of :data:`~dhtsignal.commands.COMMANDS`, attached by :func:`_runs`.
_HANDLERS: dict[str, _Handler] = {}


def _runs(name: str) -> Callable[[_Handler], _Handler]:
    """Attach the decorated coroutine function to the command ``name``."""
    if name not in BY_NAME:
        raise ValueError(f"no command {name!r} in dhtsignal.commands")

    def attach(handler: _Handler) -> _Handler:
        _HANDLERS[name] = handler
        return handler

    return attach


def _reloader(command: str, ns: argparse.Namespace) -> Callable[[], Settings]:
    """Reads a daemon's settings again (SIGHUP): the same flags, the environment as it
    was at start, the config file as it is now."""
    from dhtsignal import config

    flags, env = vars(ns), dict(os.environ)
    return lambda: config.load(command, flags, env)


@_runs("bootstrap")
async def _bootstrap(settings: Settings, ns: argparse.Namespace) -> int:
    from dhtsignal.daemon import BootstrapDaemon

    daemon = BootstrapDaemon(settings, _out)
    daemon.reload_settings = _reloader("bootstrap", ns)
    await daemon.run()
    return 0


@_runs("peer")
async def _peer(settings: Settings, ns: argparse.Namespace) -> int:
    from dhtsignal.daemon import PeerDaemon

    daemon = PeerDaemon(settings, _out)
    daemon.reload_settings = _reloader("peer", ns)
    await daemon.run()
    return 0


@_runs("peers")
async def _peers(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.watch:
        from dhtsignal import viadaemon
        from dhtsignal.datadir import KnownPeers

        known = None if settings.daemon else KnownPeers(settings.known_peers)
        return await viadaemon.watch_peers(
            settings.daemon, settings.room, settings.json, _out, settings=settings, known=known
        )
    if settings.daemon is not None:
        return await _through_daemon("peers", settings, ns)
    from dhtsignal.daemon import client_node
    from dhtsignal.datadir import KnownPeers
    from dhtsignal.presence import PeerInfo, room_peers

    known = KnownPeers(settings.known_peers, settings.network)  # read, never written here
    found: dict[str, PeerInfo] = {}
    async with client_node(settings, settings.bootstrap) as node:
        for room in settings.room:
            for info in await room_peers(node, room, known):
                found.setdefault(info.key, info)
    peers = sorted(found.values(), key=lambda p: (p.node_id, p.key))
    if settings.json:
        _out(json.dumps([p.to_json() for p in peers]))
    elif not peers:
        _err(f"no peers online in {', '.join(settings.room)}")
    else:
        _out(_table(peers))
    return 0


def _table(peers: Sequence[Any]) -> str:
    """An aligned text table of :class:`~dhtsignal.presence.PeerInfo`."""
    header = ("NODE_ID", "KEY", "ROOMS", "ADDRESSES", "EXPIRES_IN", "REFRESHED")
    rows = [header] + [
        (
            p.node_id,
            p.key[:16],
            ",".join(p.rooms),
            " ".join(_addr(a) for a in p.addresses) or "-",
            f"{p.expires_in:.0f}s",
            f"{p.refreshed_ago:.0f}s ago",
        )
        for p in peers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _addr(a: tuple[str, int]) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


@_runs("lookup")
async def _lookup(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is not None:
        return await _through_daemon("lookup", settings, ns)
    from dhtsignal.daemon import client_node
    from dhtsignal.datadir import KnownPeers
    from dhtsignal.presence import resolve

    known = KnownPeers(settings.known_peers, settings.network)
    async with client_node(settings, settings.bootstrap) as node:
        info = await resolve(node, ns.target_id, known, pin=True)  # the user's own lookup
    if settings.json:
        _out(json.dumps(info.to_json()))
        return 0
    fields = [
        ("node_id", info.node_id),
        ("key", info.key),
        ("self_id", info.self_id),
        ("rooms", ", ".join(info.rooms) or "-"),
        ("addresses", " ".join(_addr(a) for a in info.addresses) or "-"),
        ("nat", info.nat),
        ("expires_in", f"{info.expires_in:.1f} s"),
        ("refreshed", f"{info.refreshed_ago:.1f} s ago"),
    ]
    _out("\n".join(f"{k:<11} {v}" for k, v in fields))
    return 0


@_runs("pins")
async def _pins(settings: Settings, ns: argparse.Namespace) -> int:
    from dhtsignal.datadir import KnownPeers

    if settings.known_peers is None:
        raise ConfigError("known_peers", "'none' keeps no pins to list or forget")
    known = KnownPeers(settings.known_peers, settings.network)
    if ns.action == "list":
        if ns.pin_id is not None:
            raise ConfigError("NODE_ID", "'pins list' takes no node ID")
        pins = known.entries()
        if settings.json:
            _out(
                json.dumps(
                    [{"network": p.network, "node_id": p.node_id, "key": p.key} for p in pins]
                )
            )
        elif not pins:
            _err(f"no pins in {settings.known_peers}")
        else:
            rows = [("NETWORK", "NODE_ID", "KEY")] + [(p.network, p.node_id, p.key) for p in pins]
            widths = [max(len(r[i]) for r in rows) for i in range(2)]
            _out("\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows))
        return 0
    if ns.pin_id is None:
        raise ConfigError("NODE_ID", "'pins forget' needs the node ID whose pin to forget")
    old = known.forget(ns.pin_id)
    if old is None:
        elsewhere = sorted({p.network for p in known.entries() if p.node_id == ns.pin_id})
        hint = (
            f" (pinned in network {', '.join(map(repr, elsewhere))}: add --network)"
            if elsewhere
            else ""
        )
        _err(
            f"dhtsignal pins: no pin for {ns.pin_id!r} in network {settings.network!r} "
            f"in {settings.known_peers}{hint}"
        )
        return EXIT_FAILED
    _out(f"forgot {ns.pin_id} (network {settings.network}, key {old}) in {settings.known_peers}")
    return 0


@_runs("status")
async def _status(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is not None:
        return await _through_daemon("status", settings, ns)
    from dhtsignal.daemon import client_node
    from dhtsignal.errors import DhtTimeout, RpcTimeout
    from dhtsignal.wire.addr import show_addr

    assert settings.target is not None
    shown = show_addr(settings.target)
    async with client_node(settings, reach=[settings.target]) as node:
        assert node.address is not None
        targets = await node.resolve([settings.target])
        if not targets:
            raise DhtTimeout(f"resolving {shown}", 0.0)
        began = time.perf_counter()  # uvloop's loop.time() has millisecond resolution
        try:
            node_id = await node.ping(targets[0])
        except RpcTimeout as exc:
            raise DhtTimeout(f"ping of {shown} (no answer)", exc.seconds) from None
        rtt_ms = (time.perf_counter() - began) * 1000
    if settings.json:
        _out(json.dumps({"id": node_id.hex(), "addr": shown, "rtt_ms": round(rtt_ms, 3)}))
    else:
        _out(f"node {node_id.hex()} at {shown}: rtt {rtt_ms:.2f} ms")
    return 0


def _dialer_options(settings: Settings) -> dict[str, Any]:
    """The :class:`~dhtsignal.peer.Peer` options of ``ping``, ``send`` and ``chat``."""
    from dhtsignal.aio import rtc
    from dhtsignal.daemon import bind_for

    rtc.use_host_addresses(list(settings.ice_host) or None)
    return {
        "listen": bind_for(settings.listen, settings.bootstrap),
        "ice_servers": settings.ice_servers(),
        "node_config": settings.node_config(client_mode=True),
        "known_peers": settings.known_peers,
    }


@_runs("ping")
async def _ping(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is not None:
        return await _through_daemon("ping", settings, ns)
    from dhtsignal import dialing

    return await dialing.ping(
        ns.target_id,
        settings.bootstrap,
        count=settings.count,
        as_json=settings.json,
        emit=_out,
        **_dialer_options(settings),
    )


@_runs("send")
async def _send(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is not None:
        return await _through_daemon("send", settings, ns)
    from dhtsignal import dialing

    return await dialing.send(
        ns.target_id,
        ns.text,
        settings.bootstrap,
        timeout=settings.ack_timeout,
        emit=_out,
        **_dialer_options(settings),
    )


@_runs("chat")
async def _chat(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is not None:
        return await _through_daemon("chat", settings, ns)
    from dhtsignal import dialing

    return await dialing.chat(
        ns.target_id, settings.bootstrap, emit=_out, **_dialer_options(settings)
    )


async def _through_daemon(command: str, settings: Settings, ns: argparse.Namespace) -> int:
    """Run a client command through the daemon of ``--daemon`` (:mod:`dhtsignal.viadaemon`)."""
    from dhtsignal import viadaemon

    d = settings.daemon
    assert d is not None
    if command == "peers":
        return await viadaemon.peers(d, settings.room, settings.json, _out, _err)
    if command == "lookup":
        return await viadaemon.lookup(d, ns.target_id, settings.json, _out)
    if command == "status":
        return await viadaemon.status(d, settings.json, _out)
    if command == "send":
        return await viadaemon.send(d, ns.target_id, ns.text, settings.ack_timeout, _out)
    if command == "ping":
        return await viadaemon.ping(d, ns.target_id, settings.count, settings.json, _out)
    if command == "chat":
        return await viadaemon.chat(d, ns.target_id, _out)
    if command == "recv":
        return await viadaemon.recv(d, settings.json, _out)
    raise ValueError(command)


@_runs("recv")
async def _recv(settings: Settings, ns: argparse.Namespace) -> int:
    if settings.daemon is None:
        raise ConfigError("daemon", "required by 'recv' (--daemon DATA_DIR or DHTSIGNAL_DAEMON)")
    return await _through_daemon("recv", settings, ns)


@_runs("demo")
async def _demo(settings: Settings, ns: argparse.Namespace) -> int:
    from dhtsignal.demo import run_demo

    return await run_demo(_out)


if __name__ == "__main__":
    sys.exit(main())
